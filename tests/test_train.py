"""The training engine: config validation, data mixes and curricula, the step's math, checkpoints that resume
exactly (also after SIGKILL), and what a run writes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dbrx import DbrxForCausalLM
from dbrx.data.mds import MDSReader, MDSWriter
from dbrx.data.mixture import MixtureLoader, Phase, Stream
from dbrx.train.config import ConfigError, Time, load_config
from dbrx.train.loss import chunked_cross_entropy_sum, shift_labels
from dbrx.train.trainer import Trainer, TrainingError
from tests.conftest import dbrx_config

VOCAB, SEQ = 512, 32
TINY_MODEL = {"preset": "dbrx-tiny", "d_model": 32, "n_heads": 2, "n_layers": 2, "vocab_size": VOCAB,
              "max_seq_len": 64, "attn_config": {"kv_n_heads": 1}, "ffn_config": {"ffn_hidden_size": 24}}


def write_tokens(path: Path, n: int, offset: int = 0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with MDSWriter(path, {"tokens": "ndarray:int32"}) as w:
        for i in range(n):
            # A learnable pattern (arithmetic runs) so that the loss can fall.
            start = int(rng.integers(0, VOCAB - SEQ))
            w.write({"tokens": ((np.arange(SEQ) + start + offset) % VOCAB).astype(np.int32)})
    return path


@pytest.fixture
def data(tmp_path):
    write_tokens(tmp_path / "data" / "train", 96, seed=1)
    write_tokens(tmp_path / "data" / "val", 16, seed=2)
    write_tokens(tmp_path / "code" / "train", 64, offset=7, seed=3)
    return tmp_path


def run_config(data_root: Path, save: Path, **extra) -> dict:
    cfg = {
        "seed": 3, "max_seq_len": SEQ, "model": dict(TINY_MODEL),
        "train_loader": {"name": "text", "dataset": {"local": str(data_root / "data"), "split": "train"}},
        "eval_loader": {"name": "text", "dataset": {"local": str(data_root / "data"), "split": "val"}},
        "optimizer": {"name": "decoupled_adamw", "lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 1e-5},
        "scheduler": {"name": "cosine_with_warmup", "t_warmup": "2ba", "alpha_f": 0.1},
        "max_duration": "8ba", "eval_interval": "4ba", "save_interval": "2ba",
        "global_train_batch_size": 8, "device_train_microbatch_size": 4, "save_folder": str(save),
        "console_log_interval": "1ba", "progress_bar": False, "device": "cpu", "precision": "fp32",
    }
    cfg.update(extra)
    return cfg


# ---- config ---------------------------------------------------------------------------------------------------
def test_training_from_a_quantised_checkpoint_is_refused_before_it_starts(data, tmp_path):
    from dbrx.quant import QuantConfig, write_quantized
    from dbrx.train.trainer import model_config

    DbrxForCausalLM(model_config(TINY_MODEL)).save_pretrained(tmp_path / "fp32")
    write_quantized(tmp_path / "fp32", tmp_path / "int8", QuantConfig(8), log=lambda *_: None)
    cfg = run_config(data, tmp_path / "run", model={"pretrained": str(tmp_path / "int8")})
    with pytest.raises(ConfigError, match=r"model.pretrained: .*int8 holds weights quantised to int8 by dbrx quantize"):
        Trainer(load_config(None, base=cfg), log=lambda *_: None)


def test_config_errors_name_the_key(tmp_path, data):
    base = run_config(data, tmp_path / "run")
    del base["precision"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base))
    assert load_config(path)["precision"] == "auto"  # defaults filled in
    with pytest.raises(ConfigError, match="unknown key 'max_durration'.*'max_duration'"):
        load_config(path, ["max_durration=3ba"])
    with pytest.raises(ConfigError, match="unknown key 'optimizer.learning_rate'"):
        load_config(path, ["optimizer.learning_rate=1"])
    with pytest.raises(ConfigError, match="max_duration: '10 minutes' is not a duration"):
        load_config(path, ["max_duration=10 minutes"])
    with pytest.raises(ConfigError, match="global_train_batch_size: expected an integer"):
        load_config(path, ["global_train_batch_size=eight"])
    with pytest.raises(ConfigError, match="precision: 'fp8' is not one of"):
        load_config(path, ["precision=fp8"])
    with pytest.raises(ConfigError, match="multiple of device_train_microbatch_size"):
        load_config(path, ["device_train_microbatch_size=3"])
    assert load_config(path, ["max_duration=20ba", "optimizer.lr=0.01"])["optimizer"]["lr"] == 0.01
    assert load_config(path, ["optimizer.lr=3e-4"])["optimizer"]["lr"] == 3e-4  # YAML 1.1 alone reads a string


def test_time_strings():
    assert Time.parse("2000ba") == Time(2000, "ba") and Time.parse("10Mtok") == Time(10_000_000, "tok")
    assert Time.parse("1ep") == Time(1, "ep") and Time.parse(5) == Time(5, "ba")


# ---- data -----------------------------------------------------------------------------------------------------
def _streams(data, pa=0.7, pb=0.3):
    return [Stream("a", MDSReader(data / "data", split="train"), pa),
            Stream("b", MDSReader(data / "code", split="train"), pb)]


def test_an_empty_stream_is_named(tmp_path):
    from dbrx.data.mixture import open_streams

    write_tokens(tmp_path / "empty" / "train", 0)
    with pytest.raises(ConfigError, match=r"train_loader.dataset.streams.default: the dataset at .*empty.train "
                                          "has no samples"):
        open_streams({"local": str(tmp_path / "empty"), "split": "train"}, "train_loader.dataset")


def test_mix_matches_proportions_within_5_percent(data):
    loader = MixtureLoader([Phase(_streams(data), None)], batch_size=8, seq_len=SEQ, seed=0)
    names = [n for _ in range(40) for n in loader.next_batch()["streams"]]
    assert abs(names.count("a") / len(names) - 0.7) < 0.05
    assert abs(names.count("b") / len(names) - 0.3) < 0.05


def test_curriculum_switches_at_the_boundary_and_resumes(data):
    def make():
        first = Phase([_streams(data)[0]], Time(8 * SEQ * 3, "tok"))  # 3 batches of stream a
        return MixtureLoader([first, Phase([_streams(data)[1]], None)], batch_size=8, seq_len=SEQ, seed=5)

    loader = make()
    batches = [loader.next_batch() for _ in range(3)]
    assert all(set(b["streams"]) == {"a"} for b in batches)
    state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint holds
    after = [loader.next_batch() for _ in range(4)]
    assert all(set(b["streams"]) == {"b"} and b["phase"] == 1 for b in after)
    resumed = make()
    resumed.load_state_dict(state)
    again = [resumed.next_batch() for _ in range(4)]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(after, again))


# ---- the step ---------------------------------------------------------------------------------------------------
def test_chunked_loss_equals_cross_entropy_and_never_holds_full_logits(monkeypatch):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 10, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 300, (3, 10), generator=g)
    labels[1, 4:] = -100
    rows = []
    for fn in ("log_softmax", "softmax"):
        real = getattr(torch, fn)
        monkeypatch.setattr(torch, fn, lambda x, *a, real=real, **k: (rows.append(x.shape[0]), real(x, *a, **k))[1])
    got = chunked_cross_entropy_sum(h, w, labels, chunk_rows=7)
    got.backward()
    assert max(rows) == 7  # 30 positions, never more than one chunk of logits at a time
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = torch.nn.functional.cross_entropy((h @ w.T).reshape(-1, 300), shift_labels(labels).reshape(-1),
                                            ignore_index=-100, reduction="sum")
    ref.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


def test_the_fp32_chunked_loss_is_exact_for_targets_the_model_rules_out():
    """The fp32 training loss is -log softmax[target]; a target with probability under 1e-30 is recomputed by
    log-softmax, so a confident wrong prediction gives its true loss (here about 200 nats), not log(0)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g)
    w[7] = h.detach()[0, 2] * 40.0  # position 2 of row 0 puts nearly all its mass on token 7
    w.requires_grad_(True)
    labels = torch.randint(8, 50, (2, 6), generator=g)
    got = chunked_cross_entropy_sum(h, w, labels, chunk_rows=5)
    ref = torch.nn.functional.cross_entropy((h @ w.T).reshape(-1, 50), shift_labels(labels).reshape(-1),
                                            ignore_index=-100, reduction="none")
    assert ref.max() > 100
    torch.testing.assert_close(got, ref.sum())
    gh, gw = torch.autograd.grad(got, (h, w))
    rh, rw = torch.autograd.grad(ref.sum(), (h, w))
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_loss_under_no_grad_runs_only_the_forward_product(dtype):
    """An evaluation (torch.no_grad, parameters that require grad) pays one head product per chunk, not three."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountProducts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm_, torch.ops.aten.addmm):
                self.n += 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 12, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 300, (2, 12), generator=g)
    with torch.no_grad(), CountProducts() as counted:
        loss = chunked_cross_entropy_sum(h, w, labels, chunk_rows=8, compute_dtype=dtype)
    assert counted.n == 3  # 24 positions in 3 chunks: the logits' product only
    with CountProducts() as counted:
        again = chunked_cross_entropy_sum(h, w, labels, chunk_rows=8, compute_dtype=dtype)
    assert counted.n == 9 and again.requires_grad and not loss.requires_grad
    torch.testing.assert_close(loss, again.detach())


def test_gradient_accumulation_equals_one_big_batch(data, tmp_path):
    """Token losses are divided by the whole batch's token count, so micro-batching leaves the cross-entropy
    gradient unchanged. (The load-balancing loss is a product of per-batch means, computed per micro-batch as
    LLM Foundry does, so it is switched off here.)"""
    results = []
    model = dict(TINY_MODEL, ffn_config={"ffn_hidden_size": 24, "moe_loss_weight": 0.0})
    for micro in (8, 2):
        cfg = run_config(data, tmp_path, save_folder=None, device_train_microbatch_size=micro, model=model)
        trainer = Trainer(load_config(None, base=cfg), log=lambda *_: None)
        loss, aux, _ = trainer.backward_batch(trainer.loader.next_batch())
        results.append((loss, aux, [p.grad.clone() for p in trainer.model.parameters()]))
    assert abs(results[0][0] - results[1][0]) < 1e-6
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("threshold", [1e-3, 1e6])
def test_a_step_clips_as_clip_grad_norm_does(data, tmp_path, threshold):
    """The step skips the multiply by 1.0 under the threshold; above it, clipping is clip_grad_norm_'s."""
    clip = {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": threshold}}
    cfg = load_config(None, base=run_config(data, tmp_path, save_folder=None, algorithms=clip))
    ours, ref = Trainer(cfg, log=lambda *_: None), Trainer(cfg, log=lambda *_: None)
    batch = ours.loader.next_batch()
    row = ours.train_step(batch)
    ref.backward_batch(batch)
    norm = torch.nn.utils.clip_grad_norm_(ref.model.parameters(), threshold).item()
    ref.optimizer.step()
    assert row["grad_norm"] == norm and (norm > threshold) == (threshold < 1)
    for a, b in zip(ours.model.parameters(), ref.model.parameters()):
        assert torch.equal(a, b)


# ---- runs -------------------------------------------------------------------------------------------------------
def test_a_run_learns_and_writes_metrics_plot_checkpoints_and_hf_export(data, tmp_path):
    save = tmp_path / "run"
    summary = Trainer(load_config(None, base=run_config(data, save, max_duration="16ba")), log=lambda *_: None).fit()
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 17))
    assert {"step", "tokens", "loss", "lr", "lb_loss", "grad_norm", "tokens_per_s", "mfu", "expert_share_max",
            "expert_share_min"} <= set(train[0])
    assert train[-1]["tokens"] == 16 * 8 * SEQ
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert any("eval_loss" in r for r in rows) and summary["eval_loss"] is not None
    assert (save / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (save / "checkpoints").iterdir()) == [f"ba{i:08d}" for i in (2, 4, 6, 8, 10, 12, 14, 16)]
    # The export loads here and in transformers, with the same logits.
    import transformers

    ours = DbrxForCausalLM.from_pretrained(save / "hf")
    hf = transformers.DbrxForCausalLM.from_pretrained(save / "hf").eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() < 1e-4
    assert (save / "hf" / "tokenizer.json").exists()


