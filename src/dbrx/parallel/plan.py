"""Memory per device of a sharded training run, from the model's shape alone (a meta-device model: nothing is
allocated), so that a run that cannot fit is refused before it starts.

What one device holds, FSDP2 with expert parallelism:
- parameters, gradients and AdamW's two moments, fp32, sharded over all N ranks (the experts split over the EP
  ranks, then FSDP-sharded over the N / EP ranks holding the same experts: N shares either way);
- the gathered units: the root (embedding and head) stays gathered from its forward to its backward; a block
  is gathered for its own forward and backward (two at once, with prefetching), experts local to this rank only;
  the gathered block's unsharded gradient before its reduce-scatter (in the reduce dtype);
- activations of one micro-batch: with activation checkpointing, each block's input plus one block's full
  activations (recomputed in backward); without, every block's; and the head's chunked logits.
Estimates, not measurements: allocator overhead and communication buffers come on top (about 5-10%)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dbrx.config import DbrxConfig

GB = 1e9
OPTIMIZER_BYTES = {"adamw": 8, "sgd": 0}  # fp32 state per parameter: AdamW's two moments; plain SGD none


@dataclass
class MemoryPlan:
    nproc: int
    ep: int
    parameters: float
    gradients: float
    optimizer: float
    gathered: float
    activations: float
    device_bytes: float | None = None

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.gathered + self.activations

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.total <= self.device_bytes

    def table(self) -> str:
        rows = [("parameters (fp32, sharded)", self.parameters), ("gradients (fp32, sharded)", self.gradients),
                ("optimizer state", self.optimizer), ("gathered root + blocks, unsharded grads", self.gathered),
                ("activations", self.activations), ("total per device", self.total)]
        out = [f"{name:<42} {value / GB:9.1f} GB" for name, value in rows]
        if self.device_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"{verdict} in {self.device_bytes / GB:.0f} GB per device "
                       f"({self.nproc} processes, expert parallel {self.ep})")
        return "\n".join(out)


def _counts(config: DbrxConfig) -> tuple[int, int, int, int]:
    """(root parameters, one block's non-expert parameters, one block's expert parameters, all parameters)."""
    from dbrx.model import DbrxForCausalLM

    with torch.device("meta"):
        model = DbrxForCausalLM(config)
    block = model.transformer.blocks[0]
    expert = sum(p.numel() for p in block.ffn.experts.parameters())
    block_all = sum(p.numel() for p in block.parameters())
    total = sum(p.numel() for p in model.parameters())
    root = total - config.n_layers * block_all
    return root, block_all - expert, expert, total


def memory_plan(config: DbrxConfig, nproc: int, ep: int = 1, seq: int = 4096, micro_batch: int = 1,
                optimizer: str = "adamw", activation_checkpointing: bool = False,
                param_dtype: torch.dtype = torch.bfloat16, device_bytes: float | None = None,
                frozen_base: bool = False) -> MemoryPlan:
    """`frozen_base`: LoRA, whose base weights have no gradients or optimizer state (the adapters' are small)."""
    if nproc < 1 or ep < 1 or nproc % ep or config.num_experts % ep:
        raise ValueError(f"expert parallel degree {ep} must divide the process count ({nproc}) and the expert count "
                         f"({config.num_experts})")
    if optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"optimizer {optimizer!r}: one of {', '.join(OPTIMIZER_BYTES)}")
    root, block_dense, block_expert, total = _counts(config)
    params = total * 4 / nproc
    grads = 0.0 if frozen_base else params
    opt = 0.0 if frozen_base else total * OPTIMIZER_BYTES[optimizer] / nproc
    p_bytes = torch.empty((), dtype=param_dtype).element_size()
    local_block = block_dense + block_expert / ep
    gathered = root * p_bytes + 2 * local_block * p_bytes + (0 if frozen_base else local_block * 4 + root * 4 / nproc)

    tokens = seq * micro_batch
    d, f, k = config.d_model, config.ffn_config.ffn_hidden_size, config.top_k
    qkv = d + 2 * config.kv_n_heads * config.head_dim
    # One block's saved activations per token, in bf16 (2 bytes): norms, qkv, attention output and out_proj,
    # residuals; the routed copies of each token (top k), their w1/v1 outputs, the activation and w2's output.
    block_act = 2 * tokens * (4 * d + qkv + 2 * d + k * (d + 3 * f + d))
    head = min(512 * 2**20, tokens * config.vocab_size * 4) + tokens * d * 4 * 2  # a chunk of logits, dh, h
    if activation_checkpointing:
        acts = config.n_layers * 2 * tokens * d + block_act + head
    else:
        acts = config.n_layers * block_act + head
    return MemoryPlan(nproc, ep, params, grads, opt, gathered, acts, device_bytes)
