"""Weight-only int8/int4 quantisation (dbrx.quant): the codes and scales, both kernels (torch's packed CPU kernel
and dequantise-then-matmul) agreeing, quantised experts computing what the float experts compute with the
dequantised weights, and the quality gates on the trained `make demo` checkpoint where it exists."""

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dbrx import DbrxForCausalLM, generate
from dbrx.config import DbrxConfig
from dbrx.quant import QuantConfig, QuantExperts, QuantLinear, QuantWeights, quantize, quantize_int4, quantize_int8

DEVICE = os.environ.get("DBRX_TEST_DEVICE", "cpu")  # bench/gpu_check.sh runs the products and experts on cuda
DEMO = Path(__file__).resolve().parents[1] / "runs" / "demo" / "hf"
DATA = Path(__file__).resolve().parents[1] / "runs" / "data" / "stdlib"


def test_int8_and_int4_codes_reconstruct_within_half_a_step():
    w = torch.randn(3, 40, 256, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (3, 40)
    assert ((q.float() * scale[..., None] - w).abs() <= scale[..., None] / 2 + 1e-6).all()
    q4, sz = quantize_int4(w, 64)
    assert q4.min() >= 0 and q4.max() <= 15 and sz.shape == (3, 4, 40, 2)
    scale4, zero4 = sz[..., 0].transpose(1, 2), sz[..., 1].transpose(1, 2)  # [3, 40, 4]
    deq = ((q4.view(3, 40, 4, 64).float() - 8) * scale4[..., None] + zero4[..., None]).view(3, 40, 256)
    assert ((deq - w).abs() <= scale4.repeat_interleave(64, -1) / 2 + 1e-5).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_packed_kernel_and_the_fallback_compute_the_same_product(bits, dtype):
    w = torch.randn(2, 64, 256, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    packed = QuantWeights.quantized(w, QuantConfig(bits, 128), kernel="packed" if DEVICE == "cpu" else "dequantize")
    fallback = QuantWeights.quantized(w, QuantConfig(bits, 128), kernel="dequantize")
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for e in range(2):
        want = F.linear(x.float(), fallback.dequantized(e).float())
        torch.testing.assert_close(packed.mm(x, e).float(), want, rtol=tol, atol=tol * want.abs().max().item())
        torch.testing.assert_close(fallback.mm(x, e).float(), want, rtol=tol, atol=tol * want.abs().max().item())
    assert QuantWeights.quantized(w, QuantConfig(bits, 128)).kernel in ("packed", "dequantize")  # measured


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_experts_compute_the_float_experts_on_the_dequantised_weights(bits):
    from dbrx.moe import DbrxFFN

    cfg = DbrxConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=100, max_seq_len=32,
                     attn_config={"kv_n_heads": 2}, ffn_config={"ffn_hidden_size": 96, "moe_num_experts": 6,
                                                               "moe_top_k": 2})
    torch.manual_seed(0)
    ffn = DbrxFFN(cfg).eval()
    for p in ffn.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    ffn = ffn.to(DEVICE)
    quantized = QuantExperts.from_experts(ffn.experts, QuantConfig(bits, 32))
    reference = QuantExperts.from_experts(ffn.experts, QuantConfig(bits, 32), kernel="dequantize")
    E, Fh, D = 6, 96, 64
    with torch.no_grad():  # the float experts with exactly the quantised weights
        ffn.experts.mlp.w1.copy_(torch.stack([reference.w1.dequantized(e) for e in range(E)]).view(E * Fh, D))
        ffn.experts.mlp.v1.copy_(torch.stack([reference.v1.dequantized(e) for e in range(E)]).view(E * Fh, D))
        ffn.experts.mlp.w2.copy_(torch.stack([reference.w2.dequantized(e).t() for e in range(E)]).reshape(E * Fh, D))
    x = torch.randn(7, D, device=DEVICE)
    with torch.inference_mode():
        _, weights, experts = ffn.router(x)
        for n in (1, 7):  # one token, several
            want = ffn.experts(x[:n], weights[:n], experts[:n], impl="reference")
            for q in (quantized, reference):  # the measured kernel (maybe with bf16 activations) and the fallback
                # each matrix's kernel is measured on its own shape: w2 may take bf16 activations where w1 does not
                fp32 = all(m.compute_dtype == torch.float32 for m in (q.w1, q.v1, q.w2))
                tol = 1e-5 if fp32 else 2e-2 * want.abs().max().item()
                torch.testing.assert_close(q(x[:n], weights[:n], experts[:n]), want, rtol=1e-4, atol=tol)
    with pytest.raises(RuntimeError, match="for inference"):
        quantized(x.requires_grad_(), weights, experts)


def test_quantize_a_model_in_place_with_attention_and_head_and_generate():
    torch.manual_seed(0)
    cfg = DbrxConfig.from_name("dbrx-tiny").replace(vocab_size=256, n_layers=2)
    model = DbrxForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        want = model(ids).logits
    quantized = copy.deepcopy(model)
    chosen = quantize(quantized, QuantConfig(8, include=("attention", "lm_head")))
    assert set(chosen) == {"experts", "attention", "lm_head"}
    assert isinstance(quantized.lm_head, QuantLinear)
    assert isinstance(quantized.transformer.blocks[0].norm_attn_norm.attn.Wqkv, QuantLinear)
    assert not any(p.dtype.is_floating_point and p.numel() > 256 * 128 for n, p in quantized.named_parameters()
                   if "experts" in n)
    with torch.no_grad():
        got = quantized(ids).logits
    # int8 attention moves this random tiny model's logits by 1.5-2.1% (seeds 0-3; the experts alone 0.2%)
    assert (got - want).norm() < 0.03 * want.norm()
    assert len(generate(quantized, ids[0].tolist(), 5)) == 5
    with pytest.raises(ValueError, match="only attention, lm_head"):
        QuantConfig(8, include=("router",))


@pytest.mark.skipif(not (DEMO.exists() and DATA.exists()), reason="needs `make demo`'s checkpoint and data")
def test_quality_gates_on_the_demo_checkpoint():
    """int8: held-out loss within +0.5% and >= 95% greedy-token agreement (at each of 64 prompts x 64 tokens of
    the float model's greedy continuation, the quantised model's argmax given the same context); int4 (group
    128): held-out loss within +3%."""
    from dbrx.data.mds import MDSReader
    from dbrx.data.mixture import eval_batches

    base = DbrxForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    batches = list(eval_batches(MDSReader(DATA, split="val"), 64, 64, limit=4))

    def logits_in_chunks(model, ids, rows=16):  # [rows, T, V] at a time: the full vocabulary is 100k wide
        with torch.inference_mode():
            for i in range(0, ids.shape[0], rows):
                yield i, model(ids[i:i + rows]).logits.float()

    def held_out(model):
        total, count = 0.0, 0
        for b in batches:
            for i, logits in logits_in_chunks(model, b["input_ids"]):
                labels = b["labels"][i:i + logits.shape[0], 1:]
                total += F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100,
                                         reduction="sum").item()
                count += int((labels != -100).sum())
        return total / count

    def next_tokens(model, seqs):
        return torch.cat([logits[:, 15:-1].argmax(-1) for _, logits in logits_in_chunks(model, seqs)])

    prompts = [row[:16].tolist() for row in batches[0]["input_ids"][:64]]
    seqs = torch.tensor([p + c for p, c in zip(prompts, generate(base, prompts, 64))])
    base_loss, base_next = held_out(base), next_tokens(base, seqs)
    for bits, loss_gate in ((8, 0.005), (4, 0.03)):
        model = copy.deepcopy(base)
        quantize(model, QuantConfig(bits, 128))
        assert held_out(model) <= base_loss * (1 + loss_gate), bits
        if bits == 8:
            agree = (next_tokens(model, seqs) == base_next).float().mean().item()
            assert agree >= 0.95, agree


