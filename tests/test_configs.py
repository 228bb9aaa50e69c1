"""Every YAML in configs/ runs: a few steps each, on small data laid where the config expects it."""

import json
from pathlib import Path

import numpy as np
import pytest

from dbrx.config import DbrxConfig
from dbrx.data.mds import MDSWriter
from dbrx.model import DbrxForCausalLM
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


FAKE_STDLIB = {
    "alpha.py": 'def add(a, b):\n    """Add two numbers."""\n    total = a + b\n    return total\n',
    "pkg/beta.py": ('class Box:\n    def get(self, key, default=None):\n        """Return the value for key."""\n'
                    '        if key in self.data:\n            return self.data[key]\n        return default\n'),
    "gamma.py": 'def shout(text):\n    """Upper-case text."""\n    words = text.split()\n    return " ".join(words).upper()\n',
}


def _finetuning_inputs(cfg: dict) -> None:
    """What the fine-tuning configs expect under runs/: a pretrained checkpoint and the stdlib instruction sets
    (JSONL, hub-style parquet, MDS; both tasks), built here from a three-file fake standard library."""
    from dbrx.cli import main
    from dbrx.data import stdlib_sft

    root = Path("fake_stdlib")
    for name, text in FAKE_STDLIB.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for task, out in (("body", "runs/data/stdlib_sft"), ("signature", "runs/data/stdlib_sig")):
        splits = stdlib_sft.build(root, val_fraction=0.0, task=task)
        splits["val"] = splits["train"][:2]
        stdlib_sft.write(Path(out), splits, task)
    assert main(["convert", "finetuning", "--dataset", "json", "--data-dir", "runs/data/stdlib_sft", "--splits",
                 "train", "val", "--out-root", "runs/data/stdlib_sft_mds", "--tokenizer", "cl100k_base",
                 "--max-seq-len", "64"]) == 0
    config = DbrxConfig(d_model=32, n_heads=2, n_layers=1, max_seq_len=64, vocab_size=100352, attn_config={"kv_n_heads": 1},
                        ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 16, "moe_top_k": 4})
    DbrxForCausalLM(config).save_pretrained(cfg["model"]["pretrained"])


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_each_config_runs_a_few_steps(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative paths (runs/...) land here
    raw = load_config(config)
    finetuning = raw["train_loader"]["name"] == "finetuning"
    # A pretrained start takes the checkpoint's shape, so only the run's sizes are overridden.
    cfg = load_config(config, [o for o in SMALL if not (finetuning and o.startswith("model."))])
    if finetuning:
        _finetuning_inputs(cfg)
    else:
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
    if finetuning:
        assert all(0 < r["packing_efficiency"] <= 1 for r in rows if "loss" in r)
        assert any("eval_loss" in r for r in rows)
    if "peft_config" in cfg["model"]:
        assert (save / "adapter" / "adapter_model.safetensors").exists()
    if (cfg.get("loggers") or {}).get("tensorboard") is not None:
        assert list((save / "tensorboard").glob("events.out.tfevents.*"))
