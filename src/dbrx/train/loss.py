"""Next-token cross-entropy through the 100k-vocab head, in row chunks.

The head's fp32 logits for a whole micro-batch would be [tokens, 100352] floats (1.6 GB for 4096 tokens). Here
each chunk's logits live only inside the forward: the chunk's loss and its gradients with respect to the hidden
states and to the head's weight are computed there and then (softmax - one-hot), and backward only scales them.
The FLOPs are those of the unchunked loss: one forward and two backward matmuls per chunk.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [rows, cols] buffer kept between calls. Allocating hundreds of MB afresh for every chunk costs page
    faults that take as long as the softmax itself on CPU."""
    key = (name, cols, dtype, device)
    buf = _SCRATCH.get(key)
    if buf is None or buf.shape[0] < rows:
        _SCRATCH[key] = buf = torch.empty(rows, cols, dtype=dtype, device=device)
    return buf[:rows]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, chunk_rows, compute_dtype, grad_enabled):
        # needs_input_grad says what the inputs require, even when the caller runs under torch.no_grad() (and a
        # forward always runs without grad mode): the caller's mode comes as `grad_enabled`, so that an evaluation
        # does not pay for the two gradient products, two thirds of the head's FLOPs.
        grad_h_wanted = ctx.needs_input_grad[0] and grad_enabled
        grad_w_wanted = ctx.needs_input_grad[1] and grad_enabled
        need_grad = grad_h_wanted or grad_w_wanted
        device = h_ND.device
        with torch.autocast(device.type, enabled=False):
            w = w_VD
            if w_VD.dtype != compute_dtype:  # the head's low-precision copy, in a kept buffer of the same layout
                column_major = w_VD.stride(0) == 1
                rows, cols = w_VD.shape[::-1] if column_major else w_VD.shape
                buf = _scratch("head", rows, cols, compute_dtype, device)
                w = (buf.t() if column_major else buf).copy_(w_VD)
            acc = torch.promote_types(compute_dtype, torch.float32)  # fp32 softmax for bf16/fp16 matmuls
            total = torch.zeros((), dtype=acc, device=device)
            grad_h = torch.empty_like(h_ND, dtype=compute_dtype) if grad_h_wanted else None
            # grad_w is accumulated transposed, [D, V]: h.T @ dlogits is the faster product on CPU, and its
            # transpose has lm_head's own column-major layout.
            # With one chunk it is the chunk's own product; with several, an fp32 sum of theirs.
            one_chunk = h_ND.shape[0] <= chunk_rows
            grad_w_DV = None
            if grad_w_wanted and not one_chunk:
                grad_w_DV = torch.zeros(w_VD.shape[::-1], dtype=acc, device=device)
            for start in range(0, h_ND.shape[0], chunk_rows):
                h = h_ND[start:start + chunk_rows].to(compute_dtype)
                y = labels_N[start:start + chunk_rows]
                valid = y != IGNORE_INDEX
                y_safe = torch.where(valid, y, 0)
                logits = _scratch("logits", h.shape[0], w.shape[0], compute_dtype, device)
                torch.mm(h, w.T, out=logits)
                if compute_dtype == acc and not need_grad:  # fp32 (or fp64) loss alone: log-softmax in place
                    torch.log_softmax(logits, dim=-1, out=logits)
                    total -= (logits.gather(1, y_safe[:, None])[:, 0] * valid).sum()
                elif compute_dtype == acc:
                    # The gradient needs the softmax itself: one kernel, and the loss is -log p(target). That
                    # saves the exp pass over [rows, 100k] that log-softmax then exp would take (8% of an fp32
                    # head step on an AVX2 CPU). A target whose probability is below 1e-30 would lose digits
                    # in the log: those rows (in practice none) are recomputed by log-softmax.
                    torch.softmax(logits, dim=-1, out=logits)
                    p_target = logits.gather(1, y_safe[:, None])[:, 0]
                    nll = -torch.log(p_target)
                    far = ((p_target < 1e-30) & valid).nonzero()[:, 0]
                    if far.numel():
                        exact = torch.log_softmax(h[far] @ w.T, dim=-1)
                        nll[far] = -exact.gather(1, y_safe[far][:, None])[:, 0]
                    total += (nll * valid).sum()
                else:
                    # bf16 logits: one softmax kernel (fp32 accumulation, bf16 output) serves both the loss and
                    # the gradient. On CPU the passes over [rows, 100k] cost as much as the matmuls, and the loss
                    # is as exact as the bf16 logits it comes from.
                    torch.softmax(logits, dim=-1, out=logits)
                    p_target = logits.gather(1, y_safe[:, None])[:, 0].to(acc)
                    total -= (torch.log(p_target.clamp_min(torch.finfo(acc).tiny)) * valid).sum()
                if need_grad:  # d loss / d logits = softmax - one-hot, in place
                    logits[torch.arange(len(y), device=device), y_safe] -= 1.0
                    invalid = (~valid).nonzero()[:, 0]
                    if invalid.numel():  # a few rows (each sequence's last position): zero just those
                        logits.index_fill_(0, invalid, 0.0)
                    if grad_h is not None:
                        torch.mm(logits, w, out=grad_h[start:start + chunk_rows])
                    if grad_w_wanted and one_chunk:
                        grad_w_DV = torch.mm(h.T.contiguous(), logits)
                    elif grad_w_DV is not None:
                        if compute_dtype == acc:
                            grad_w_DV.addmm_(h.T, logits)
                        else:  # bf16 product into a kept buffer, accumulated in fp32 without a temporary
                            part = _scratch("grad_w", h.shape[1], w.shape[0], compute_dtype, device)
                            grad_w_DV.add_(torch.mm(h.T, logits, out=part))
        ctx.save_for_backward(grad_h, None if grad_w_DV is None else grad_w_DV.t())
        ctx.h_dtype, ctx.w_layout = h_ND.dtype, (w_VD.shape, w_VD.stride(), w_VD.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        # The gradients were computed for this call alone: scale them in place, in the parameters' precision
        # (grad_w also takes the weight's own layout: one converting copy, then no re-layout when accumulated).
        gh = None if grad_h is None else grad_h.to(ctx.h_dtype).mul_(grad_total)
        gw = None
        if grad_w is not None:
            shape, stride, dtype = ctx.w_layout
            gw = grad_w if grad_w.stride() == stride and grad_w.dtype == dtype else \
                torch.empty_strided(shape, stride, dtype=dtype, device=grad_w.device).copy_(grad_w)
            gw.mul_(grad_total)
        return gh, gw, None, None, None, None


def shift_labels(labels_BT: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1; the last position predicts nothing."""
    pad = torch.full_like(labels_BT[:, :1], IGNORE_INDEX)
    return torch.cat([labels_BT[:, 1:], pad], dim=1)


CHUNK_BYTES = 512 * 2**20  # logits held at once: big enough for efficient matmuls (~1300 rows at 100k vocab in
                           # fp32, ~2600 in bf16)


def chunked_cross_entropy_sum(h_BTD: torch.Tensor, head_weight_VD: torch.Tensor, labels_BT: torch.Tensor,
                              chunk_rows: int | None = None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum over positions of -log p(labels[t+1] | ...), skipping IGNORE_INDEX targets. `labels` are unshifted
    (as LLM Foundry's loaders give them: input_ids with -100 where no loss is wanted)."""
    targets_N = shift_labels(labels_BT).reshape(-1)
    h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])
    dtype = compute_dtype or head_weight_VD.dtype
    if chunk_rows is None:
        chunk_rows = max(64, CHUNK_BYTES // (dtype.itemsize * head_weight_VD.shape[0]))
    return _ChunkedLinearCrossEntropy.apply(h_ND, head_weight_VD, targets_N, chunk_rows, dtype,
                                            torch.is_grad_enabled())
