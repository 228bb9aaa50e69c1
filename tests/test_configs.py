"""Every YAML in configs/ runs: a few steps each, on small data laid where the config expects it."""

import json
from pathlib import Path

import numpy as np
import pytest

from dbrx.data.mds import MDSWriter
from dbrx.train.config import load_config
from dbrx.train.trainer import Trainer

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
SMALL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.attn_config.kv_n_heads=1",
         "model.ffn_config.ffn_hidden_size=16", "max_seq_len=32", "global_train_batch_size=4",
         "device_train_microbatch_size=2", "device_eval_batch_size=4", "max_duration=3ba", "eval_interval=3ba",
         "save_interval=3ba", "eval_subset_num_batches=1", "progress_bar=false", "console_log_interval=1ba"]


def _write(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with MDSWriter(path, {"tokens": "ndarray:int32"}) as w:
        for _ in range(n):
            w.write({"tokens": rng.integers(0, 100_000, 32, dtype=np.int32)})


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_each_config_runs_a_few_steps(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative paths (runs/...) land here
    cfg = load_config(config, SMALL)
    datasets = {cfg["train_loader"]["dataset"].get("local")} | {
        s["local"] for s in (cfg["train_loader"]["dataset"].get("streams") or {}).values()}
    for i, local in enumerate(sorted(d for d in datasets if d)):
        for split in ("train", "val"):
            _write(Path(local) / split, 24, seed=i)
    summary = Trainer(cfg, log=lambda *_: None).fit()
    assert summary["step"] == 3 and np.isfinite(summary["loss"])
    save = Path(cfg["save_folder"])
    assert (save / "hf" / "model.safetensors").exists() and (save / "loss.png").exists()
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    if (cfg.get("loggers") or {}).get("tensorboard") is not None:
        assert list((save / "tensorboard").glob("events.out.tfevents.*"))
