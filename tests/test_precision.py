"""Precision that follows the hardware: `auto` measures fp32 and bf16 and chooses, an explicit bf16 where bf16 is
emulated warns with the figures, and bf16 weights on such a machine compute their experts in fp32."""

import json

import pytest
import torch

from conftest import dbrx_config, randomize_
from dbrx import DbrxForCausalLM, perf


def fake_machine(monkeypatch, fp32_gflops: float, bf16_gflops: float, fp32_matvec=5e9, bf16_matvec=5e9):
    """Pretend to be a machine with these figures (an AMX Xeon, an AVX2-only EPYC, ...)."""
    profile = perf.MachineProfile("cpu", "Test CPU", "AVX2", 2, fp32_gflops * 1e9, bf16_gflops * 1e9, 20e9)
    monkeypatch.setattr(perf, "machine_profile", lambda device="cpu": profile)
    flops = {torch.float32: fp32_gflops * 1e9, torch.bfloat16: bf16_gflops * 1e9, torch.float16: bf16_gflops * 1e9}
    monkeypatch.setattr(perf, "matmul_flops", lambda dtype=torch.float32, device="cpu", seconds=0.1: flops[dtype])
    rates = {torch.float32: fp32_matvec, torch.bfloat16: bf16_matvec}
    monkeypatch.setattr(perf, "matvec_rate", lambda dtype, device="cpu", column_major=False, *a: rates[dtype])


@pytest.mark.parametrize("fp32,bf16,expected", [(250, 800, "amp_bf16"), (100, 0.8, "fp32"), (200, 240, "fp32")])
def test_auto_training_precision_follows_the_measured_matmul(monkeypatch, fp32, bf16, expected):
    fake_machine(monkeypatch, fp32, bf16)
    logs = []
    assert perf.choose_training_precision("auto", "cpu", logs.append) == expected
    assert f"precision auto: {expected}" in logs[0]
    assert f"bf16 matmul {bf16:,.1f} GFLOP/s, fp32 {fp32:,.1f} GFLOP/s" in logs[0]  # both figures, logged


def test_explicit_bf16_on_emulated_bf16_warns_with_the_figures_and_the_fix(monkeypatch):
    fake_machine(monkeypatch, 100, 0.8)
    with pytest.warns(UserWarning, match=r"125x slower than fp32 \(bf16 matmul 0.8 GFLOP/s, fp32 100.0.*"
                                         r"precision: auto"):
        assert perf.choose_training_precision("amp_bf16", "cpu", lambda _: None) == "amp_bf16"
    fake_machine(monkeypatch, 100, 30)  # 3x slower: below the warning threshold, the user's choice stands
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert perf.choose_training_precision("amp_bf16", "cpu", lambda _: None) == "amp_bf16"
        assert perf.choose_training_precision("fp32", "cpu", lambda _: None) == "fp32"


def test_auto_inference_dtype_follows_decode_speed_and_memory(monkeypatch):
    fake_machine(monkeypatch, 250, 800, fp32_matvec=8e9, bf16_matvec=6e9)  # native bf16, yet fp32 decodes faster
    logs = []
    assert perf.choose_inference_dtype("auto", "cpu", torch.bfloat16, 10**9, 64 * 2**30, logs.append) == torch.float32
    assert "dtype auto: float32" in logs[0] and "float32 8.00 G, bfloat16 6.00 G" in logs[0]
    # fp32 weights would not fit: bf16 stays in memory.
    assert perf.choose_inference_dtype("auto", "cpu", torch.bfloat16, 10**10, 30 * 2**30, logs.append) == torch.bfloat16
    assert "would not fit" in logs[-1]
    fake_machine(monkeypatch, 250, 800, fp32_matvec=5e9, bf16_matvec=9e9)  # bf16 streams 1.8x the weights
    assert perf.choose_inference_dtype("auto", "cpu", torch.float32, 10**9, 64 * 2**30, logs.append) == torch.bfloat16
    # Explicit and stored dtypes are kept; an explicit bf16 on emulated bf16 says what it costs.
    fake_machine(monkeypatch, 100, 0.8)
    assert perf.choose_inference_dtype("stored", "cpu", torch.float16, 1, None, logs.append) == torch.float16
    assert perf.choose_inference_dtype(None, "cpu", None, 1, None, logs.append) == torch.float32
    assert perf.choose_inference_dtype("bfloat16", "cpu", torch.float32, 1, None, logs.append) == torch.bfloat16
    assert "125x slower" in logs[-1] and "--dtype auto" in logs[-1]