def test_existing_checkpoints_need_autoresume(data, tmp_path):
    cfg = run_config(data, tmp_path / "run", max_duration="2ba")
    Trainer(load_config(None, base=cfg), log=lambda *_: None).fit()
    with pytest.raises(ConfigError, match="autoresume"):
        Trainer(load_config(None, base=cfg), log=lambda *_: None).fit()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    cfg = load_config(None, base=run_config(data, tmp_path / "run", max_duration="4ba"))
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.max_steps = 2
    trainer.fit()
    good = trainer.newest_checkpoint()
    with torch.no_grad():
        trainer.model.transformer.blocks[0].norm_attn_norm.attn.Wqkv.weight.fill_(float("nan"))
    trainer.max_steps = 4
    with pytest.raises(TrainingError, match=f"non-finite loss at step 3.*{good.name}"):
        trainer.fit()
    assert trainer.newest_checkpoint() == good
    DbrxForCausalLM.from_pretrained(tmp_path / "run" / "hf")  # the export of the good step is intact


def _launch(config_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dbrx.cli", "train", str(config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_then_autoresume_equals_an_uninterrupted_run(data, tmp_path):
    def write(name, **extra):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(run_config(data, tmp_path / name, max_duration="12ba", autoresume=True,
                                                  eval_interval="6ba", **extra)))
        return path

    straight = _launch(write("straight"))
    assert straight.wait(timeout=600) == 0, straight.stdout.read()

    killed_cfg = write("killed")
    proc = _launch(killed_cfg)
    ckpt = tmp_path / "killed" / "checkpoints" / "ba00000004"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists()
    assert not (tmp_path / "killed" / "checkpoints" / "ba00000012").exists()  # it really was interrupted
    resumed = _launch(killed_cfg)
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert "resumed from" in out

    def losses(name):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return {(r["step"], k): r[k] for r in rows for k in ("loss", "eval_loss") if k in r}

    a, b = losses("straight"), losses("killed")
    assert a.keys() == b.keys() and len(a) == 12 + 2
    for key in a:
        assert abs(a[key] - b[key]) <= 1e-5, key


