"""The Hugging Face export of a sharded model, written from the shards: each rank writes one safetensors file
holding whole tensors (an equal share of the bytes), gathering one tensor at a time, so no rank ever holds the
whole model. Rank 0 adds the index, config.json and generation_config.json: the layout transformers and
`DbrxForCausalLM.from_pretrained` load, equal to the single-process export of the same weights. With LoRA, each
adapted weight is merged as it is gathered (merge_lora's result, one tensor at a time)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from dbrx.checkpoint import write_configs, write_index
from dbrx.fileio import atomic_path
from dbrx.lora import merge_sources, merged_weight, plain_names
from dbrx.parallel.runtime import Dist


def _owners(shapes: dict[str, tuple[torch.Size, torch.dtype]], world: int) -> dict[str, int]:
    """Each tensor's writer: the largest first, each to the rank with the fewest bytes so far."""
    load = [0] * world
    owner = {}
    for name, (shape, dtype) in sorted(shapes.items(), key=lambda kv: -kv[1][0].numel() * kv[1][1].itemsize):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += shape.numel() * dtype.itemsize
    return owner


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it), detached; a plain tensor as it is."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def export_from_shards(model: torch.nn.Module, dist: Dist, path: Path) -> None:
    """Every rank calls this (the gathers are collectives); `path` must exist."""
    state = model.state_dict()
    plain = plain_names(model)  # state_dict name -> transformers' name, adapters left out
    merges = merge_sources(model)
    shapes = {name: (state[key].shape, state[key].dtype) for key, name in plain.items()}
    owner = _owners(shapes, dist.world_size)
    files = [f"model-{r + 1:05d}-of-{dist.world_size:05d}.safetensors" for r in range(dist.world_size)]
    mine = {}
    for key, name in plain.items():
        whole = gathered(state[key])
        if name in merges:
            _, a, b, scaling = merges[name]
            whole = merged_weight(whole, gathered(state[a]), gathered(state[b]), scaling)
        if owner[name] == dist.rank:
            mine[name] = whole.contiguous().cpu()
        del whole
    with atomic_path(path / files[dist.rank]) as tmp:
        save_file(mine, tmp, metadata={"format": "pt"})
    del mine
    dist.barrier()
    if not dist.is_main:
        return
    write_index(path, {name: files[owner[name]] for name in shapes}, sum(s.numel() * d.itemsize for s, d in shapes.values()))
    write_configs(path, model.config, next(iter(shapes.values()))[1])
