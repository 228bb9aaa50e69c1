"""Initial weights of a sharded run without any rank holding the model: it is built on the meta device, sharded,
and then each parameter is drawn whole on the host (one at a time, from the run's seed, in the model's order) and
each rank keeps its own pieces. Every world size therefore starts from exactly the weights a one-process run
starts from (DbrxForCausalLM.init_weights(seed)), and host memory peaks at the largest parameter."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from dbrx.lora import adapter_parameters, has_lora, initial_adapter_state
from dbrx.model import DbrxForCausalLM


def load_full_values(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Whole tensors (by state_dict name, identical on every rank) into a sharded model: each rank keeps its own
    pieces. Parameters not named are left as they are."""
    set_model_state_dict(model, values, options=StateDictOptions(full_state_dict=True, strict=False))


def init_adapters_sharded(model: torch.nn.Module, seed: int) -> None:
    """LoRA adapters of a sharded model: the values build_model gives them in one process (from `seed`)."""
    if has_lora(model):
        load_full_values(model, initial_adapter_state(model, torch.Generator().manual_seed(seed)))


def init_sharded(model: DbrxForCausalLM, seed: int) -> None:
    """Initialise a sharded model (its parameters on their devices, uninitialised) as build_model does in one
    process: the base weights from `seed`, then the LoRA adapters, if any."""
    adapters = {id(p) for p in adapter_parameters(model).values()}
    base = [name for name, p in model.named_parameters() if id(p) not in adapters]
    for name, value in model.initial_values(seed, base):
        load_full_values(model, {name: value})
        del value
    init_adapters_sharded(model, seed)
