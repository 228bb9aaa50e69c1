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
from dbrx.kernels import (CompiledRowLinear, MvRowLinear, _float_experts_kernel, compile_decode, compiled,
                          rows_product, undo_compile_decode)
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
    assert set(chosen) - {"together"} == {"experts", "attention", "lm_head"}
    picked = [p for p in ("experts", "attention", "lm_head") if not chosen[p].startswith("eager (")]
    assert ("together" in chosen) == bool(picked)  # what was picked part by part is timed again, together
    assert all(v.startswith(("compiled (decode step", "eager (decode step", "mv (decode step", "eager, dropped"))
               for k, v in chosen.items() if k != "together")
    assert chosen["lm_head"].startswith({nn.Linear: "eager", CompiledRowLinear: "compiled",
                                         MvRowLinear: "mv"}[type(model.lm_head)])
    assert "mv " in chosen["attention"] and "compiled " in chosen["experts"]  # every candidate was timed
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
