"""Every valid config runs and matches transformers: a sweep of tiny configs whose sizes are mostly not multiples
of 4 or 8, in fp32 and bf16, for inference (logits, KV-cached decoding, the few-token MoE path) and training
(gradients), on each MoE path: torch's grouped matmul, the per-expert loop it falls back to, the reference loop.

torch's grouped matmul needs 16-byte rows (d_model and ffn_hidden_size multiples of 4 in fp32, of 8 in bf16), so
most of the sweep takes the loop. Where bf16 matmul is emulated (an AVX2-only CPU) bf16 weights compute the experts
in fp32 through the loop: both kinds of bf16 machine run here on any CPU, by setting what dbrx.perf measured.

bf16 is held to transformers in fp32 on the same (bf16-valued) weights, and to transformers in bf16. A position
that some layer routes differently is left out: where two experts' probabilities are near-tied, bf16 and fp32 can
choose differently, and transformers, which takes the softmax in bf16, ties them exactly. Such a position's output
changes by O(1) (at one position of d30, transformers' bf16 logits are 60% of the logit scale off its fp32 ones).
Shapes are tiny because emulated bf16 runs at ~1 GFLOP/s.
"""

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import transformers

from conftest import hf_config, randomize_
from dbrx import DbrxConfig, DbrxForCausalLM, KVCache, perf
from dbrx.generate import generate
from dbrx.moe import DbrxExpertGLU, DbrxExperts

# Within each config all sizes are pairwise different (see conftest), layer and head counts included. head_dim =
# d_model / n_heads: 6, 14, 6, 10, 10. For the grouped matmul d54's d_model is misaligned and its expert width
# aligned in fp32; d60 is aligned in fp32 only, d80 in fp32 and bf16; the rest nowhere. Every config clips q/k/v:
# transformers 5.24 fails on clip_qkv None (a clamp with neither bound).
SWEEP = {
    "d30": dict(d_model=30, n_heads=5, n_layers=2, vocab_size=61, max_seq_len=32, seq=11,
                attn=dict(kv_n_heads=1, clip_qkv=0.4, rope_theta=10000.0),
                ffn=dict(ffn_hidden_size=90, moe_num_experts=9, moe_top_k=3)),
    "d42": dict(d_model=42, n_heads=3, n_layers=2, vocab_size=97, max_seq_len=40, seq=9,
                attn=dict(kv_n_heads=1, clip_qkv=0.6, rope_theta=5000.0),
                ffn=dict(ffn_hidden_size=13, moe_num_experts=16, moe_top_k=5)),
    "d54": dict(d_model=54, n_heads=9, n_layers=1, vocab_size=131, max_seq_len=48, seq=14,
                attn=dict(kv_n_heads=3, clip_qkv=0.3, rope_theta=250000.0),
                ffn=dict(ffn_hidden_size=44, moe_num_experts=7, moe_top_k=2)),
    "d60": dict(d_model=60, n_heads=6, n_layers=1, vocab_size=83, max_seq_len=24, seq=13,
                attn=dict(kv_n_heads=2, clip_qkv=0.5, rope_theta=500000.0),
                ffn=dict(ffn_hidden_size=36, moe_num_experts=5, moe_top_k=4)),
    "d80": dict(d_model=80, n_heads=8, n_layers=2, vocab_size=67, max_seq_len=44, seq=12,
                attn=dict(kv_n_heads=4, clip_qkv=0.35, rope_theta=10000.0),
                ffn=dict(ffn_hidden_size=24, moe_num_experts=3, moe_top_k=1)),
}

# precision -> (dtype, whether bf16 matmul counts as emulated: the experts then compute in fp32)
PRECISIONS = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False),
              "bf16-emulated": (torch.bfloat16, True)}

# Largest errors seen natively (AVX-512 with AMX) and under AVX2 emulation, all configs and paths:
#   fp32 logits 5e-6 (absolute), gradients 2.3e-6 of the largest entry.
#   bf16 logits, of the logit scale: 1.6% against transformers in fp32, 3.5% against transformers in bf16, 2.9%
#   when cached; gradients 1.7% (norm of the difference over the gradient's norm).
FP32_TOL = 1e-4  # logits, absolute (as test_parity.py)
FP32_GRAD_TOL = 2e-5  # of the largest entry
BF16_TOL = 5e-2  # logits of the logit scale; gradients in norm


