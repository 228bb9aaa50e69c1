"""The output head laid out for decoding several rows at once, chosen by measurement when the server starts.

A decode step of 8 requests multiplies 8 hidden states by the head [V, D], the largest matrix a step reads. On a CPU
the library's product for a few rows streams the head at a fraction of the bandwidth one row gets (this Xeon, fp32,
dbrx-small's 100,352 x 512 head: 8.8 GB/s for 8 rows, 22.5 for one). Cut into column blocks [blocks, D, 256] and
multiplied as one batched product, the same 8 rows stream at ~17 GB/s, and each logit is the same sum in the same
order as the column-major head's: the server uses it only where its logits equal the model's head bit for bit and
where it measures faster. One row still goes through the stored head (a matrix-vector product, a little faster
than the blocks), so the blocks are a second copy of the head: the line printed at start-up says how large.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from dbrx.model import DbrxForCausalLM

BLOCK = 256


class BlockedHead(nn.Module):
    """x [..., D] -> logits [..., V]: one row through the stored head, several through a copy of it laid out as
    [ceil(V / BLOCK), D, BLOCK] (zero columns pad the last block and are cut from the output). `weight` is the
    stored head's, so code that reads lm_head.weight keeps working."""

    def __init__(self, head: nn.Linear, block: int = BLOCK):
        super().__init__()
        self.stored = head
        weight_VD = head.weight.detach()
        V, D = weight_VD.shape
        n = -(-V // block)
        padded = weight_VD.new_zeros(n * block, D)
        padded[:V] = weight_VD
        self.register_buffer("blocks_nDc", padded.view(n, block, D).transpose(1, 2).contiguous(), persistent=False)
        self.vocab_size = V

    @property
    def weight(self) -> torch.Tensor:
        return self.stored.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, D, block = self.blocks_nDc.shape
        x_RD = x.reshape(-1, D)
        if x_RD.shape[0] == 1:
            return self.stored(x)
        out_nRc = torch.bmm(x_RD.expand(n, *x_RD.shape), self.blocks_nDc)
        return out_nRc.transpose(0, 1).reshape(x_RD.shape[0], n * block)[:, :self.vocab_size].reshape(
            *x.shape[:-1], self.vocab_size)


def _best_seconds(fns, reps: int = 7) -> list[float]:
    """The best time of each function, measured in turns (so that a slow spell of the machine touches all)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@torch.inference_mode()
def use_blocked_head(model: DbrxForCausalLM, rows: int) -> str | None:
    """Give model.lm_head a BlockedHead for several rows where, on this machine, its logits equal the stored head's
    for every row count from 2 to `rows` (up to 16, and `rows` itself) and it is at least 10% faster at `rows`
    rows. Returns a line saying what was measured and chosen, or None where it was not tried (not a CPU, a
    single row, a head already blocked or quantised)."""
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.weight.device.type != "cpu" or rows < 2:
        return None  # a head already blocked or quantised, off the CPU, or a single row
    blocked = BlockedHead(head)
    x_RD = torch.randn(rows, head.weight.shape[1], generator=torch.Generator().manual_seed(0)).to(head.weight.dtype)
    same = all(torch.equal(blocked(x_RD[:r]), head(x_RD[:r])) for r in [*range(2, min(rows, 16) + 1), rows])
    stored_s, blocked_s = _best_seconds([lambda: head(x_RD), lambda: blocked(x_RD)])
    figures = f"{rows} rows {stored_s * 1e3:.1f} -> {blocked_s * 1e3:.1f} ms"
    if same and blocked_s < 0.9 * stored_s:
        model.lm_head = blocked
        size = blocked.blocks_nDc.numel() * blocked.blocks_nDc.element_size()
        return (f"output head: a copy in column blocks for batched decoding ({figures}, logits identical; "
                f"{size / 2**20:,.0f} MiB more memory)")
    reason = "not faster" if same else "logits not identical to the stored head's"
    return f"output head as stored ({reason}: {figures})"
