"""Checkpoints of a sharded run: Distributed Checkpoint (DCP) shards of the model and optimizer, which any world
size can load (DCP reshards on load). A single-process run keeps its own format (model.safetensors and
optimizer.safetensors); each side reads the other's, so a run saved at one layout resumes at another."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

DCP_METADATA = ".metadata"


def is_sharded(path: Path) -> bool:
    return (path / DCP_METADATA).exists()


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Every rank writes its own shards into `path` (a collective: all ranks call it)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """DCP shards written at any world size into this model and optimizer, sharded or not."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():  # a single process reading shards is the intent, not a mistake
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_single_process(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path,
                        param_groups: list[dict]) -> None:
    """A single-process checkpoint (full tensors; optimizer moments keyed by parameter index) into a sharded
    model and optimizer: every rank reads the files and keeps its own shard."""
    weights = load_file(path / "model.safetensors")
    # optimizer.state_dict() numbers parameters in the optimizer's group order, not the model's
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    flat = load_file(path / "optimizer.safetensors")
    state: dict[str, dict] = {}
    for key, t in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(names[int(idx)], {})[name] = t
    groups = []
    for group in param_groups:
        groups.append({**group, "params": [names[i] for i in group["params"]]})
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict={"state": state, "param_groups": groups},
                   options=StateDictOptions(full_state_dict=True))


def load_pretrained_sharded(model: torch.nn.Module, path: str | Path, seed: int = 0) -> None:
    """A Hugging Face-format checkpoint (safetensors, single file or shards + index) into a sharded model whose
    parameters are already on their devices (uninitialised): DCP's Hugging Face reader gives each rank just its own
    pieces, converted to the parameters' dtype. Tensor names and shapes are checked first, naming the tensor.
    LoRA adapters, if the model has them, take their initial values from `seed` (as build_model gives them in one
    process); their base weights are read under transformers' names."""
    from dbrx.checkpoint import check_against, read_header
    from dbrx.lora import plain_names
    from dbrx.parallel.init import init_adapters_sharded

    state = model.state_dict()
    plain = {name: state[key] for key, name in plain_names(model).items()}  # the same tensors, checkpoint names
    check_against(plain, read_header(Path(path)), Path(path))  # names a missing, unexpected or misshapen tensor
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(plain, storage_reader=dcp.HuggingFaceStorageReader(str(path)))
    init_adapters_sharded(model, seed)
