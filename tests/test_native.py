"""dbrx.native: the int4 C kernel against the dequantised product and the fp32 row kernel against torch's product,
in each loop the machine can run, and in the model (one token, a few rows, a prefill; compile_decode's candidates,
the head's layout); without a compiler, torch's kernels stay."""

from __future__ import annotations

import copy
import platform
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dbrx import DbrxForCausalLM, generate, native
from dbrx.quant import NATIVE_ROWS, QuantConfig, QuantWeights, quantize

from tests.conftest import dbrx_config

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler to build dbrx.native")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _loops() -> dict[str, tuple[str, ...]]:
    """Builds of the kernel this machine runs: the native one, and on x86 the AVX2 and plain C loops."""
    loops = {"native": native.FLAGS}
    if platform.machine() in ("x86_64", "AMD64"):
        loops["plain"] = tuple(f if f != "-march=native" else "-march=x86-64" for f in native.FLAGS)
        if {"avx2", "fma"} <= _cpu_flags():
            loops["avx2"] = tuple(f if f != "-march=native" else "-march=x86-64-v3" for f in native.FLAGS)
    return loops


def _tolerance(lib) -> float:
    """bf16 activations (the AVX512-BF16 loop) round each input to 8 bits; the fp32 loops only sum differently."""
    return 2e-2 if native.isa(lib)[1] == "bfloat16" else 2e-6


