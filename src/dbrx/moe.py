"""DBRX's fine-grained mixture of experts: router, token sort, GLU experts, load-balancing loss.

Shape legend: N tokens (batch * seq flattened), D d_model, E experts, F expert width (ffn_hidden_size),
K experts per token (top_k), S = N*K routed token copies.

The fast path reads as its steps: route -> sort token copies by expert -> run each expert on its contiguous
group (on CPU all groups at once, with torch's grouped matmul) -> weighted combine. It is dropless: every token
reaches all of its top-k experts. Without autograd (generation, serving), one token reads only its K experts, and
groups too small to fill their padding (a decoding batch, a short prompt chunk) run on their exact rows. `impl="reference"` keeps the plain per-expert mask loop that newcomers read; a
test shows both agree forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dbrx import perf
from dbrx.config import DbrxConfig

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


class DbrxRouter(nn.Module):
    """Linear scores -> fp32 softmax over all experts -> top-k -> weights divided by their p-norm."""

    def __init__(self, config: DbrxConfig):
        super().__init__()
        f = config.ffn_config
        self.top_k = f.moe_top_k
        self.jitter_eps = f.moe_jitter_eps or 0.0
        self.norm_p = f.moe_normalize_expert_weights
        self.layer = nn.Linear(config.d_model, f.moe_num_experts, bias=False)

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.training and self.jitter_eps > 0:
            # As in Databricks' original code, jitter perturbs what the router sees, not what the experts see
            # (transformers jitters the experts' input in place too).
            x_ND = x_ND * torch.empty_like(x_ND).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        logits_NE = self.layer(x_ND)
        probs_NE = logits_NE.float().softmax(dim=-1)
        weights_NK, experts_NK = probs_NE.topk(self.top_k, dim=-1)
        if self.norm_p is not None:
            weights_NK = weights_NK / weights_NK.norm(p=self.norm_p, dim=-1, keepdim=True)
        return logits_NE, weights_NK.to(x_ND.dtype), experts_NK


GROUP_ROWS = 64
"""Each expert's group is padded with zero rows to a multiple of this. CPU matmul libraries build (and cache) a
kernel per shape: a group size never seen before costs ~1.5 ms in bf16 (2x the product itself in fp32), which
made the many small expert products of a step dominate it. Padded sizes repeat from step to step."""


class _ToGroups(torch.autograd.Function):
    """x_PD[slot[j]] = x_ND[j // K] for each token copy j = n*K + k; the P - N*K padding rows are zero.

    Autograd's backward for this indexing would scatter-add; since each copy has its own slot, the gradient
    is a gather by `slot` and a sum over each token's K copies.
    """

    @staticmethod
    def forward(ctx, x_ND, slot_S, order_S, rows, top_k):
        ctx.save_for_backward(slot_S)
        ctx.shape = (x_ND.shape[0], top_k, x_ND.shape[1])
        x_PD = x_ND.new_zeros(rows, x_ND.shape[1])
        return x_PD.index_copy_(0, slot_S[order_S], x_ND.index_select(0, order_S // top_k))

    @staticmethod
    def backward(ctx, grad_PD):
        (slot_S,) = ctx.saved_tensors
        return grad_PD.index_select(0, slot_S).view(ctx.shape).sum(dim=1), None, None, None, None


class _FromGroups(torch.autograd.Function):
    """y_SD = y_PD[slot]: back to token-copy order. Backward puts each gradient row in its slot (a copy, not an
    accumulation: slots are distinct); padding rows get zero."""

    @staticmethod
    def forward(ctx, y_PD, slot_S):
        ctx.save_for_backward(slot_S)
        ctx.rows = y_PD.shape[0]
        return y_PD.index_select(0, slot_S)

    @staticmethod
    def backward(ctx, grad_SD):
        (slot_S,) = ctx.saved_tensors
        return grad_SD.new_zeros(ctx.rows, grad_SD.shape[1]).index_copy_(0, slot_S, grad_SD), None


def add_by_token(y_SD: torch.Tensor, order_S: torch.Tensor, experts_NK: torch.Tensor, out: torch.Tensor,
                 ordered: bool | None = None) -> torch.Tensor:
    """out + each token's K weighted expert outputs, where y_SD holds the N*K copies in `order_S` (sorted by expert,
    stably). On the CPU, index_add_: it adds the copies in the order given, in fp32 at least (bf16 sums rounded
    once). Elsewhere (`ordered`) the same sums are made explicitly, in increasing expert order: on CUDA, index_add_
    adds with atomics in whatever order its threads reach them, and a batch's logits moved by rounding from one run
    to the next. (2-3x index_add_'s time on the CPU: 40 us more per layer for 8 tokens at d_model 512.)"""
    N, K = experts_NK.shape
    if not (ordered if ordered is not None else y_SD.device.type != "cpu"):
        return out.index_add_(0, order_S // K, y_SD)
    rank_NK = experts_NK.argsort(dim=1).argsort(dim=1)  # each copy's place among its token's experts
    place_S = (order_S // K) * K + rank_NK.reshape(-1).index_select(0, order_S)
    y_NKD = y_SD.new_empty(y_SD.shape).index_copy_(0, place_S, y_SD).view(N, K, -1)
    acc = out.to(torch.promote_types(out.dtype, torch.float32))
    for k in range(K):
        acc = acc + y_NKD[:, k]
    return acc.to(out.dtype)


class DbrxExpertGLU(nn.Module):
    """The experts' weights, fused as in the checkpoint: w1, v1, w2 are each [E*F, D]; expert e owns rows
    e*F:(e+1)*F. w1 (gate) and v1 (up) are applied as x @ w.T; w2 as h @ w2 (not transposed)."""

    def __init__(self, config: DbrxConfig):
        super().__init__()
        f = config.ffn_config
        self.num_experts, self.ffn_hidden_size, self.d_model = f.moe_num_experts, f.ffn_hidden_size, config.d_model
        shape = (self.num_experts * self.ffn_hidden_size, self.d_model)
        self.w1 = nn.Parameter(torch.empty(shape))
        self.v1 = nn.Parameter(torch.empty(shape))
        self.w2 = nn.Parameter(torch.empty(shape))
        self.act = _ACTIVATIONS[f.ffn_act_fn["name"]]
        self.lora: nn.Module | None = None  # low-rank expert deltas, attached by dbrx.lora.apply_lora

    def stacked(self) -> tuple[torch.Tensor, ...]:
        """w1, v1, w2 as [E, F, D] views. Under autocast the fused tensors are cast once here, not once per
        expert."""
        shape = (self.num_experts, self.ffn_hidden_size, self.d_model)
        weights = (self.w1, self.v1, self.w2)
        device = self.w1.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            weights = tuple(w.to(dtype) for w in weights)
        return tuple(w.view(shape) for w in weights)

    def per_expert(self) -> tuple[tuple[torch.Tensor, ...], ...]:
        """Per-expert [F, D] views via unbind: no copies, and one backward node for all experts."""
        if self.lora is not None:  # LoRA: every MoE path then runs each expert as base + its low-rank delta
            return self.lora(self.stacked())
        return tuple(w.unbind(0) for w in self.stacked())

    def glu(self, x_nD: torch.Tensor, w1_FD: torch.Tensor, v1_FD: torch.Tensor, w2_FD: torch.Tensor,
            compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """One expert. `compute_dtype` (fp32 for bf16 weights where bf16 matmul is emulated) casts this expert's
        weights and input for the products and the result back."""
        if compute_dtype is not None and compute_dtype != x_nD.dtype:
            out = self.glu(x_nD.to(compute_dtype), w1_FD.to(compute_dtype), v1_FD.to(compute_dtype),
                           w2_FD.to(compute_dtype))
            return out.to(x_nD.dtype)
        return (self.act(F.linear(x_nD, w1_FD)) * F.linear(x_nD, v1_FD)) @ w2_FD

    def compute_dtype(self, x_ND: torch.Tensor) -> torch.dtype | None:
        """fp32 for bf16/fp16 weights on a CPU where that dtype's matmul is slower than fp32's (measured once per
        process: emulated bf16 on AVX2 runs at ~1 GFLOP/s, 100x below fp32); None (as stored) elsewhere and
        under autocast, whose dtype the user chose."""
        device = x_ND.device.type
        if torch.is_autocast_enabled(device) or self.w1.dtype not in (torch.bfloat16, torch.float16):
            return None
        return torch.float32 if perf.bf16_is_slow(device, self.w1.dtype) else None


class DbrxExperts(nn.Module):
    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.mlp = DbrxExpertGLU(config)
        # a faster batch-1 decoding kernel, installed from outside (dbrx.kernels.compile_decode):
        # one_token(self, x_1D, weights_1K, experts_1K) -> [1, D]
        self.one_token = None

    def forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor,
                impl: str = "grouped") -> torch.Tensor:
        if impl == "reference":
            return self._forward_reference(x_ND, weights_NK, experts_NK)
        N, K = experts_NK.shape
        E = self.mlp.num_experts
        inference = not torch.is_grad_enabled()
        if inference and N == 1:
            return self._forward_one_token(x_ND, weights_NK, experts_NK)

        # Sort the S = N*K token copies by expert so that each expert's tokens are one contiguous group, padded
        # to a multiple of GROUP_ROWS: copy j goes to slot[j] = (its rank among its expert's copies) + (the
        # padded start of its expert's group).
        flat_S = experts_NK.reshape(-1)
        order_S = flat_S.argsort(stable=True)
        counts_E = torch.bincount(flat_S, minlength=E)
        padded_E = (counts_E + GROUP_ROWS - 1) // GROUP_ROWS * GROUP_ROWS
        padded = padded_E.tolist()
        if inference and sum(padded) >= 2 * N * K:
            # Few tokens per expert (decoding a batch, a short chunk): padding would at least double the
            # arithmetic, and without autograd each expert can run on exactly its rows.
            return self._forward_exact_groups(x_ND, weights_NK, experts_NK, order_S, counts_E)
        compute = self.mlp.compute_dtype(x_ND)
        grouped = compute is None and self._grouped_mm_applies(x_ND)
        w1, v1, w2 = self.mlp.stacked() if grouped else self.mlp.per_expert()
        shift_E = (padded_E.cumsum(0) - padded_E) - (counts_E.cumsum(0) - counts_E)
        slot_S = torch.empty_like(order_S)
        slot_S[order_S] = torch.arange(order_S.numel(), device=order_S.device) + shift_E[flat_S[order_S]]

        x_PD = _ToGroups.apply(x_ND, slot_S, order_S, sum(padded), K)
        if grouped:
            y_PD = self._grouped_glu(x_PD, (w1, v1, w2), padded_E)
        else:
            # `split` (not slicing) so that backward is one concatenation instead of E zero-filled scatters.
            outs = [self.mlp.glu(x_nD, w1[e], v1[e], w2[e], compute)
                    for e, x_nD in enumerate(x_PD.split(padded)) if padded[e] > 0]
            y_PD = torch.cat(outs) if len(outs) > 1 else outs[0]

        # Back to token order, then each token's K outputs weighted by its router weights.
        y_NKD = _FromGroups.apply(y_PD, slot_S).view(N, K, -1)
        return torch.bmm(weights_NK.unsqueeze(1), y_NKD).squeeze(1)

    def _grouped_glu(self, x_PD: torch.Tensor, stacked: tuple[torch.Tensor, ...], rows_E: torch.Tensor):
        """All experts' GLU in one grouped product per weight: x_PD holds expert e's rows_E[e] rows after those of
        the experts before it; [P, D] x [E, D, F] by group offsets. Returns [P, D] in the weights' dtype."""
        w1_EFD, v1_EFD, w2_EFD = stacked
        offs_E = rows_E.cumsum(0).to(torch.int32)
        x_PD = x_PD.to(w1_EFD.dtype)
        h_PF = self.mlp.act(F.grouped_mm(x_PD, w1_EFD.transpose(1, 2), offs=offs_E)) * \
            F.grouped_mm(x_PD, v1_EFD.transpose(1, 2), offs=offs_E)
        return F.grouped_mm(h_PF, w2_EFD, offs=offs_E)

    def _grouped_mm_applies(self, x_ND: torch.Tensor) -> bool:
        """torch's grouped matmul runs all experts in three calls instead of three per expert (on CPU, about 30%
        less time for the experts' forward and backward in isolation). Used on CPU, where it takes fp32, bf16
        and fp16, when every row stride is a multiple of 16 bytes (its kernels' requirement: d_model and
        ffn_hidden_size multiples of 4 in fp32, of 8 in bf16) and the dtype's matmul is not emulated; not with
        LoRA adapters, whose per-expert deltas go through the loop. Everything else takes the loop."""
        device = x_ND.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.mlp.w1.dtype
        aligned = all(n * dtype.itemsize % 16 == 0 for n in (self.mlp.d_model, self.mlp.ffn_hidden_size))
        return (device == "cpu" and self.mlp.lora is None and hasattr(F, "grouped_mm") and aligned
                and dtype in (torch.float32, torch.bfloat16, torch.float16) and x_ND.dtype != torch.float64
                and not perf.bf16_is_slow(device, dtype))

    def _inference_weights(self) -> tuple[torch.Tensor, ...]:
        """w1, v1, w2 as [E, F, D] without autograd: views of the stored tensors (indexing an expert reads only
        its rows), or base + delta for every expert under LoRA (merge the adapters to decode fast)."""
        if self.mlp.lora is not None:
            return self.mlp.per_expert()
        shape = (self.mlp.num_experts, self.mlp.ffn_hidden_size, self.mlp.d_model)
        return tuple(w.view(shape) for w in (self.mlp.w1, self.mlp.v1, self.mlp.w2))

    def _forward_one_token(self, x_1D, weights_1K, experts_1K):
        """Batch-1 decoding: a weighted sum of the K chosen experts' outputs; only their weights are read."""
        if self.one_token is not None and self.mlp.lora is None:
            return self.one_token(self, x_1D, weights_1K, experts_1K)
        w1_EFD, v1_EFD, w2_EFD = self._inference_weights()
        compute = self.mlp.compute_dtype(x_1D)
        y_1D = None
        for e, w in zip(experts_1K[0].tolist(), weights_1K[0].tolist()):
            out = self.mlp.glu(x_1D, w1_EFD[e], v1_EFD[e], w2_EFD[e], compute) * w
            y_1D = out if y_1D is None else y_1D + out
        return y_1D

    def _forward_exact_groups(self, x_ND, weights_NK, experts_NK, order_S, counts_E):
        """Each chosen expert on exactly the token copies routed to it (`order_S` sorts copies by expert,
        `counts_E` per expert), weighted and added back per token. No padding and no autograd: torch's grouped
        matmul with the exact group offsets where it applies (bit-identical to the loop, fewer calls), else the
        per-expert loop."""
        token_S = order_S // weights_NK.shape[1]
        x_SD = x_ND.index_select(0, token_S)
        compute = self.mlp.compute_dtype(x_ND)
        if compute is None and self._grouped_mm_applies(x_ND):
            y_SD = self._grouped_glu(x_SD, self.mlp.stacked(), counts_E)
        else:
            w1_EFD, v1_EFD, w2_EFD = self._inference_weights()
            counts = counts_E.tolist()
            y_SD = torch.cat([self.mlp.glu(x_nD, w1_EFD[e], v1_EFD[e], w2_EFD[e], compute)
                              for e, x_nD in enumerate(x_SD.split(counts)) if counts[e]])
        y_SD = y_SD * weights_NK.reshape(-1, 1).index_select(0, order_S)
        return add_by_token(y_SD.to(x_ND.dtype), order_S, experts_NK, torch.zeros_like(x_ND))

    def _forward_reference(self, x_ND, weights_NK, experts_NK):
        """Plain loop over all experts: gather the tokens routed to e, run e, add back weighted."""
        y_ND = torch.zeros_like(x_ND)
        for e, (w1_FD, v1_FD, w2_FD) in enumerate(zip(*self.mlp.per_expert())):
            token_idx, slot_idx = torch.where(experts_NK == e)
            if token_idx.numel() == 0:
                continue
            out = self.mlp.glu(x_ND[token_idx], w1_FD, v1_FD, w2_FD)
            y_ND = y_ND.index_add(0, token_idx, out * weights_NK[token_idx, slot_idx, None])
        return y_ND


class DbrxFFN(nn.Module):
    """route -> experts -> combine. Returns the output and the router logits (for the load-balancing loss)."""

    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.router = DbrxRouter(config)
        self.experts = DbrxExperts(config)
        self.impl = "grouped"

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        logits_NE, weights_NK, experts_NK = self.router(x_ND)
        y_ND = self.experts(x_ND, weights_NK, experts_NK, impl=self.impl)
        return y_ND.view_as(x_BTD), logits_NE


def router_statistics(router_logits: list[torch.Tensor] | tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                      attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(routed token copies per expert [E], router probability summed per expert [E], rows), over all layers,
    leaving out padding positions (attention_mask == 0). Sums, so that ranks can add theirs up."""
    logits_LNE = torch.stack([lg.float().to(router_logits[0].device) for lg in router_logits])  # blocks may differ
    probs_LNE = logits_LNE.softmax(dim=-1)
    chosen_LNK = probs_LNE.topk(top_k, dim=-1).indices
    one_hot_LNE = F.one_hot(chosen_LNK, num_experts).sum(dim=2).float()
    if attention_mask is None:
        mask_N = torch.ones(probs_LNE.shape[1], device=probs_LNE.device)
    else:
        mask_N = attention_mask.reshape(-1).to(device=probs_LNE.device, dtype=torch.float32)
    rows = mask_N.sum() * probs_LNE.shape[0]
    return torch.einsum("lne,n->e", one_hot_LNE, mask_N), torch.einsum("lne,n->e", probs_LNE, mask_N), rows


def load_balancing_loss(router_logits: list[torch.Tensor] | tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style auxiliary loss over all layers: E * sum_e f_e * p_e, where f_e is the fraction of routed
    token copies sent to expert e (summed over the K choices) and p_e its mean router probability.
    Padding positions (attention_mask == 0) are left out. A perfectly balanced router gives top_k."""
    counts_E, prob_sums_E, rows = router_statistics(router_logits, num_experts, top_k, attention_mask)
    return num_experts * ((counts_E / rows) * (prob_sums_E / rows)).sum()
