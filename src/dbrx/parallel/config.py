"""The YAML's parallelism keys: torchtitan's `parallelism` block, and LLM Foundry's `fsdp_config` and
`model.ffn_config.moe_world_size` where they mean the same thing. A value this trainer cannot honour is an error
that names the key; Foundry keys that FSDP2 has no use for are accepted and said to have no effect."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dbrx.train.config import ConfigError

# Foundry's FSDP1 settings that FSDP2 makes moot: accepted (a Foundry YAML runs as it is), logged as unused.
_MOOT = ("limit_all_gathers", "use_orig_params", "sync_module_states", "forward_prefetch", "backward_prefetch",
         "verbose", "activation_checkpointing_reentrant", "load_monolith_rank0_only")
_MIXED = {"DEFAULT": (torch.bfloat16, torch.float32), "PURE": (torch.bfloat16, torch.bfloat16), "FULL": (None, None)}


@dataclass(frozen=True)
class ParallelConfig:
    dp_shard: int = 1  # ranks the non-expert weights are sharded over (FSDP2)
    ep: int = 1  # expert-parallel degree: ranks that split the experts between them
    reshard_after_forward: bool = True  # FULL_SHARD (True) or SHARD_GRAD_OP (False)
    param_dtype: torch.dtype | None = None  # FSDP2 MixedPrecisionPolicy; None: the parameters' own dtype
    reduce_dtype: torch.dtype | None = None
    activation_checkpointing: bool = False

    def describe(self) -> str:
        mp = "" if self.param_dtype is None else (f", params {str(self.param_dtype).removeprefix('torch.')} / "
                                                  f"reduce {str(self.reduce_dtype).removeprefix('torch.')}")
        return (f"FSDP2 over {self.dp_shard} ranks ({'FULL_SHARD' if self.reshard_after_forward else 'SHARD_GRAD_OP'}"
                f"{mp}{', activation checkpointing' if self.activation_checkpointing else ''}); expert parallel "
                f"degree {self.ep}")


def parallel_config(cfg: dict, world_size: int, num_experts: int, log=print) -> ParallelConfig:
    """Read and check `parallelism`, `fsdp_config` and `model.ffn_config.moe_world_size` against the job."""
    par = dict(cfg.get("parallelism") or {})
    fsdp = dict(cfg.get("fsdp_config") or {})
    for key in ("data_parallel_replicate_degree", "tensor_parallel_degree", "context_parallel_degree",
                "pipeline_parallel_degree"):
        if par.get(key, 1) not in (1, None):
            raise ConfigError(f"parallelism.{key}: {par[key]} is not offered; this trainer shards data (FSDP2) "
                              "and experts (expert_parallel_degree). Set it to 1")
    dp = par.get("data_parallel_shard_degree", fsdp.get("data_parallel_shard_degree", -1))
    if dp in (-1, None):
        dp = world_size
    if dp != world_size:
        raise ConfigError(f"parallelism.data_parallel_shard_degree: {dp} must be -1 or the world size "
                          f"({world_size}), since every rank shards the data")
    ep = par.get("expert_parallel_degree")
    moe_world = ((cfg.get("model") or {}).get("ffn_config") or {}).get("moe_world_size")
    if ep is not None and moe_world is not None and ep != moe_world:
        raise ConfigError(f"parallelism.expert_parallel_degree ({ep}) and model.ffn_config.moe_world_size "
                          f"({moe_world}) disagree; give one of them")
    key = "parallelism.expert_parallel_degree" if ep is not None else "model.ffn_config.moe_world_size"
    ep = ep if ep is not None else (moe_world if moe_world is not None else 1)
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise ConfigError(f"{key}: expected a positive integer, got {ep!r}")
    if num_experts % ep or world_size % ep:
        raise ConfigError(f"{key}: {ep} must divide the expert count ({num_experts}) and the world size "
                          f"({world_size})")

    for k in ("hybrid_sharding_degree", "replicate_degree"):
        if fsdp.get(k) not in (None, 1):
            raise ConfigError(f"fsdp_config.{k}: hybrid sharding is not offered; remove it")
    strategy = str(fsdp.get("sharding_strategy", "FULL_SHARD")).upper()
    if strategy not in ("FULL_SHARD", "SHARD_GRAD_OP"):
        raise ConfigError(f"fsdp_config.sharding_strategy: {strategy} is not offered with FSDP2 here; use FULL_SHARD "
                          "(reshard after forward) or SHARD_GRAD_OP (keep gathered until backward)")
    mixed = fsdp.get("mixed_precision")
    if mixed is None:
        param_dtype = reduce_dtype = None
    elif isinstance(mixed, str) and mixed.upper() in _MIXED:
        param_dtype, reduce_dtype = _MIXED[mixed.upper()]
    else:
        raise ConfigError(f"fsdp_config.mixed_precision: {mixed!r} is not one of DEFAULT (bf16 parameters, fp32 "
                          "gradient reduction), PURE (bf16 both) or FULL (fp32)")
    state = str(fsdp.get("state_dict_type", "sharded")).lower()
    if state != "sharded":
        raise ConfigError(f"fsdp_config.state_dict_type: {state!r}; checkpoints are Distributed Checkpoint shards "
                          "('sharded'), and SAVE_FOLDER/hf holds the whole model in Hugging Face format")
    for k in ("cpu_offload", "activation_cpu_offload"):
        if fsdp.get(k):
            raise ConfigError(f"fsdp_config.{k}: offloading is not offered; remove it")
    unused = [k for k in _MOOT if k in fsdp]
    if unused and world_size > 1:
        log(f"fsdp_config: {', '.join(unused)} have no effect under FSDP2")
    return ParallelConfig(dp_shard=dp, ep=ep, reshard_after_forward=strategy == "FULL_SHARD",
                          param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                          activation_checkpointing=bool(fsdp.get("activation_checkpointing", False)))
