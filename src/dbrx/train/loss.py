"""Next-token cross-entropy through the 100k-vocab head, in row chunks.

The head's fp32 logits for a whole micro-batch would be [tokens, 100352] floats (1.6 GB for 4096 tokens). Here
each chunk's logits live only inside the forward: the chunk's loss and its gradients with respect to the hidden
states and to the head's weight are computed there and then (softmax - one-hot), and backward only scales them.
The FLOPs are those of the unchunked loss: one forward and two backward matmuls per chunk.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, chunk_rows, compute_dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        device_type = h_ND.device.type
        with torch.autocast(device_type, enabled=False):
            w = w_VD.to(compute_dtype)
            acc = torch.promote_types(compute_dtype, torch.float32)  # fp32 softmax for bf16/fp16 matmuls
            total = torch.zeros((), dtype=acc, device=h_ND.device)
            grad_h = torch.empty_like(h_ND, dtype=compute_dtype) if need_h else None
            # grad_w is accumulated transposed, [D, V]: h.T @ dlogits runs about 2.5x faster on CPU than
            # dlogits.T @ h, and its transpose has lm_head's own column-major layout.
            grad_w_DV = torch.zeros(w_VD.shape[::-1], dtype=acc, device=w_VD.device) if need_w else None
            for start in range(0, h_ND.shape[0], chunk_rows):
                h = h_ND[start:start + chunk_rows].to(compute_dtype)
                y = labels_N[start:start + chunk_rows]
                valid = y != IGNORE_INDEX
                y_safe = torch.where(valid, y, 0)
                # The [rows, 100k] passes over memory, not the matmuls, are what a CPU step spends time on here:
                # converting first and then running the fp32 kernel beats log_softmax(bf16, dtype=fp32).
                logp_nV = torch.log_softmax((h @ w.T).to(acc), dim=-1)
                total -= (logp_nV.gather(1, y_safe[:, None])[:, 0] * valid).sum()
                if need_h or need_w:
                    dlogits_nV = logp_nV.exp_()  # softmax, in place
                    dlogits_nV[torch.arange(len(y), device=y.device), y_safe] -= 1.0
                    if not bool(valid.all()):
                        dlogits_nV.mul_(valid[:, None])
                    dlogits_nV = dlogits_nV.to(compute_dtype)
                    if need_h:
                        grad_h[start:start + chunk_rows] = dlogits_nV @ w
                    if need_w:
                        grad_w_DV += (h.T @ dlogits_nV).to(acc)
        ctx.save_for_backward(grad_h, None if grad_w_DV is None else grad_w_DV.t())
        ctx.dtypes = (h_ND.dtype, w_VD.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = None if grad_h is None else (grad_h * grad_total).to(h_dtype)
        gw = None if grad_w is None else (grad_w * grad_total).to(w_dtype)
        return gh, gw, None, None, None


def shift_labels(labels_BT: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1; the last position predicts nothing."""
    pad = torch.full_like(labels_BT[:, :1], IGNORE_INDEX)
    return torch.cat([labels_BT[:, 1:], pad], dim=1)


def chunked_cross_entropy_sum(h_BTD: torch.Tensor, head_weight_VD: torch.Tensor, labels_BT: torch.Tensor,
                              chunk_rows: int = 256, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum over positions of -log p(labels[t+1] | ...), skipping IGNORE_INDEX targets. `labels` are unshifted
    (as LLM Foundry's loaders give them: input_ids with -100 where no loss is wanted)."""
    targets_N = shift_labels(labels_BT).reshape(-1)
    h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])
    dtype = compute_dtype or head_weight_VD.dtype
    return _ChunkedLinearCrossEntropy.apply(h_ND, head_weight_VD, targets_N, chunk_rows, dtype)
