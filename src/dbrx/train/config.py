"""The training YAML: LLM Foundry's keys, dotted overrides from the command line, and validation that names the
key, the nearest valid key and what was expected. Nothing unknown is silently ignored."""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# A schema is a dict of key -> spec. A spec is a type name, a tuple of allowed strings, a nested schema, or
# ("map", schema) for a mapping of user-chosen names to entries of `schema` (dataset streams).
_STREAM = {"local": "path", "remote": "path", "split": "str", "proportion": "number", "repeat": "number"}
_DATASET = {
    "local": "path", "remote": "path", "split": "str", "shuffle": "bool", "shuffle_seed": "int",
    "max_seq_len": "int", "streams": ("map", _STREAM), "eos_token_id": "int",
    # fine-tuning (the finetuning loader)
    "hf_name": "str", "hf_kwargs": "dict", "preprocessing_fn": "any", "decoder_only_format": "bool",
    "target_responses": "str", "target_prompts": "str", "packing_ratio": "any", "strict": "bool",
    "allow_pad_trimming": "bool", "data_files": "any", "data_dir": "path", "safe_load": "bool",
}
_LOADER = {"name": ("text", "finetuning"), "dataset": _DATASET, "drop_last": "bool", "num_workers": "int",
           "pin_memory": "bool", "prefetch_factor": "int", "persistent_workers": "bool", "timeout": "number"}
_CURRICULUM = {"duration": "time", "schedule": "list"}
SCHEMA: dict[str, Any] = {
    "seed": "int",
    "run_name": "str",
    "max_seq_len": "int",
    "device": ("cpu", "cuda", "auto"),
    "model": "dict",  # checked against DbrxConfig by the trainer (preset, pretrained, any config field)
    "tokenizer": {"name": "str", "kwargs": "dict"},
    "train_loader": _LOADER,
    "eval_loader": _LOADER,
    "optimizer": {"name": ("decoupled_adamw", "adamw"), "lr": "number", "betas": "list", "eps": "number",
                  "weight_decay": "number", "lr_multipliers": "dict"},
    "scheduler": {"name": ("cosine_with_warmup", "linear_decay_with_warmup", "constant_with_warmup"),
                  "t_warmup": "time", "alpha_f": "number"},
    "algorithms": {"gradient_clipping": {"clipping_type": ("norm",), "clipping_threshold": "number"}},
    "max_duration": "time",
    "eval_interval": "time",
    "eval_first": "bool",
    "eval_subset_num_batches": "int",
    # in-context-learning evaluation at eval_interval (dbrx.eval; LLM Foundry's keys, plus our dataset_root)
    "icl_tasks": "section",
    "eval_gauntlet": "section",
    "icl_subset_num_batches": "int",
    "icl_seq_len": "int",
    "dataset_root": "path",
    "allow_code_execution": "bool",  # code_evaluation tasks run the model's programs (in dbrx.eval.sandbox)
    "save_interval": "time",
    "save_folder": "path",
    "save_num_checkpoints_to_keep": "int",
    "save_overwrite": "bool",
    "autoresume": "bool",
    "global_train_batch_size": "int",
    "device_train_microbatch_size": "int",
    "device_eval_batch_size": "int",
    "precision": ("auto", "fp32", "amp_bf16"),
    "callbacks": {"curriculum_learning": _CURRICULUM, "speed_monitor": "dict", "lr_monitor": "dict",
                  "memory_monitor": "dict", "runtime_estimator": "dict"},
    "loggers": {"tensorboard": {"log_dir": "path", "flush_interval": "int"}},
    "console_log_interval": "time",
    "progress_bar": "bool",
    "log_to_console": "bool",
    "python_log_level": "str",
    "dist_timeout": "number",
    # scale-out (dbrx.parallel): torchtitan's names, and LLM Foundry's fsdp_config
    "parallelism": {"data_parallel_shard_degree": "int", "data_parallel_replicate_degree": "int",
                    "expert_parallel_degree": "int", "tensor_parallel_degree": "int",
                    "context_parallel_degree": "int", "pipeline_parallel_degree": "int"},
    "fsdp_config": {"sharding_strategy": "str", "mixed_precision": "str", "activation_checkpointing": "bool",
                    "activation_checkpointing_reentrant": "bool", "activation_cpu_offload": "bool",
                    "state_dict_type": "str", "cpu_offload": "bool", "limit_all_gathers": "bool",
                    "use_orig_params": "bool", "sync_module_states": "bool", "forward_prefetch": "bool",
                    "backward_prefetch": "str", "verbose": "bool", "load_monolith_rank0_only": "bool",
                    "data_parallel_shard_degree": "int", "hybrid_sharding_degree": "int",
                    "replicate_degree": "int"},
}
# The tokenizer is DBRX's cl100k; these are the names Foundry configs give it.
TOKENIZER_NAMES = ("cl100k_base", "dbrx", "databricks/dbrx-instruct", "databricks/dbrx-base",
                   "transformers-community/dbrx-instruct")