def test_an_unfinished_checkpoint_is_ignored_by_autoresume(data, tmp_path):
    cfg = run_config(data, tmp_path / "run", max_duration="4ba", autoresume=True)
    Trainer(load_config(None, base=cfg), log=lambda *_: None).fit()
    partial = tmp_path / "run" / "checkpoints" / ".ba00000006.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    trainer = Trainer(load_config(None, base=dict(cfg, max_duration="6ba")), log=lambda *_: None)
    assert trainer.newest_checkpoint().name == "ba00000004"
    trainer.fit()
    assert trainer.step == 6


@pytest.mark.parametrize("column_major", [False, True])
def test_chunked_loss_in_bf16_matches_the_bf16_reference(column_major):
    """The amp_bf16 path (bf16 matmuls, one softmax kernel, kept buffers), for both layouts of the head."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 700, generator=g).t() if column_major else torch.randn(700, 24, generator=g)
    w.requires_grad_(True)
    h = torch.randn(2, 40, 24, generator=g, requires_grad=True)
    labels = torch.randint(0, 700, (2, 40), generator=g)
    got = chunked_cross_entropy_sum(h, w, labels, chunk_rows=16, compute_dtype=torch.bfloat16)
    got.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    logits = (h.bfloat16() @ w.bfloat16().T).float().reshape(-1, 700)
    ref = torch.nn.functional.cross_entropy(logits, shift_labels(labels).reshape(-1), ignore_index=-100,
                                            reduction="sum")
    ref.backward()
    assert abs(got.item() - ref.item()) / ref.item() < 1e-3
    assert (gh - h.grad).abs().max() / h.grad.abs().max() < 2e-2
    assert (gw - w.grad).abs().max() / w.grad.abs().max() < 2e-2


def test_lr_multipliers_give_named_parameters_their_own_lr():
    from dbrx.train.trainer import build_optimizer

    model = DbrxForCausalLM(dbrx_config("A"))
    opt = build_optimizer(model, {"name": "decoupled_adamw", "lr": 1e-3, "weight_decay": 1e-5,
                                  "lr_multipliers": {"transformer.wte": 30}})
    base, emb = opt.param_groups
    assert base["lr"] == 1e-3 and emb["lr"] == pytest.approx(3e-2)
    assert emb["params"] == [model.transformer.wte.weight]
    # decoupled: every group decays by weight_decay * (its lr / its initial lr), whatever its lr
    assert base["lr"] * base["weight_decay"] == pytest.approx(1e-5)
    assert emb["lr"] * emb["weight_decay"] == pytest.approx(1e-5)
    with pytest.raises(ConfigError, match="transformer.wt names no trainable parameter"):
        build_optimizer(model, {"name": "adamw", "lr": 1e-3, "lr_multipliers": {"transformer.wt": 2}})


def test_an_amp_bf16_run_on_tiny_shapes(data, tmp_path):
    """amp_bf16 explicitly, at shapes small enough to be quick where bf16 matmul is emulated (AVX2): the weights
    and optimizer stay fp32, the loss is finite and falls, and the log names the precision."""
    from contextlib import nullcontext

    from dbrx.perf import BF16_WARN_SLOWDOWN, machine_profile

    logs = []
    cfg = run_config(data, tmp_path / "run", precision="amp_bf16", max_duration="6ba", save_folder=None)
    with pytest.warns(UserWarning) if machine_profile().bf16_speedup * BF16_WARN_SLOWDOWN < 1 else nullcontext():
        trainer = Trainer(load_config(None, base=cfg), log=logs.append)
    first = trainer.backward_batch(trainer.loader.next_batch())[0]
    trainer.model.zero_grad(set_to_none=True)
    summary = trainer.fit()
    assert trainer.amp and {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert np.isfinite(summary["loss"]) and summary["loss"] < first
    assert any("precision amp_bf16" in line for line in logs)



def test_icl_tasks_run_at_eval_interval_into_metrics_and_tensorboard(data, tmp_path):
    """Foundry's icl_tasks in a training YAML: scored at every evaluation (Foundry's metric names), logged to
    metrics.jsonl and TensorBoard; a mistake in them stops the run before it starts."""
    rows = [{"query": f"Item {i}: pick one.", "choices": ["red", "green blue"], "gold": i % 2} for i in range(6)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = [{"label": "colors", "dataset_uri": str(tmp_path / "mc.jsonl"), "icl_task_type": "multiple_choice",
              "num_fewshot": [0, 1]}]
    gauntlet = {"weighting": "EQUAL", "subtract_random_baseline": True, "rescale_accuracy": True,
                "categories": [{"name": "toy", "benchmarks": [{"name": "colors", "num_fewshot": 1,
                                                               "random_baseline": 0.5}]}]}
    model = dict(TINY_MODEL, vocab_size=100352)  # the eval prompts are cl100k text
    save = tmp_path / "run"
    cfg = run_config(data, save, model=model, max_duration="4ba", save_interval="4ba", eval_interval="2ba",
                     icl_tasks=tasks, eval_gauntlet=gauntlet, loggers={"tensorboard": {}})
    Trainer(load_config(None, base=cfg), log=lambda *_: None).fit()
    logged = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    icl = [r for r in logged if "metrics/colors/0-shot/InContextLearningMultipleChoiceAccuracy" in r]
    assert [r["step"] for r in icl] == [2, 4]
    assert {"metrics/colors/1-shot/InContextLearningMultipleChoiceAccuracy", "metrics/colors/0-shot/lm_eval_acc",
            "icl/metrics/eval_gauntlet/toy", "icl/metrics/eval_gauntlet/default_average"} <= set(icl[0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(save / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("icl/metrics/eval_gauntlet/default_average")] == [2, 4]
    with pytest.raises(ConfigError, match="mc.jsonl:1"):  # a malformed task file: named before training
        (tmp_path / "mc.jsonl").write_text("{not json\n")
        Trainer(load_config(None, base=cfg), log=lambda *_: None)
    code = [{"label": "code", "dataset_uri": str(Path(__file__).parent / "data" / "code_eval_rows.jsonl"),
             "icl_task_type": "code_evaluation", "num_fewshot": [0]}]
    with pytest.raises(ConfigError, match="allow_code_execution: true"):  # programs run only when asked for
        Trainer(load_config(None, base=dict(cfg, icl_tasks=code)), log=lambda *_: None)
