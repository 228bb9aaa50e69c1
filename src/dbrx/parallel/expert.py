"""Expert parallelism: over an `ep` mesh dimension, each rank holds whole experts (the fused w1/v1/w2 rows of
E / ep experts, as DTensors sharded on dim 0), and token copies reach their expert's rank by all-to-all with
uneven splits, then come back the same way. Dropless, like the single-device MoE: every copy is computed.

The experts run on local tensors (grouped matmul on DTensors would gather every expert). Their weights are then
FSDP-sharded over the ranks that hold the same experts (the `dp_mod_ep` dimension), so that a DCP checkpoint sees
each expert tensor's global shape and reshards to any layout."""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.nn.functional import all_to_all_single
from torch.distributed.tensor import Shard, distribute_tensor

from dbrx.model import DbrxForCausalLM


def _local(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if hasattr(w, "to_local") else w


def _ep_forward(self, x_ND: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor,
                impl: str = "grouped") -> torch.Tensor:
    """DbrxExperts.forward with this rank's experts only; the other ranks' experts are reached by all-to-all."""
    mlp, group = self.mlp, self.ep_group
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    E, F_, D = mlp.num_experts, mlp.ffn_hidden_size, mlp.d_model
    per = E // ep
    N, K = experts_NK.shape

    # Token copies sorted by expert: experts are contiguous per rank, so this also sorts them by destination.
    flat_S = experts_NK.reshape(-1)
    order_S = flat_S.argsort(stable=True)
    x_SD = x_ND.index_select(0, order_S // K)
    counts_E = torch.bincount(flat_S, minlength=E)
    # How many copies each source rank sends to each of this rank's experts: [ep sources, per local experts].
    recv_counts = torch.empty_like(counts_E)
    dist.all_to_all_single(recv_counts, counts_E, group=group)
    send_splits = counts_E.view(ep, per).sum(1).tolist()
    recv_RJ = recv_counts.view(ep, per)
    recv_splits = recv_RJ.sum(1).tolist()
    x_recv = all_to_all_single(x_SD.new_empty(sum(recv_splits), D), x_SD, recv_splits, send_splits, group=group)

    # Received rows come grouped by source rank, then by local expert: regroup them by local expert.
    expert_of_row = torch.repeat_interleave(torch.arange(per, device=x_ND.device).repeat(ep), recv_RJ.reshape(-1))
    order_R = expert_of_row.argsort(stable=True)
    x_local = x_recv.index_select(0, order_R)
    sizes = recv_RJ.sum(0).tolist()
    w1, v1, w2 = (_local(w) for w in (mlp.w1, mlp.v1, mlp.w2))
    device = x_ND.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        w1, v1, w2 = (w.to(dtype) for w in (w1, v1, w2))
    w1, v1, w2 = (w.view(per, F_, D) for w in (w1, v1, w2))
    if mlp.lora is not None:  # LoRA on the experts: this rank's experts' deltas, as ExpertLora.delta forms them
        lora = mlp.lora
        w1, v1, w2 = (w + torch.bmm(_local(lora.lora_B[m]), _local(lora.lora_A[m])) * lora.scaling
                      for w, m in zip((w1, v1, w2), ("w1", "v1", "w2")))
    outs = [mlp.glu(x_nD, w1[j], v1[j], w2[j]) for j, x_nD in enumerate(x_local.split(sizes)) if sizes[j] > 0]
    y_local = torch.cat(outs) if outs else x_local.new_zeros(0, D) + 0 * (w1.sum() + v1.sum() + w2.sum())
    y_recv = y_local.index_select(0, order_R.argsort())

    y_SD = all_to_all_single(y_recv.new_empty(sum(send_splits), D), y_recv, send_splits, recv_splits, group=group)
    y_NKD = y_SD.index_select(0, order_S.argsort()).view(N, K, D)
    # A weighted sum over each token's K copies; not a view (FSDP2 warns about a unit returning one).
    return (y_NKD * weights_NK.unsqueeze(-1).to(y_NKD.dtype)).sum(dim=1).to(x_ND.dtype)


def apply_expert_parallel(model: DbrxForCausalLM, ep_mesh: DeviceMesh) -> None:
    """Split every block's experts over `ep_mesh` (each rank keeps its own experts' rows) and route through
    all-to-all. Every rank must hold the same full weights before (same seed, or the same checkpoint)."""
    group = ep_mesh.get_group()
    for block in model.transformer.blocks:
        experts = block.ffn.experts
        mlp = experts.mlp
        # the fused experts and, with LoRA on them, their adapters ([E, r, D] and [E, F, r]): split by expert
        owners = [(mlp, name) for name in ("w1", "v1", "w2")]
        if mlp.lora is not None:
            owners += [(d, m) for d in (mlp.lora.lora_A, mlp.lora.lora_B) for m in ("w1", "v1", "w2")]
        for owner, name in owners:  # (a ParameterDict's entries are its attributes too)
            full = getattr(owner, name)
            setattr(owner, name, nn.Parameter(distribute_tensor(full.detach(), ep_mesh, [Shard(0)]),
                                              requires_grad=full.requires_grad))
        experts.ep_group = group
        experts.forward = types.MethodType(_ep_forward, experts)
