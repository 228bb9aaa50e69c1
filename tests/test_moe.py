"""The mixture of experts: the grouped (sorted) path, the decode path and the plain reference loop agree,
forward and backward, and routing is dropless."""

import os

import pytest
import torch

from conftest import dbrx_config, randomize_
from dbrx.moe import DbrxFFN, add_by_token, load_balancing_loss

DEVICE = os.environ.get("DBRX_TEST_DEVICE", "cpu")  # bench/gpu_check.sh runs the combine on cuda


def _ffn(name="C", seed=0):
    ffn = DbrxFFN(dbrx_config(name)).double()
    randomize_(ffn, seed)
    return ffn


def _run(ffn, x, impl):
    ffn.impl = impl
    ffn.zero_grad()
    x = x.clone().requires_grad_(True)
    y, logits = ffn(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in ffn.named_parameters()}
    return y.detach(), x.grad, grads


def test_grouped_equals_reference_forward_and_backward():
    for name in ("A", "B", "C"):
        ffn = _ffn(name)
        x = torch.randn(3, 11, ffn.router.layer.in_features, dtype=torch.float64)
        y_ref, gx_ref, g_ref = _run(ffn, x, "reference")
        y, gx, g = _run(ffn, x, "grouped")
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)
        for n in g_ref:
            torch.testing.assert_close(g[n], g_ref[n], rtol=1e-10, atol=1e-10, msg=n)


def test_decode_path_equals_grouped_path():
    """Without autograd, one token and groups too small to pad (decoding a batch, a short chunk) take their own
    paths; a long input, whose groups fill their padding, the grouped path. All agree with the reference loop."""
    ffn = _ffn("C")
    for n_tokens in (1, 2, 3, 4, 40, 600):
        x = torch.randn(1, n_tokens, 96, dtype=torch.float64)
        with torch.no_grad():
            few, _ = ffn(x)
        ffn.impl = "reference"
        with torch.no_grad():
            ref, _ = ffn(x)
        ffn.impl = "grouped"
        torch.testing.assert_close(few, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_experts_outputs_add_up_per_token_as_index_add_does_on_the_cpu_and_alike_on_every_run(dtype):
    """Inference adds each token's K expert outputs in increasing expert order: bit for bit what index_add_ of the
    copies sorted by expert makes on the CPU (transformers' order), and the same bits run after run on CUDA, where
    index_add_ adds with atomics in any order."""
    g = torch.Generator().manual_seed(0)
    N, K, E, D = 37, 4, 16, 96
    experts_NK = torch.rand(N, E, generator=g).argsort(dim=1)[:, :K].to(DEVICE)  # K distinct experts per token
    order_S = experts_NK.reshape(-1).argsort(stable=True)
    y_SD = torch.randn(N * K, D, generator=g).to(DEVICE, dtype)
    zeros = torch.zeros(N, D, dtype=dtype, device=DEVICE)
    got = add_by_token(y_SD, order_S, experts_NK, zeros.clone(), ordered=True)
    if DEVICE == "cpu":
        assert torch.equal(got, add_by_token(y_SD, order_S, experts_NK, zeros.clone()))  # index_add_ there
        assert torch.equal(got, zeros.clone().index_add_(0, order_S // K, y_SD))
    else:  # CUDA's index_add_ rounds a bf16 sum after each atomic add: against the fp32 sums, rounded once
        want = zeros.float().index_add_(0, order_S // K, y_SD.float()).to(dtype)
        torch.testing.assert_close(got, want, rtol=1.6e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-5)
    assert all(torch.equal(got, add_by_token(y_SD, order_S, experts_NK, zeros.clone())) for _ in range(20))


def test_dropless_under_extreme_imbalance():
    """Every token sends its copies to the same top-k experts; a capacity-limited MoE would drop most of them."""
    ffn = _ffn("C")
    with torch.no_grad():
        ffn.router.layer.weight.zero_()
        ffn.router.layer.weight[:4] = 1.0  # experts 0..3 win for any input with positive mean
    x = torch.rand(2, 50, 96, dtype=torch.float64) + 0.1
    seen = []
    orig = ffn.experts.mlp.glu
    # groups are padded with zero rows (GROUP_ROWS); count the real ones
    ffn.experts.mlp.glu = lambda xs, *w: (seen.append(int((xs != 0).any(-1).sum())), orig(xs, *w))[1]
    with torch.no_grad():
        y, _ = ffn(x)
    assert sorted(seen) == [100, 100, 100, 100]  # 4 experts, each receives all 100 tokens
    ffn.impl = "reference"
    with torch.no_grad():
        torch.testing.assert_close(y, ffn(x)[0])


def test_load_balancing_loss_is_top_k_when_perfectly_balanced():
    E, K, N = 16, 4, 64
    # Uniform probabilities with ties broken so that each expert is chosen equally often.
    logits = torch.zeros(N, E)
    for n in range(N):
        logits[n, [(4 * n + j) % E for j in range(K)]] = 1e-6
    loss = load_balancing_loss([logits, logits], E, K)
    torch.testing.assert_close(loss, torch.tensor(float(K)), rtol=1e-4, atol=1e-4)


def test_router_jitter_touches_only_the_router_input():
    cfg = dbrx_config("C").replace(ffn_config={"moe_jitter_eps": 0.3})
    ffn = DbrxFFN(cfg).double().train()
    randomize_(ffn, 1)
    x = torch.randn(1, 9, 96, dtype=torch.float64)
    x_before = x.clone()
    torch.manual_seed(0)
    ffn(x)
    assert torch.equal(x, x_before)  # transformers multiplies the input in place; we never do
    seen = []
    ffn.experts.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    ffn(x)
    torch.testing.assert_close(seen[0], x.view(-1, 96))