def test_auto_inference_dtype_keeps_its_measurement_per_machine(monkeypatch, tmp_path):
    """Measured once per machine and kept: on a shared VM the two rates sat either side of the threshold from one run
    to the next, and the same command chose fp32, then bf16, and printed different text."""
    monkeypatch.delenv("DBRX_MACHINE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kept = tmp_path / "dbrx" / "machine.json"
    fake_machine(monkeypatch, 250, 800, fp32_matvec=8e9, bf16_matvec=6e9)
    logs = []
    assert perf.choose_inference_dtype("auto", "cpu", torch.float32, 10**9, None, logs.append) == torch.float32
    assert f"measured now, kept in {kept}" in logs[-1] and kept.exists()
    fake_machine(monkeypatch, 250, 800, fp32_matvec=5e9, bf16_matvec=9e9)  # the next run measures otherwise
    assert perf.choose_inference_dtype("auto", "cpu", torch.float32, 10**9, None, logs.append) == torch.float32
    assert "float32 8.00 G, bfloat16 6.00 G, measured 20" in logs[-1] and f"kept in {kept}" in logs[-1]
    # another machine (here: another thread count) is measured for itself, beside the first
    profile = perf.MachineProfile("cpu", "Test CPU", "AVX2", 4, 250e9, 800e9, 20e9)
    monkeypatch.setattr(perf, "machine_profile", lambda device="cpu": profile)
    assert perf.choose_inference_dtype("auto", "cpu", torch.float32, 10**9, None, logs.append) == torch.bfloat16
    assert "measured now" in logs[-1] and len(json.loads(kept.read_text())) == 2
    # an unreadable file is measured again and rewritten; DBRX_MACHINE_CACHE names another file, or "off"
    kept.write_text("{not json")
    assert perf.choose_inference_dtype("auto", "cpu", torch.float32, 10**9, None, logs.append) == torch.bfloat16
    assert "measured now" in logs[-1] and len(json.loads(kept.read_text())) == 1
    monkeypatch.setenv("DBRX_MACHINE_CACHE", str(tmp_path / "elsewhere.json"))
    perf.choose_inference_dtype("auto", "cpu", torch.float32, 10**9, None, logs.append)
    assert (tmp_path / "elsewhere.json").exists()
    monkeypatch.setenv("DBRX_MACHINE_CACHE", "off")
    perf.choose_inference_dtype("auto", "cpu", torch.float32, 10**9, None, logs.append)
    assert "measured now;" in logs[-1] and "kept" not in logs[-1]


def test_the_machine_is_measured_quickly_and_once():
    p = perf.machine_profile("cpu")
    assert p.fp32_flops > 1e8 and p.bf16_flops > 1e7 and p.bandwidth > 1e8 and p.threads >= 1
    assert perf.machine_profile("cpu") is p  # cached for the process
    text = p.describe()
    assert p.capability in text and "GFLOP/s" in text and "GB/s" in text


def test_bf16_weights_on_emulated_bf16_compute_the_experts_in_fp32(monkeypatch):
    """The compute path follows the hardware: where bf16 matmul is emulated, bf16 experts run the loop in fp32
    (no grouped_mm); both paths stay as close to the fp32 model as bf16 allows."""
    torch.manual_seed(0)
    ref = DbrxForCausalLM(dbrx_config("C")).eval()  # default init: routing is not on a knife's edge in bf16
    bf16 = DbrxForCausalLM(dbrx_config("C")).eval()
    bf16.load_state_dict(ref.state_dict())
    bf16.to(torch.bfloat16)
    ids = torch.randint(0, 211, (2, 21), generator=torch.Generator().manual_seed(2))
    calls = []
    real = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        want = ref(ids).logits
        monkeypatch.setattr(perf, "bf16_is_slow", lambda device="cpu", dtype=torch.bfloat16: False)
        native = bf16(ids).logits.float()
        assert calls  # bf16 is fast: the grouped products run in bf16
        calls.clear()
        monkeypatch.setattr(perf, "bf16_is_slow", lambda device="cpu", dtype=torch.bfloat16: True)
        emulated = bf16(ids).logits.float()
    assert not calls
    assert bf16.transformer.blocks[0].ffn.experts.mlp.compute_dtype(torch.zeros(1, 1, dtype=torch.bfloat16)) \
        == torch.float32
    err_native, err_emulated = (native - want).abs().max(), (emulated - want).abs().max()
    scale = want.abs().max()
    assert err_emulated < 0.03 * scale and err_native < 0.03 * scale
    assert not torch.equal(native, emulated)  # the two paths really differ


def test_loading_chooses_the_faster_head_layout_and_logits_do_not_depend_on_it(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = DbrxForCausalLM(dbrx_config("B"))
    randomize_(model, 3)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 157, (1, 9), generator=torch.Generator().manual_seed(4))
    logits = {}
    for column_major in (False, True):
        monkeypatch.setattr("dbrx.checkpoint.column_major_head_is_faster", lambda w, c=column_major: c)
        loaded = DbrxForCausalLM.from_pretrained(tmp_path)
        assert (loaded.lm_head.weight.stride(0) == 1) == column_major
        with torch.no_grad():
            logits[column_major] = loaded(ids).logits
    torch.testing.assert_close(logits[False], logits[True], rtol=1e-6, atol=1e-6)
    w = torch.randn(300, 24)
    assert perf.column_major_head_is_faster(w) in (True, False)  # measured on the real weight


@pytest.mark.parametrize("fp32_faster", [True, False])
def test_attention_under_amp_bf16_runs_in_the_dtype_measured_faster(monkeypatch, tmp_path, fp32_faster):
    """The trainer asks perf which attention dtype is faster at its shape (measured, never assumed) and sets it;
    fp32 attention under bf16 autocast gives the bf16 run's loss to bf16 precision."""
    from dbrx.train.config import load_config
    from dbrx.train.trainer import Trainer
    from test_train import run_config, write_tokens

    calls = []

    def measured(*shape):
        calls.append(shape)
        return fp32_faster, 1.0, 2.0

    monkeypatch.setattr(perf, "sdpa_upcast_is_faster", measured)
    write_tokens(tmp_path / "data" / "train", 16, seed=1)
    root = tmp_path
    logs = []
    trainer = Trainer(load_config(None, base=run_config(root, root / "run", save_folder=None, eval_loader=None,
                                                        precision="amp_bf16")), log=logs.append)
    attn = trainer.model.transformer.blocks[0].norm_attn_norm.attn
    assert calls and attn.sdpa_dtype == (torch.float32 if fp32_faster else None)
    assert any(f"attention under amp_bf16: {'fp32' if fp32_faster else 'bf16'}" in line for line in logs)
    batch = trainer.loader.next_batch()
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        ours = trainer.micro_batch_loss(ids, labels)[0].item()
        trainer.model.set_attention_dtype(None if fp32_faster else torch.float32)
        other = trainer.micro_batch_loss(ids, labels)[0].item()
    assert abs(ours - other) <= 1e-2 * abs(ours)