def _ids(name, batch=2, seed=1):
    s = SWEEP[name]
    return torch.randint(0, s["vocab_size"], (batch, s["seq"]), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """At these sizes a second thread only adds OpenMP synchronisation: on a busy 2-core machine an index_add_
    waited ~60 ms for it instead of taking 10 us."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """name -> (transformers model in fp32, its directory). The weights are bf16 values, so that the fp32 model is
    the exact reference for bf16 too."""
    built = {}

    def get(name):
        if name not in built:
            torch.manual_seed(0)
            hf = transformers.DbrxForCausalLM(hf_config(name, SWEEP)).eval()
            randomize_(hf, seed=list(SWEEP).index(name))
            with torch.no_grad():
                for p in hf.parameters():
                    p.copy_(p.to(torch.bfloat16))
            path = tmp_path_factory.mktemp(name)
            hf.save_pretrained(path)
            built[name] = hf, path
        return built[name]

    return get


@pytest.fixture
def calls(monkeypatch):
    """Counts the MoE code that runs: grouped_mm calls, per-expert glu calls by the dtype they compute in, and
    the inference paths' calls (one token; a few tokens per expert, run on exactly their rows)."""
    seen = Counter()
    grouped_mm, glu = F.grouped_mm, DbrxExpertGLU.glu
    one, exact = DbrxExperts._forward_one_token, DbrxExperts._forward_exact_groups

    def spy_grouped_mm(*args, **kwargs):
        seen["grouped_mm"] += 1
        return grouped_mm(*args, **kwargs)

    def spy_glu(self, x_nD, w1, v1, w2, compute_dtype=None):
        if compute_dtype in (None, x_nD.dtype):  # an upcast is counted by its inner call
            seen["loop", x_nD.dtype] += 1
        return glu(self, x_nD, w1, v1, w2, compute_dtype)

    def spy_one(self, *args):
        seen["one_token"] += 1
        return one(self, *args)

    def spy_exact(self, *args):
        seen["exact_groups"] += 1
        return exact(self, *args)

    monkeypatch.setattr(F, "grouped_mm", spy_grouped_mm)
    monkeypatch.setattr(DbrxExpertGLU, "glu", spy_glu)
    monkeypatch.setattr(DbrxExperts, "_forward_one_token", spy_one)
    monkeypatch.setattr(DbrxExperts, "_forward_exact_groups", spy_exact)
    return seen


def _machine(monkeypatch, precision):
    """-> the dtype; makes dbrx.perf report bf16 matmul as emulated (slower than fp32) or native."""
    dtype, emulated = PRECISIONS[precision]
    monkeypatch.setattr(perf, "bf16_is_slow", lambda device="cpu", dtype=torch.bfloat16: emulated and
                        torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16))
    return dtype


def _assert_path(calls, name, precision, impl, inference=False):
    """The MoE ran where it should: grouped_mm where both sizes give 16-byte rows and bf16 is native, else the
    loop, in fp32 for emulated bf16; the reference impl is the plain loop in the weights' dtype. Without autograd,
    groups so small that padding would double them run on their exact rows, by the same rule."""
    dtype, emulated = PRECISIONS[precision]
    s = SWEEP[name]
    aligned = all(n * dtype.itemsize % 16 == 0 for n in (s["d_model"], s["ffn"]["ffn_hidden_size"]))
    loops = calls["loop", torch.float32] + calls["loop", torch.bfloat16]
    assert inference or calls["exact_groups"] == calls["one_token"] == 0, calls  # autograd: never those paths
    if impl == "reference":
        assert calls["grouped_mm"] == 0 and calls["loop", dtype] == loops > 0, calls
    elif aligned and not emulated:
        assert calls["grouped_mm"] > 0 and loops == 0, calls
    else:
        assert calls["grouped_mm"] == 0 and calls["loop", torch.float32 if emulated else dtype] == loops > 0, calls


def _routes(router_logits, B, top_k, softmax_dtype=torch.float32):
    """Each layer's chosen experts, sorted: [L, B, T, K]. This project takes the softmax in fp32; transformers in
    the logits' dtype."""
    return torch.stack([lg.reshape(B, -1, lg.shape[-1]).softmax(-1, dtype=softmax_dtype).topk(top_k).indices
                        .sort(-1).values for lg in router_logits])


def _routed_alike(routes, other_routes):
    """[B, T]: True at the positions that every layer sends to the same experts in both. A position routed
    differently changes by O(1) and is left out; what reaches later positions through attention is small and
    stays within the tolerance."""
    same_BT = (routes == other_routes).all(-1).all(0)
    assert same_BT.float().mean() >= 2 / 3, "routing differences should be rare near-ties"
    return same_BT


def _assert_logits_close(got, want, same_BT, dtype, what):
    err = (got.float() - want.float())[same_BT].abs().max().item()
    if dtype == torch.float32:
        assert same_BT.all() and err <= FP32_TOL, f"{what}: fp32 logits {err:.3g} apart"
    else:
        scale = want.float().abs().max().item()
        assert err <= BF16_TOL * scale, f"{what}: bf16 logits {err:.3g} apart (logit scale {scale:.3g})"