@pytest.mark.parametrize("loop", sorted(_loops()))
def test_each_loop_computes_the_dequantised_product_of_each_chosen_matrix(loop):
    lib = native.library(_loops()[loop])
    assert lib is not None
    g = torch.Generator().manual_seed(0)
    # groups whose half is a whole number of vector steps, shorter than one, and with a remainder; odd row counts
    for E, O, I, group in [(3, 37, 40, 128), (2, 130, 96, 32), (4, 67, 512, 128), (2, 9, 72, 12), (1, 5, 320, 80)]:
        w = QuantWeights.quantized(torch.randn(E, O, I, generator=g) * 0.1, QuantConfig(4, group), "dequantize")
        x = torch.randn(3, I, generator=g)
        idx = torch.tensor([E - 1, 0, E // 2])
        want = torch.stack([x[k] @ w.dequantized(int(idx[k])).t() for k in range(3)])
        got = native.int4_rows(x, w.q, native.kernel_scales(w.sz), w.group_size, idx, lib=lib)
        torch.testing.assert_close(got, want, rtol=0, atol=_tolerance(lib) * want.abs().max().item())
        one = native.int4_rows(x[:1], w.q[:1], native.kernel_scales(w.sz[:1]), w.group_size, None, lib=lib)
        torch.testing.assert_close(one, x[:1] @ w.dequantized(0).t(), rtol=0,
                                   atol=_tolerance(lib) * want.abs().max().item())


@pytest.mark.parametrize("loop", sorted(_loops()))
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_each_loop_runs_a_tokens_experts_in_one_call(loop, act):
    lib = native.library(_loops()[loop])
    g = torch.Generator().manual_seed(1)
    E, Fh, D = 5, 72, 96
    w1, v1 = (QuantWeights.quantized(torch.randn(E, Fh, D, generator=g) * 0.1, QuantConfig(4, 32), "dequantize")
              for _ in range(2))
    w2 = QuantWeights.quantized(torch.randn(E, D, Fh, generator=g) * 0.1, QuantConfig(4, 24), "dequantize")
    x = torch.randn(1, D, generator=g)
    weights, experts = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([4, 1, 2])
    fn = {"silu": F.silu, "gelu": F.gelu}[act]
    want = sum(wt * ((fn(x @ w1.dequantized(e).t()) * (x @ v1.dequantized(e).t())) @ w2.dequantized(e).t())
               for e, wt in zip(experts.tolist(), weights.tolist()))
    args = [(w.q, native.kernel_scales(w.sz), w.group_size) for w in (w1, v1, w2)]
    got = native.int4_experts(x, weights, experts, *args, act, lib=lib)
    torch.testing.assert_close(got, want, rtol=0, atol=_tolerance(lib) * want.abs().max().item())
    assert native.int4_experts(x.bfloat16(), weights, experts, *args, act, lib=lib).dtype == torch.bfloat16


def _tiny_int4_model():
    torch.manual_seed(0)
    model = DbrxForCausalLM(dbrx_config("C")).eval()  # d_model 96, width 40: groups of 96 and 40
    quantize(model, QuantConfig(4, 128, ("attention", "lm_head")))
    return model


def _use(model, kernel):
    for module in model.modules():
        if isinstance(module, QuantWeights):
            module.use_kernel(kernel)


def test_the_quantised_model_on_the_native_kernel_matches_dequantise_and_matmul():
    model = _tiny_int4_model()
    reference = copy.deepcopy(model)
    _use(reference, "dequantize")
    _use(model, "native")
    assert "C int4 kernel" in model.lm_head.weights.describe()
    tol = _tolerance(native.library())
    prompt = [3, 17, 101, 5, 9, 44, 2, 60, 71, 8, 12]
    with torch.inference_mode():
        for n in (1, 3, NATIVE_ROWS + 1):  # one token (the experts in one call), a few rows, dequantise + matmul
            ids = torch.tensor([prompt[:n]])
            want, got = reference(ids).logits, model(ids).logits
            torch.testing.assert_close(got, want, rtol=0, atol=2 * tol * want.abs().max().item())
    tokens = generate(model, prompt, 6)  # decoding: one token through each layer's experts at a time
    assert len(tokens) == 6
    if tol < 1e-3:  # fp32 activations: the same greedy tokens as dequantise + matmul
        assert tokens == generate(reference, prompt, 6)
    keys = set(reference.state_dict())
    assert set(model.state_dict()) == keys  # kernel buffers are not saved


def test_compile_decode_times_the_native_kernel_for_int4_parts():
    from dbrx.kernels import compile_decode, undo_compile_decode

    model = _tiny_int4_model()
    chosen = compile_decode(model, log=lambda _: None, steps=2, tries=1)
    assert "native " in chosen["experts"] and "native " in chosen["lm_head"]  # every candidate was timed
    undo_compile_decode(model)
    assert not any(isinstance(m, QuantWeights) and m.kernel == "compiled" for m in model.modules())


def test_without_a_compiler_torch_kernels_stay(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DBRX_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setattr(native, "_LIBRARIES", {})
    with pytest.warns(UserWarning, match="C kernels are unavailable"):
        assert native.library() is None
    with pytest.raises(RuntimeError, match="no-such-cc"):
        native.build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not per matrix
        w = QuantWeights.quantized(torch.randn(2, 16, 64), QuantConfig(4, 32))
        assert not w.native() and w.kernel in ("packed", "dequantize")
    with pytest.raises(ValueError, match="native kernel takes int4 codes"):
        w.use_kernel("native")
    assert not list(tmp_path.rglob("*.so"))


def test_a_build_is_kept_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("DBRX_KERNEL_CACHE", str(tmp_path))
    path = native.build()
    assert path.parent == tmp_path and path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == stamp  # same source, compiler, flags, CPU
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("loop", sorted(_loops()))
def test_each_loop_computes_fp32_rows(loop):
    lib = native.library(_loops()[loop])
    g = torch.Generator().manual_seed(2)
    for O, I in [(1, 1), (7, 40), (130, 96), (67, 515)]:  # rows past a multiple of four, inputs past a vector step
        w, x = torch.randn(O, I, generator=g), torch.randn(2, I, generator=g)
        want = x @ w.t()
        torch.testing.assert_close(native.f32_rows(x, w, lib=lib), want, rtol=0, atol=2e-6 * I)


def test_the_native_head_and_attention_in_fp32_and_the_heads_layout_restored():
    from dbrx.generate import decode_one_token, prefill
    from dbrx.kernels import NativeRowLinear, _parts, compile_decode, undo_compile_decode
    from dbrx.model import KVCache

    torch.manual_seed(0)
    model = DbrxForCausalLM(dbrx_config("B")).eval()
    model.relayout_lm_head(column_major=True)  # as loading may lay it out
    prompt = [3, 17, 101, 5, 9]
    with torch.inference_mode():
        want = model(torch.tensor([prompt])).logits[0, -1]
    chosen = compile_decode(model, log=lambda _: None, steps=2, tries=1)
    assert "native " in chosen["lm_head"] and "native " in chosen["attention"]  # timed beside the others
    undo_compile_decode(model)
    apply, undo = _parts(model)["lm_head"]["native"]
    for fn in apply:
        fn()
    assert isinstance(model.lm_head, NativeRowLinear) and model.lm_head.weight.is_contiguous()  # row-major for it
    cache = KVCache(model.config, 1, 8, torch.float32, "cpu")
    with torch.inference_mode():
        prefill(model, torch.tensor([prompt[:-1]]), cache, None)
        got = decode_one_token(model, torch.tensor([prompt[-1]]), cache, len(prompt) - 1, None)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for fn in undo:
        fn()
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.stride(0) == 1  # column-major again
    apply, undo = _parts(model)["lm_head"]["compiled"]  # the compiled reduction reads rows too
    for fn in apply:
        fn()
    assert model.lm_head.weight.is_contiguous()
    undo_compile_decode(model)  # so does undoing everything
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.stride(0) == 1


def test_shapes_and_layouts_are_checked_before_the_c_code_reads_memory():
    w = QuantWeights.quantized(torch.randn(2, 16, 64), QuantConfig(4, 32), "dequantize")
    sc = native.kernel_scales(w.sz)
    with pytest.raises(ValueError, match="int4 codes"):
        native.int4_rows(torch.randn(1, 32), w.q, sc, 32, torch.tensor([0]))  # inputs of 32 for rows of 64
    with pytest.raises(ValueError, match="kernel scales"):
        native.int4_rows(torch.randn(1, 64), w.q, sc[:1], 32, torch.tensor([0]))
    with pytest.raises(ValueError, match="no index"):
        native.int4_rows(torch.randn(1, 64), w.q, sc, 32, None)
    with pytest.raises(ValueError, match="row-major"):
        native.f32_rows(torch.randn(1, 8), torch.randn(8, 5).t())
