"""The Hugging Face export of a sharded model, written from the shards: each rank writes one safetensors file
holding whole tensors (an equal share of the bytes), gathering one tensor at a time, so no rank ever holds the
whole model. Rank 0 adds the index, config.json and generation_config.json: the layout transformers and
`DbrxForCausalLM.from_pretrained` load, equal to the single-process export of the same weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from dbrx.checkpoint import write_configs, write_index
from dbrx.fileio import atomic_path
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


def export_from_shards(model: torch.nn.Module, dist: Dist, path: Path) -> None:
    """Every rank calls this (the gathers are collectives); `path` must exist."""
    state = model.state_dict()
    shapes = {name: (t.shape, t.dtype) for name, t in state.items()}
    owner = _owners(shapes, dist.world_size)
    files = [f"model-{r + 1:05d}-of-{dist.world_size:05d}.safetensors" for r in range(dist.world_size)]
    mine = {}
    for name, t in state.items():
        whole = t.full_tensor() if hasattr(t, "full_tensor") else t
        if owner[name] == dist.rank:
            mine[name] = whole.detach().contiguous().cpu()
        del whole
    with atomic_path(path / files[dist.rank]) as tmp:
        save_file(mine, tmp, metadata={"format": "pt"})
    del mine
    dist.barrier()
    if not dist.is_main:
        return
    write_index(path, {name: files[owner[name]] for name in state},
                sum(s.numel() * d.itemsize for s, d in shapes.values()))
    write_configs(path, model.config, next(iter(state.values())).dtype)