@pytest.mark.parametrize("bits, include", [(8, ("attention", "lm_head")), (4, ())])
def test_dbrx_quantize_writes_a_checkpoint_that_loads_to_the_same_model(tmp_path, bits, include):
    import json
    import subprocess
    import sys

    torch.manual_seed(0)
    cfg = DbrxConfig.from_name("dbrx-tiny").replace(vocab_size=256, n_layers=2, ffn_config={"ffn_hidden_size": 192})
    model = DbrxForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "fp32")
    out = tmp_path / "q"
    run = [sys.executable, "-m", "dbrx", "quantize", "--model", str(tmp_path / "fp32"), "--bits", str(bits),
           "--include", ",".join(include), "--out", str(out)]
    r = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q == {"quant_method": "dbrx-weight-only", "bits": bits, "group_size": 128, "include": list(include)}
    from safetensors import safe_open

    with safe_open(out / "model-00002-of-00003.safetensors", framework="pt") as f:  # block 0
        stored = {k: f.get_tensor(k) for k in f.keys() if ".ffn.experts." in k}
    params = 3 * 16 * 192 * 128
    # int8: a byte per weight + an fp32 scale per output channel; int4: half a byte + an fp32 scale and zero per
    # group (128 along d_model, 96 along the expert width: the largest divisor of 192 below 128)
    assert sum(t.numel() * t.element_size() for t in stored.values()) <= params * (1 + 4 / 128 if bits == 8 else
                                                                                   0.5 + 8 / 96)
    loaded = DbrxForCausalLM.from_pretrained(out, dtype=torch.float32)
    in_memory = copy.deepcopy(model)
    quantize(in_memory, QuantConfig(bits, 128, include))
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, in_memory(ids).logits, rtol=0, atol=1e-5)
    assert isinstance(loaded.lm_head, QuantLinear) == ("lm_head" in include)
    r = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "exists" in r.stderr
    again = [*run[:5], str(out), *run[6:-1], str(tmp_path / "again")]
    r = subprocess.run(again, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "already quantised" in r.stderr, r.stderr