@pytest.mark.parametrize("impl", ["grouped", "reference"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", SWEEP)
def test_logits_match_transformers(reference, calls, monkeypatch, name, precision, impl):
    dtype = _machine(monkeypatch, precision)
    base, path = reference(name)
    ours = DbrxForCausalLM.from_pretrained(path, dtype=dtype)
    ours.set_moe_impl(impl)
    ids = _ids(name)
    B, K = ids.shape[0], SWEEP[name]["ffn"]["moe_top_k"]
    with torch.no_grad():
        want = base(ids, output_router_logits=True)
        calls.clear()
        out = ours(ids, output_router_logits=True)
    _assert_path(calls, name, precision, impl, inference=True)
    assert out.logits.dtype == dtype
    routes = _routes(out.router_logits, B, K)
    _assert_logits_close(out.logits, want.logits, _routed_alike(routes, _routes(want.router_logits, B, K)), dtype,
                         "against transformers in fp32")
    aux_tol = 1e-5 if dtype == torch.float32 else BF16_TOL * want.aux_loss.item()
    assert abs(out.aux_loss.item() - want.aux_loss.item()) <= aux_tol
    if dtype == torch.bfloat16:
        with torch.no_grad():
            ref = copy.deepcopy(base).to(dtype)(ids, output_router_logits=True)
        same_BT = _routed_alike(routes, _routes(ref.router_logits, B, K, softmax_dtype=dtype))
        _assert_logits_close(out.logits, ref.logits, same_BT, dtype, "against transformers in bf16")


def _loss(out, ids, same_BT):
    """Next-token cross-entropy over the positions in same_BT + the load-balancing loss, as training takes it."""
    logits_NV, targets_N = out.logits[:, :-1][same_BT[:, :-1]].float(), ids[:, 1:][same_BT[:, :-1]]
    return F.cross_entropy(logits_NV, targets_N) + 0.05 * out.aux_loss.float()


@pytest.mark.parametrize("impl", ["grouped", "reference"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", SWEEP)
def test_gradients_match_transformers(reference, calls, monkeypatch, name, precision, impl):
    """loss.backward() gives transformers' gradients (in fp32, on the same weights)."""
    dtype = _machine(monkeypatch, precision)
    base, path = reference(name)
    hf = copy.deepcopy(base).train()
    ours = DbrxForCausalLM.from_pretrained(path, dtype=dtype).train()
    ours.set_moe_impl(impl)
    ids = _ids(name, seed=2)
    B, K = ids.shape[0], SWEEP[name]["ffn"]["moe_top_k"]
    want = hf(ids, output_router_logits=True)
    calls.clear()
    out = ours(ids, output_router_logits=True)
    # The cross-entropy covers the positions that both route alike (all of them in fp32). The compared parameters
    # see a position routed differently only through its own term: no attention follows the last block.
    same_BT = _routed_alike(_routes(out.router_logits, B, K), _routes(want.router_logits, B, K))
    assert same_BT.all() or dtype == torch.bfloat16
    _loss(want, ids, same_BT).backward()
    _loss(out, ids, same_BT).backward()
    _assert_path(calls, name, precision, impl)
    last = f"transformer.blocks.{SWEEP[name]['n_layers'] - 1}"
    checked = ["lm_head.weight", "transformer.norm_f.weight", f"{last}.ffn.router.layer.weight",
               f"{last}.ffn.experts.mlp.w1", f"{last}.ffn.experts.mlp.v1", f"{last}.ffn.experts.mlp.w2"]
    if dtype == torch.float32:
        # bf16 leaves out what lies upstream of the last block's clip_qkv: a q/k/v value that rounds across the
        # clip bound turns its gradient on or off, in transformers' bf16 as in ours.
        checked += ["transformer.wte.weight", f"{last}.norm_attn_norm.attn.Wqkv.weight",
                    "transformer.blocks.0.ffn.router.layer.weight", "transformer.blocks.0.ffn.experts.mlp.w1",
                    "transformer.blocks.0.ffn.experts.mlp.w2"]
    want_grads = {n: p.grad for n, p in hf.named_parameters()}
    for n, p in ours.named_parameters():
        if n not in checked:
            continue
        g, g_ref = p.grad.float(), want_grads[n]
        assert g.abs().sum() > 0, n
        if dtype == torch.float32:
            assert (g - g_ref).abs().max() <= FP32_GRAD_TOL * g_ref.abs().max(), n
        else:
            rel = ((g - g_ref).norm() / g_ref.norm()).item()
            assert rel <= BF16_TOL, f"{n}: bf16 gradient {rel:.3g} from the fp32 reference"


def _cached_forward(model, ids, p):
    """Prefill ids[:, :p] into a KV cache, then one token per call, as decoding does; -> logits [B, T, V] and
    each layer's router logits [B, T, E], as one uncached forward gives them."""
    B, T = ids.shape
    cache = KVCache(model.config, B, T, model.lm_head.weight.dtype, "cpu")
    outs = [model(ids[:, :p], cache=cache, output_router_logits=True)]
    outs += [model(ids[:, i: i + 1], cache=cache, start_pos=i, output_router_logits=True) for i in range(p, T)]
    router_logits = [torch.cat([o.router_logits[layer].view(B, -1, o.router_logits[layer].shape[-1]) for o in outs],
                               1) for layer in range(model.config.n_layers)]
    return torch.cat([o.logits for o in outs], 1), router_logits


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", SWEEP)
def test_cached_decoding_matches_uncached_and_transformers(reference, calls, monkeypatch, name, precision):
    dtype = _machine(monkeypatch, precision)
    base, path = reference(name)
    ours = DbrxForCausalLM.from_pretrained(path, dtype=dtype)
    s = SWEEP[name]
    K, E = s["ffn"]["moe_top_k"], s["ffn"]["moe_num_experts"]
    ids = _ids(name, seed=3)
    B, T = ids.shape
    p = T // 2
    with torch.no_grad():
        calls.clear()
        cached, cached_router_logits = _cached_forward(ours, ids, p)
        uncached = ours(ids, output_router_logits=True)
        want = base(ids, output_router_logits=True)
    assert calls["one_token"] + calls["exact_groups"] > 0  # decode steps take the inference paths
    routes = _routes(cached_router_logits, B, K)
    _assert_logits_close(cached, uncached.logits, _routed_alike(routes, _routes(uncached.router_logits, B, K)),
                         dtype, "cached against uncached")
    _assert_logits_close(cached, want.logits, _routed_alike(routes, _routes(want.router_logits, B, K)), dtype,
                         "cached against transformers in fp32")

    # Batch 1 through generate (prefill, then one-token decode steps on the one-token path): each new token has
    # the largest logit of transformers' fp32 forward, up to the tolerance.
    calls.clear()
    prompt = ids[0, :p].tolist()
    new = generate(ours, prompt, T - p)
    assert calls["one_token"] == (T - p - 1) * s["n_layers"]  # every decode step, every layer
    with torch.no_grad():
        want = base(torch.tensor([prompt + new]), output_router_logits=True)
        uncached = ours(torch.tensor([prompt + new]), output_router_logits=True)
    same_T = _routed_alike(_routes(uncached.router_logits, 1, K), _routes(want.router_logits, 1, K))[0, p - 1: -1]
    want_TV = want.logits[0, p - 1: -1][same_T]
    chosen_T = want_TV.gather(-1, torch.tensor(new)[same_T][:, None]).squeeze(-1)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL * want.logits.abs().max().item()
    assert (want_TV.max(-1).values - chosen_T).max() <= tol


def test_expert_width_90_fp32_trains_on_the_default_path(calls):
    """The reported crash: grouped_mm refused ffn_hidden_size 90 in fp32 (360-byte rows) with 'strides should be
    multiple of 16 bytes'. d_model 48 is aligned, so only the expert width sends the experts to the loop."""
    cfg = DbrxConfig(d_model=48, n_heads=4, n_layers=2, vocab_size=101, max_seq_len=32,
                     attn_config=dict(kv_n_heads=2, clip_qkv=0.5),
                     ffn_config=dict(ffn_hidden_size=90, moe_num_experts=6, moe_top_k=3, moe_jitter_eps=0.0))
    model = DbrxForCausalLM(cfg).train()
    randomize_(model, seed=5)
    ids = torch.randint(0, 101, (2, 15), generator=torch.Generator().manual_seed(4))
    every_BT = torch.ones_like(ids, dtype=torch.bool)
    out = model(ids, output_router_logits=True)
    _loss(out, ids, every_BT).backward()
    assert calls["grouped_mm"] == 0 and calls["loop", torch.float32] > 0
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.isfinite().all() and g.abs().sum() > 0 for g in grads.values())
    # The loop agrees with the reference loop.
    model.zero_grad()
    model.set_moe_impl("reference")
    ref = model(ids, output_router_logits=True)
    _loss(ref, ids, every_BT).backward()
    assert (out.logits - ref.logits).abs().max() <= 1e-5
    for n, p in model.named_parameters():
        assert (grads[n] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max(), n
