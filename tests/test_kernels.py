"""Compiled batch-1 decoding kernels (dbrx.kernels): the reduction computes the dequantised product (float, int8,
int4 two codes per byte, gathered experts), its compiled form agrees, and compile_decode keeps a model's logits,
tokens and state_dict while the eager path still serves batches and training."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dbrx import DbrxForCausalLM, generate
from dbrx.config import DbrxConfig
from dbrx.kernels import (CompiledRowLinear, DecodeStep, MvRowLinear, _float_experts_kernel, compile_decode,
                          compiled, rows_product, undo_compile_decode)
from dbrx.quant import QuantConfig, QuantWeights, quantize

DEVICE = os.environ.get("DBRX_TEST_DEVICE", "cpu")  # bench/gpu_check.sh runs these on cuda
TINY = DbrxConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=300, max_seq_len=64, attn_config={"kv_n_heads": 2},
                  ffn_config={"ffn_hidden_size": 96, "moe_num_experts": 6, "moe_top_k": 2})


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_the_reduction_computes_the_dequantised_product_of_each_gathered_matrix(bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 24, 96, generator=g).to(DEVICE)
    x = torch.randn(3, 96, generator=g).to(DEVICE)
    idx = torch.tensor([4, 0, 4], device=DEVICE)
    if bits:
        q = QuantWeights.quantized(w, QuantConfig(bits, 32), kernel="dequantize")
        args, kind = (q.q, q.scales), f"int{bits}"
        dense = torch.stack([q.dequantized(e) for e in range(5)])
        assert bits == 8 or q.q.shape == (5, 24, 48)  # two int4 codes per byte
    else:
        args, kind, dense = (w, None), "float", w
    want = torch.stack([dense[e] @ x[k] for k, e in enumerate(idx.tolist())])
    torch.testing.assert_close(rows_product(x, *args, kind, 32, idx), want, rtol=1e-5, atol=1e-5)
    one = rows_product(x[:1], args[0][2], None if args[1] is None else args[1][2], kind, 32, None)
    torch.testing.assert_close(one, (dense[2] @ x[0])[None], rtol=1e-5, atol=1e-5)


def _tiny_model(dtype=torch.float32, bits=0) -> DbrxForCausalLM:
    torch.manual_seed(0)
    model = DbrxForCausalLM(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.2)
    model = model.to(DEVICE, dtype)
    if bits:
        quantize(model, QuantConfig(bits, 32, ("attention", "lm_head")))
    return model


def _all_compiled(model) -> None:
    """Every part on the compiled kernel, whatever is faster here (the tests check numerics)."""
    for module in model.modules():
        if isinstance(module, QuantWeights):
            module.use_kernel("compiled")
        if type(module) is nn.Linear:
            module.__class__ = CompiledRowLinear
        if hasattr(module, "one_token"):
            module.one_token = _float_experts_kernel


@pytest.mark.parametrize("dtype,bits", [(torch.float32, 0), (torch.bfloat16, 0), (torch.float32, 8),
                                        (torch.float32, 4)])
def test_compiled_decoding_matches_the_eager_model(dtype, bits):
    model = _tiny_model(dtype, bits)
    if bits:  # the reference: the same codes through dequantise + matmul in fp32
        for module in model.modules():
            if isinstance(module, QuantWeights):
                module.use_kernel("dequantize")
    prompt = [1, 5, 9, 33, 7]
    keys = list(model.state_dict())
    with torch.inference_mode():
        want = model(torch.tensor([prompt], device=DEVICE)).logits[0, -1].float()
    tokens = generate(model, prompt, 10)
    _all_compiled(model)
    assert list(model.state_dict()) == keys
    from dbrx.generate import decode_one_token, prefill
    from dbrx.model import KVCache

    cache = KVCache(TINY, 1, 8, dtype, DEVICE)
    with torch.inference_mode():
        prefill(model, torch.tensor([prompt[:-1]], device=DEVICE), cache, None)
        got = decode_one_token(model, torch.tensor([prompt[-1]], device=DEVICE), cache, len(prompt) - 1,
                               None)[0].float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    if dtype == torch.float32:
        assert generate(model, prompt, 10) == tokens
    with torch.inference_mode():  # several rows take the eager path
        batch = model(torch.tensor([prompt, prompt], device=DEVICE)).logits[:, -1].float()
    torch.testing.assert_close(batch[1], want, rtol=tol, atol=tol * want.abs().max().item())
    undo_compile_decode(model)
    assert not any(isinstance(m, CompiledRowLinear) for m in model.modules())
    if bits:  # back to eager is back to the measured kernels: the rest is for float linear layers
        return
    for module in model.modules():  # torch.mv for the float linear layers
        if type(module) is nn.Linear:
            module.__class__ = MvRowLinear
    with torch.inference_mode():
        cache = KVCache(TINY, 1, 8, dtype, DEVICE)
        prefill(model, torch.tensor([prompt[:-1]], device=DEVICE), cache, None)
        got = decode_one_token(model, torch.tensor([prompt[-1]], device=DEVICE), cache, len(prompt) - 1,
                               None)[0].float()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    undo_compile_decode(model)
    assert not any(isinstance(m, MvRowLinear) for m in model.modules())


def test_compile_decode_keeps_what_measures_faster_and_training_stays_eager():
    model = _tiny_model()
    chosen = compile_decode(model, log=lambda _: None, steps=2, tries=1)
    assert set(chosen) - {"together", "step"} == {"experts", "attention", "lm_head"}
    assert ("step" in chosen) == (DEVICE == "cpu")  # the whole step over what was chosen, built on the CPU
    if DEVICE == "cpu":
        assert chosen["step"].startswith(("compiled (decode step", "eager (decode step")), chosen["step"]
        assert (model.decode_step is not None) == chosen["step"].startswith("compiled")
    picked = [p for p in ("experts", "attention", "lm_head") if not chosen[p].startswith("eager (")]
    assert ("together" in chosen) == bool(picked)  # what was picked part by part is timed again, together
    assert all(v.startswith(("compiled (decode step", "eager (decode step", "mv (decode step", "eager, dropped"))
               for k, v in chosen.items() if k not in ("together", "step"))
    assert chosen["lm_head"].startswith({nn.Linear: "eager", CompiledRowLinear: "compiled",
                                         MvRowLinear: "mv"}[type(model.lm_head)])
    assert "mv " in chosen["attention"] and "compiled " in chosen["experts"]  # every candidate was timed
    undo_compile_decode(model)
    assert model.decode_step is None
    _all_compiled(model)
    model.train()
    x = torch.randint(0, 300, (1, 1), device=DEVICE)
    loss = model(x).logits.float().square().mean()  # one row with autograd: the eager products
    loss.backward()
    assert model.lm_head.weight.grad is not None
    assert model.transformer.blocks[0].ffn.experts.mlp.w1.grad is not None


def test_the_compiled_experts_gather_only_the_chosen_experts():
    g = torch.Generator().manual_seed(3)
    E, Fh, D = 6, 96, 64
    w1, v1, w2 = (torch.randn(E, Fh, D, generator=g).to(DEVICE) for _ in range(3))
    x = torch.randn(1, D, generator=g).to(DEVICE)
    experts, weights = torch.tensor([5, 2], device=DEVICE), torch.tensor([0.7, 0.3], device=DEVICE)
    want = sum(wt * ((F.silu(x @ w1[e].t()) * (x @ v1[e].t())) @ w2[e]) for e, wt in zip(experts.tolist(),
                                                                                       weights.tolist()))
    with torch.inference_mode():
        got = compiled("experts_glu")(x, weights, experts, (w1, None), (v1, None), (w2, None), F.silu, "float", 0, 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def _kernels(model, kind: str) -> None:
    if kind == "compiled":
        _all_compiled(model)
    elif kind == "native":  # dbrx.native's C kernels, where they build
        from dbrx import native

        if native.library() is None:
            pytest.skip("no C compiler here")
        for module in model.modules():
            if isinstance(module, QuantWeights):
                module.use_kernel("native")


@pytest.mark.skipif(DEVICE != "cpu", reason="the compiled step is built for the CPU")
@pytest.mark.parametrize("bits,kernels", [(0, "eager"), (0, "compiled"), (4, "native")])
def test_the_compiled_step_matches_the_eager_step_at_any_position_and_cache_length(bits, kernels):
    from dbrx.generate import decode_one_token, prefill
    from dbrx.model import KVCache

    model = _tiny_model(torch.float32, bits)
    _kernels(model, kernels)
    step = DecodeStep(model)
    # the C kernel rounds activations to bf16 on CPUs with AVX512-BF16: a last-bit change before it can move a
    # product by bf16's step
    tol = 1e-5 if bits == 0 else 2e-2
    prompt = [1, 5, 9, 33, 7]
    for length in (len(prompt) + 3, TINY.max_seq_len):  # one compiled program for every cache length and slot
        caches = [KVCache(TINY, 1, length, torch.float32, DEVICE) for _ in range(2)]
        with torch.inference_mode():
            for cache in caches:
                logits = prefill(model, torch.tensor([prompt]), cache, None)
            for pos in range(len(prompt), length):
                ids = logits.argmax(-1)
                assert step.takes(ids, caches[1], pos, None)
                logits = decode_one_token(model, ids, caches[0], pos, None)  # model.decode_step is None: eager
                got = step(ids, caches[1], pos)
                torch.testing.assert_close(got, logits, rtol=tol, atol=tol * logits.abs().max().item())
        for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):  # the same slots written
            torch.testing.assert_close(b, a, rtol=tol, atol=tol * a.abs().max().item())
    if bits == 0:  # generation runs it, with the same tokens
        tokens = generate(model, prompt, 12)
        model.decode_step = step
        assert generate(model, prompt, 12) == tokens


@pytest.mark.skipif(DEVICE != "cpu", reason="the compiled step is built for the CPU")
def test_the_compiled_step_takes_only_its_own_steps_and_a_changed_model_drops_it():
    from dbrx.model import KVCache

    model = _tiny_model()
    step = model.decode_step = DecodeStep(model)
    ids, cache = torch.tensor([3]), KVCache(TINY, 1, 10, torch.float32, DEVICE)
    with torch.inference_mode():
        assert step.takes(ids, cache, 9, None)
        assert not step.takes(ids, cache, 10, None)  # past the cache
        assert not step.takes(torch.tensor([3, 4]), KVCache(TINY, 2, 10, torch.float32, DEVICE), 4, None)
        assert not step.takes(ids, cache, 4, torch.ones(1, 5, dtype=torch.long))  # padded rows: a mask
        assert not step.takes(ids, KVCache(TINY, 1, 10, torch.bfloat16, DEVICE), 4, None)
        long = KVCache(TINY, 1, TINY.max_seq_len + 1, torch.float32, DEVICE)
        assert not step.takes(ids, long, 4, None)  # longer than the model's positions
    assert not step.takes(ids, cache, 4, None)  # autograd on: the eager model
    assert step.current(model)
    calls, run = [], step._run
    step._run = lambda *a: calls.append(a[1]) or run(*a)
    generate(model, [1, 2, 3], 4)
    assert calls == [3, 4, 5]  # each step after the prefill's token
    quantize(model, QuantConfig(8, 32))  # new modules: the program holds the old weights
    assert not step.current(model)
    with pytest.warns(UserWarning, match="compile_decode again"):
        generate(model, [1, 2, 3], 4)
    assert model.decode_step is None and calls == [3, 4, 5]  # decoded eagerly, on the quantised weights
