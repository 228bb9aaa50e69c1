"""FSDP2 (`fully_shard`) over the data-parallel mesh: each block is its own unit (gathered for its forward and
backward only), the root holds the embedding, the final norm and the head.

Gradients are reduced as sums, not means: the trainer divides token losses by the whole global batch's token
count and takes the load-balancing loss from all-reduced counts, so the summed gradient is the one-process
gradient for any world size."""

from __future__ import annotations

import functools

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint

from dbrx.model import DbrxForCausalLM
from dbrx.parallel.config import ParallelConfig
from dbrx.parallel.expert import apply_expert_parallel
from dbrx.parallel.runtime import Dist


def _checkpoint_block(block: torch.nn.Module) -> None:
    """Recompute the block's activations in backward. The forward is wrapped on the instance, so the module
    tree and state_dict keys stay transformers' own."""
    block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def parallelize(model: DbrxForCausalLM, dist: Dist, pcfg: ParallelConfig, device: torch.device) -> DeviceMesh:
    """Shard `model` in place over all ranks; returns the data-parallel mesh."""
    mesh = init_device_mesh(device.type, (dist.world_size,), mesh_dim_names=("dp_shard",))
    mp = MixedPrecisionPolicy(param_dtype=pcfg.param_dtype, reduce_dtype=pcfg.reduce_dtype)
    expert_mesh = None
    if pcfg.ep > 1:  # experts split over `ep`, then FSDP-sharded over the ranks holding the same experts
        experts_2d = init_device_mesh(device.type, (dist.world_size // pcfg.ep, pcfg.ep),
                                      mesh_dim_names=("dp_mod_ep", "ep"))
        apply_expert_parallel(model, experts_2d["ep"])
        expert_mesh = experts_2d["dp_mod_ep"]
    for block in model.transformer.blocks:
        if pcfg.activation_checkpointing:
            _checkpoint_block(block)
        if expert_mesh is not None:
            fully_shard(block.ffn.experts, mesh=expert_mesh, mp_policy=mp,
                        reshard_after_forward=pcfg.reshard_after_forward)
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=pcfg.reshard_after_forward)
    # The root (embedding, final norm, head) stays gathered from its forward to its backward: the head's chunked
    # loss reads lm_head.weight after hidden_states returns.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    model.compute_dtype = pcfg.param_dtype  # generation's KV cache in the gathered dtype, not the shards' fp32
    # The trainer calls hidden_states (the head's loss is chunked outside the module), not forward.
    register_fsdp_forward_method(model, "hidden_states")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum
    return mesh