DEFAULTS: dict[str, Any] = {
    "seed": 17,
    "device": "auto",
    "optimizer": {"name": "decoupled_adamw", "lr": 6.0e-4, "betas": [0.9, 0.95], "eps": 1.0e-8,
                  "weight_decay": 0.0},
    "scheduler": {"name": "cosine_with_warmup", "t_warmup": "0ba", "alpha_f": 0.1},
    "algorithms": {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0}},
    "eval_interval": "1ep",
    "eval_first": False,
    "save_num_checkpoints_to_keep": -1,
    "autoresume": False,
    "precision": "auto",
    "console_log_interval": "10ba",
    "progress_bar": True,
}

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_TIME = re.compile(r"^(\d+(?:\.\d+)?)([KMBT]?)(ba|tok|ep|sp|dur|min|h|s)$")
_SCALE = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_SECONDS = {"s": 1, "min": 60, "h": 3600}


@dataclass(frozen=True)
class Time:
    """A duration in Composer's units: batches (ba), tokens (tok), epochs (ep), samples (sp) or a fraction of
    the whole run (dur, as in `eval_interval: 0.25dur`); or, our extension for max_duration, wall-clock time
    (`9min`, `90s`, `1.5h`, kept in seconds as unit "s"): the run then sizes itself to that budget."""

    value: float
    unit: str

    @classmethod
    def parse(cls, text: str | int, key: str = "") -> "Time":
        if isinstance(text, int) and not isinstance(text, bool):
            return cls(float(text), "ba")  # Composer reads a bare integer as batches
        m = _TIME.match(str(text).strip()) if isinstance(text, str) else None
        if not m or (m.group(3) in _SECONDS and m.group(2)):
            raise ConfigError(f"{key}: {text!r} is not a duration; expected a number with a unit: "
                              "'2000ba' (batches), '10Mtok' (tokens), '1ep' (epochs), '512sp' (samples), "
                              "'0.25dur' (a fraction of the run), or for max_duration a wall-clock budget "
                              "('9min', '600s', '2h')")
        value, unit = float(m.group(1)) * _SCALE[m.group(2)], m.group(3)
        if unit in _SECONDS:
            return cls(value * _SECONDS[unit], "s")
        return cls(value, unit)

    @property
    def wall_clock(self) -> bool:
        return self.unit == "s"

    def __str__(self) -> str:
        return f"{self.value:g}{self.unit}"


class ConfigError(ValueError):
    """A problem in the training YAML or its overrides; the message names the key."""


def _check(values: Any, schema: dict, where: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'the config'}: expected a mapping of keys, got {type(values).__name__}")
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in schema:
            near = difflib.get_close_matches(str(key), list(schema), n=1, cutoff=0.6)
            hint = f"; did you mean '{(where + '.') if where else ''}{near[0]}'?" if near else ""
            raise ConfigError(f"unknown key '{path}'{hint}")
        _check_value(value, schema[key], path)


def _check_value(value: Any, spec: Any, path: str) -> None:
    if value is None:
        return
    if isinstance(spec, dict):
        _check(value, spec, path)
    elif isinstance(spec, tuple) and spec and spec[0] == "map":
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of names to entries, got {value!r}")
        for name, entry in value.items():
            _check(entry, spec[1], f"{path}.{name}")
    elif isinstance(spec, tuple):
        if value not in spec:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, spec))}")
    elif spec == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
    elif spec == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
    elif spec == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
    elif spec in ("str", "path"):
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
    elif spec == "time":
        Time.parse(value, path)
    elif spec == "list":
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
    elif spec == "dict":
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
    elif spec == "section":  # inline, or a path to a YAML file holding it (checked by dbrx.eval)
        if not isinstance(value, (list, dict, str)):
            raise ConfigError(f"{path}: expected a list, a mapping or a path to a YAML file, got {value!r}")


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(cfg: dict, override: str) -> None:
    """`a.b.c=value`; the value is parsed as YAML (numbers, booleans, lists, null)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    dotted, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string; on a command line it means a number
    node = cfg
    keys = dotted.strip().split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: '{key}' is not a mapping")
    node[keys[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> dict:
    """Read YAML (or start from `base`), apply overrides, fill defaults, validate. Returns a plain dict."""
    cfg: dict = copy.deepcopy(base) if base else {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        cfg = _merge(cfg, loaded or {})
    for override in overrides:
        apply_override(cfg, override)
    _check(cfg, SCHEMA, "")
    cfg = _merge(DEFAULTS, cfg)
    for required in ("max_seq_len", "model", "train_loader", "max_duration", "global_train_batch_size"):
        if required not in cfg:
            raise ConfigError(f"missing required key '{required}'")
    name = (cfg.get("tokenizer") or {}).get("name")
    if name is not None and name not in TOKENIZER_NAMES:
        raise ConfigError(f"tokenizer.name: {name!r} is not DBRX's tokenizer; use one of {', '.join(TOKENIZER_NAMES)}")
    cfg.setdefault("device_train_microbatch_size", cfg["global_train_batch_size"])
    cfg.setdefault("device_eval_batch_size", cfg["device_train_microbatch_size"])
    if cfg["global_train_batch_size"] % cfg["device_train_microbatch_size"]:
        raise ConfigError(
            f"global_train_batch_size ({cfg['global_train_batch_size']}) must be a multiple of "
            f"device_train_microbatch_size ({cfg['device_train_microbatch_size']})"
        )
    return cfg
