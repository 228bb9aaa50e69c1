"""Weight-only int8 / int4 quantisation for inference, applied to a loaded model from outside the model file.

The experts (127B of DBRX's 132B parameters) are quantised; `include` adds "attention" (Wqkv, out_proj) and
"lm_head". Activations stay in the model's dtype. int8 is symmetric with a scale per output channel; int4 is
asymmetric in groups of `group_size` along the input (the largest divisor of the input size below it, where it
does not divide), with a scale and a zero point per group (torch's int4 convention: w = (q - 8) * scale + zero,
q in 0..15). The experts' w2 is applied as h @ w2, so it is kept transposed
per expert ([E, D, F]): its scales are then per output channel like every other matrix's.

Each product runs through torch's packed CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`:
private, so guarded) or a plain dequantise-then-matmul fallback, whichever measured faster for that matrix's shape
and dtype on this machine (once per process); off the CPU, the fallback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BITS = (8, 4)
INCLUDABLE = ("attention", "lm_head")
_KERNEL: dict[tuple, str] = {}


@dataclass(frozen=True)
class QuantConfig:
    bits: int
    group_size: int = 128
    include: tuple[str, ...] = ()

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits must be 8 or 4, got {self.bits}")
        bad = [i for i in self.include if i not in INCLUDABLE]
        if bad:
            raise ValueError(f"include {','.join(bad)}: only {', '.join(INCLUDABLE)} can be quantised besides experts")
        if self.bits == 4 and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")


def quantize_int8(w_EOI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output channel: (q int8 [E, O, I], scale [E, O] in w's dtype)."""
    scale = w_EOI.float().abs().amax(dim=-1).clamp(min=1e-12) / 127
    q = torch.round(w_EOI.float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(w_EOI.dtype)


def quantize_int4(w_EOI: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric in groups along the input: (q int32 codes 0..15 [E, O, I], scales_and_zeros [E, I/g, O, 2] in w's
    dtype), w ~ (q - 8) * scale + zero."""
    E, O, I = w_EOI.shape
    if I % group_size:
        raise ValueError(f"group_size {group_size} must divide the input size {I}")
    w = w_EOI.float().view(E, O, I // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(E, O, I)
    zero = lo + 8 * scale  # so that (q - 8) * scale + zero = q * scale + lo
    sz = torch.stack([scale, zero], dim=-1).transpose(1, 2).contiguous()  # [E, I/g, O, 2]
    return q, sz.to(w_EOI.dtype)


def _best_seconds(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class QuantWeights(nn.Module):
    """E quantised matrices [O, I] (E = 1 for a linear layer); `mm(x, e)` = x @ W_e.T in x's dtype. `kernel`:
    None (measured), "packed" or "dequantize"."""

    def __init__(self, w_EOI: torch.Tensor, config: QuantConfig, kernel: str | None = None):
        super().__init__()
        self.dtype, (self.E, self.O, self.I) = w_EOI.dtype, w_EOI.shape
        # int4 groups run along the input; where group_size does not divide it, the largest divisor below it
        self.bits, self.group_size = config.bits, max(d for d in range(1, config.group_size + 1) if self.I % d == 0)
        if self.bits == 8:
            q, scale = quantize_int8(w_EOI)
            self.register_buffer("q", q)
            self.register_buffer("scale", scale)
        else:
            q, sz = quantize_int4(w_EOI, self.group_size)
            self.register_buffer("q", q.to(torch.uint8))  # codes 0..15, one per byte (the fallback's form)
            self.register_buffer("sz", sz)
        if kernel not in (None, "packed", "dequantize"):
            raise ValueError(f"kernel must be packed or dequantize, got {kernel!r}")
        self.kernel = kernel or self._choose_kernel()
        if self.kernel == "packed" and self.bits == 4:  # the kernel's own layout, per matrix (row tiles of 64)
            packed = torch.stack([torch._convert_weight_to_int4pack_for_cpu(self.q[e].to(torch.int32), 2)
                                  for e in range(self.E)])
            self.register_buffer("q", packed)

    def dequantized(self, e: int) -> torch.Tensor:
        """W_e [O, I] in the model's dtype (the fallback's product, and what tests compare with)."""
        if self.bits == 8:
            return self.q[e].to(self.dtype) * self.scale[e][:, None]
        if self.kernel == "packed":
            raise RuntimeError("an int4 matrix in the packed kernel's layout is not dequantised")
        scale, zero = self.sz[e, ..., 0].t(), self.sz[e, ..., 1].t()  # [O, I/g]
        q = self.q[e].view(self.O, -1, self.group_size).to(self.dtype)
        return ((q - 8) * scale[..., None] + zero[..., None]).view(self.O, self.I)

    def mm(self, x_NI: torch.Tensor, e: int = 0) -> torch.Tensor:
        x_NI = x_NI.to(self.dtype)
        if self.kernel == "dequantize":
            return F.linear(x_NI, self.dequantized(e))
        if self.bits == 8:
            return torch._weight_int8pack_mm(x_NI, self.q[e], self.scale[e])
        return torch._weight_int4pack_mm_for_cpu(x_NI, self.q[e], self.group_size, self.sz[e])

    def _choose_kernel(self) -> str:
        """'packed' where torch's packed CPU kernel exists, works for this shape and measures faster on one row than
        dequantise-then-matmul (once per bits, dtype, shape in a process); else 'dequantize'."""
        key = (self.bits, self.dtype, self.O, self.I, self.group_size, str(self.q.device))
        if key in _KERNEL:
            return _KERNEL[key]
        choice = "dequantize"
        op = "_weight_int8pack_mm" if self.bits == 8 else "_weight_int4pack_mm_for_cpu"
        if self.q.device.type == "cpu" and hasattr(torch, op) and (self.bits == 8 or self.O % 16 == 0):
            try:
                x = torch.randn(1, self.I, dtype=self.dtype)
                if self.bits == 8:
                    packed = lambda: torch._weight_int8pack_mm(x, self.q[0], self.scale[0])  # noqa: E731
                else:
                    w4 = torch._convert_weight_to_int4pack_for_cpu(self.q[0].to(torch.int32), 2)
                    packed = lambda: torch._weight_int4pack_mm_for_cpu(x, w4, self.group_size, self.sz[0])  # noqa
                self.kernel = "dequantize"
                plain = lambda: F.linear(x, self.dequantized(0))  # noqa: E731
                if _best_seconds(packed) < _best_seconds(plain):
                    choice = "packed"
            except (RuntimeError, TypeError):  # a build or shape the private kernel does not take
                choice = "dequantize"
        _KERNEL[key] = choice
        return choice


class QuantLinear(nn.Module):
    """nn.Linear (no bias) with quantised weights, for inference."""

    def __init__(self, linear: nn.Linear, config: QuantConfig):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weights = QuantWeights(linear.weight.detach().contiguous()[None], config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights.mm(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)


class QuantExperts(nn.Module):
    """DbrxExperts with quantised w1, v1 (as [E, F, D]) and w2 (transposed per expert, [E, D, F]); each chosen
    expert runs on exactly the tokens routed to it. Inference only."""

    def __init__(self, experts: nn.Module, config: QuantConfig, kernel: str | None = None):
        super().__init__()
        mlp = experts.mlp
        E, Fh, D = mlp.num_experts, mlp.ffn_hidden_size, mlp.d_model
        self.act = mlp.act
        with torch.no_grad():
            self.w1 = QuantWeights(mlp.w1.detach().view(E, Fh, D), config, kernel)
            self.v1 = QuantWeights(mlp.v1.detach().view(E, Fh, D), config, kernel)
            self.w2 = QuantWeights(mlp.w2.detach().view(E, Fh, D).transpose(1, 2).contiguous(), config, kernel)

    def _expert(self, x_nD: torch.Tensor, e: int) -> torch.Tensor:
        return self.w2.mm(self.act(self.w1.mm(x_nD, e)) * self.v1.mm(x_nD, e), e)

    def forward(self, x_ND, weights_NK, experts_NK, impl: str = "grouped") -> torch.Tensor:
        if torch.is_grad_enabled() and x_ND.requires_grad:
            raise RuntimeError("quantised experts are for inference; train the unquantised model")
        N, K = experts_NK.shape
        if N == 1:
            y_1D = None
            for e, w in zip(experts_NK[0].tolist(), weights_NK[0].tolist()):
                out = self._expert(x_ND, e).to(x_ND.dtype) * w
                y_1D = out if y_1D is None else y_1D + out
            return y_1D
        order_S = experts_NK.reshape(-1).argsort(stable=True)
        counts = torch.bincount(experts_NK.reshape(-1), minlength=self.w1.E).tolist()
        token_S = order_S // K
        x_SD = x_ND.index_select(0, token_S)
        y_SD = torch.cat([self._expert(x_nD, e) for e, x_nD in enumerate(x_SD.split(counts)) if counts[e]])
        y_SD = y_SD.to(x_ND.dtype) * weights_NK.reshape(-1, 1).index_select(0, order_S)
        return torch.zeros_like(x_ND).index_add_(0, token_S, y_SD)


def quantize(model, config: QuantConfig) -> dict[str, str]:
    """Quantise the model's experts (and `include`) in place, block by block (each block's float weights are freed
    as it goes); the model is then for inference only. Returns the kernel chosen for each kind of matrix."""
    chosen: dict[str, str] = {}
    for block in model.transformer.blocks:
        block.ffn.experts = QuantExperts(block.ffn.experts, config)
        chosen["experts"] = block.ffn.experts.w1.kernel
        if "attention" in config.include:
            attn = block.norm_attn_norm.attn
            attn.Wqkv, attn.out_proj = QuantLinear(attn.Wqkv, config), QuantLinear(attn.out_proj, config)
            chosen["attention"] = attn.Wqkv.weights.kernel
    if "lm_head" in config.include:
        model.lm_head = QuantLinear(model.lm_head, config)
        chosen["lm_head"] = model.lm_head.weights.kernel
    model.quant_config = config
    return chosen
