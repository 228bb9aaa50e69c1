"""LoRA for DBRX: trainable low-rank adapters on a frozen model, merged back into plain weights for serving.

Shape legend: T tokens (any leading dims), D d_model, O a linear's output width, r the adapter rank, E experts,
F expert width (ffn_hidden_size).

Where adapters go (`target_modules`, LLM Foundry's key under `model.peft_config`):
- "Wqkv", "out_proj": each attention block's nn.Linear becomes a LoraLinear holding the original as `base`:
  y = base(x) + dropout(x) @ A.T @ B.T * (alpha / r), with A [r, D_in] and B [O, r].
- "experts": every expert's w1, v1 and w2 (the fused [E*F, D] checkpoint tensors) gains a delta
  B_e @ A_e * (alpha / r) with A [E, r, D] and B [E, F, r]. It is added to the weights in
  DbrxExpertGLU.per_expert(), so the grouped, few-token and reference MoE paths all see the same expert.
  Being a weight delta, it gets no input dropout (lora_dropout applies to the linears only).

B starts at zero, so an adapted model computes exactly what the base model computes until it is trained.
`merge_lora` folds the deltas into the base weights and restores the plain modules, so the model's state_dict has
transformers' DBRX keys again and saves as an ordinary checkpoint.

Adapters are saved as peft does (adapter_model.safetensors + adapter_config.json, keys
`base_model.model.<module>.lora_A.weight`), so a Wqkv/out_proj adapter is one that peft loads onto transformers'
DbrxForCausalLM. Expert adapters are named `base_model.model.<...>.mlp.w1.lora_A` [E, r, D] (peft has no LoRA
for DBRX's fused expert tensors).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dbrx.checkpoint import CheckpointError
from dbrx.fileio import atomic_path, atomic_write_text
from dbrx.moe import DbrxExpertGLU

TARGET_MODULES = ("Wqkv", "out_proj", "experts")
ATTENTION_TARGETS = ("Wqkv", "out_proj")
EXPERT_MATRICES = ("w1", "v1", "w2")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."

# Keys peft writes into adapter_config.json that carry no LoRA math: accepted and dropped when reading one.
_PEFT_BOOKKEEPING = frozenset({
    "base_model_name_or_path", "revision", "peft_version", "auto_mapping", "inference_mode", "init_lora_weights",
    "runtime_config", "megatron_core",
    "layers_pattern",  # only meaningful together with layers_to_transform, which must be null
    "qalora_group_size",  # only meaningful together with use_qalora, which must be false
})
# peft keys that would change the math: accepted only at their plain-LoRA value (null, false, none, {}, []).
_PEFT_NEUTRAL = (None, False, "none", {}, [])


# ---- config ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraConfig:
    """LLM Foundry's `model.peft_config` for LoRA: {peft_type: LORA, r, lora_alpha, lora_dropout, target_modules}."""

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("Wqkv", "out_proj")
    peft_type: str = "LORA"

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model.peft_config") -> "LoraConfig":
        """Validate a user's dict. Every error names the key (`where.key`); an unknown key or module name comes
        with the nearest valid one, so a typo never silently becomes a default."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping like {{peft_type: LORA, r: 8, ...}}, got {d!r}")
        names = [f.name for f in dataclasses.fields(cls)] + ["task_type"]
        for key in d:
            if key not in names:
                near = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean '{where}.{near[0]}'?" if near else f"; valid keys: {', '.join(names)}"
                raise ValueError(f"unknown key '{where}.{key}'{hint}")

        peft_type = d.get("peft_type", "LORA")
        if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
            raise ValueError(f"{where}.peft_type: only LORA is supported, got {peft_type!r}")
        task_type = d.get("task_type", "CAUSAL_LM")  # Foundry's examples carry it; DBRX is a causal LM
        if not isinstance(task_type, str) or task_type.upper() != "CAUSAL_LM":
            raise ValueError(f"{where}.task_type: expected CAUSAL_LM, got {task_type!r}")
        r = d.get("r", cls.r)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"{where}.r: expected a positive integer, got {r!r}")
        alpha = d.get("lora_alpha", cls.lora_alpha)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise ValueError(f"{where}.lora_alpha: expected a positive number, got {alpha!r}")
        dropout = d.get("lora_dropout", cls.lora_dropout)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"{where}.lora_dropout: expected a number in [0, 1), got {dropout!r}")
        targets = d.get("target_modules", list(cls.target_modules))
        if not isinstance(targets, (list, tuple)) or not targets:
            raise ValueError(f"{where}.target_modules: expected a non-empty list from "
                             f"{list(TARGET_MODULES)}, got {targets!r}")
        for name in targets:
            if name not in TARGET_MODULES:
                near = difflib.get_close_matches(str(name), TARGET_MODULES, n=1)
                hint = f"did you mean '{near[0]}'?" if near else f"valid: {', '.join(TARGET_MODULES)}"
                raise ValueError(f"{where}.target_modules: unknown module {name!r}; {hint}")
        return cls(r=r, lora_alpha=float(alpha), lora_dropout=float(dropout),
                   target_modules=tuple(dict.fromkeys(targets)), peft_type="LORA")

    def to_dict(self) -> dict[str, Any]:
        """The `model.peft_config` mapping (LLM Foundry's keys)."""
        return {"peft_type": self.peft_type, "r": self.r, "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout, "target_modules": list(self.target_modules)}

    def adapter_config(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """adapter_config.json as peft writes it (the keys that matter; peft defaults the rest)."""
        out = {**self.to_dict(), "task_type": "CAUSAL_LM"}
        if base_model_name_or_path is not None:
            out["base_model_name_or_path"] = base_model_name_or_path
        return out

    @classmethod
    def from_adapter_config(cls, d: dict[str, Any], where: str) -> "LoraConfig":
        """Read an adapter_config.json, ours or peft's: peft's bookkeeping is dropped, and a peft option that
        would change the math (DoRA, rsLoRA, biases, per-layer ranks, ...) is refused unless it is off."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} | {"task_type"}
        kept = {}
        for key, value in d.items():
            if key in names:
                kept[key] = value
            elif key in _PEFT_BOOKKEEPING:
                continue
            elif not any(value == v and type(value) is type(v) for v in _PEFT_NEUTRAL):
                # an option that is on: refuse rather than silently compute something else
                raise ValueError(f"{where}: {key} = {json.dumps(value)} is not supported (dbrx.lora loads plain "
                                 "LoRA adapters only)")
        return cls.from_dict(kept, where=where)


# ---- modules ---------------------------------------------------------------------------------------------------
def _kaiming_uniform_(t: torch.Tensor, fan_in: int, generator: torch.Generator | None = None) -> None:
    """kaiming_uniform_(a=sqrt(5)) as nn.Linear and peft initialise A: U(-1/sqrt(fan_in), 1/sqrt(fan_in)). The fan
    is given because torch would infer r*D for a stacked [E, r, D] tensor. A meta tensor (a sharded run builds
    the model there first) is left alone: initial_adapter_state gives its values later."""
    if t.device.type == "meta":
        return
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        t.uniform_(-bound, bound, generator=generator)


class LoraLinear(nn.Module):
    """A frozen nn.Linear (`base`) plus a trainable low-rank update: y = base(x) + dropout(x) @ A.T @ B.T * s."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))
        _kaiming_uniform_(self.lora_A, base.in_features, generator)
        self.scaling = lora_alpha / r
        self.lora_dropout = lora_dropout

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h_Tr = F.linear(F.dropout(x_TD, self.lora_dropout, self.training), self.lora_A)
        return self.base(x_TD) + F.linear(h_Tr, self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, scaling={self.scaling:g}, dropout={self.lora_dropout:g}"


class ExpertLora(nn.Module):
    """Low-rank deltas for DBRX's fused experts: expert e's [F, D] matrix m (w1, v1, w2) becomes
    W_e + s * B[m][e] @ A[m][e], with A[m] [E, r, D] and B[m] [E, F, r].

    Called by DbrxExpertGLU.per_expert() on the base weights viewed as [E, F, D] (already cast under autocast);
    returns per-expert [F, D] tensors in the same layout per_expert() gives without adapters. This forms E full
    [F, D] matrices per step: one bmm costing E*F*D*r multiply-adds per matrix, small beside the expert
    products of a training step (ratio E*r / (tokens*top_k)), but per-token decoding should use a merged model."""

    def __init__(self, mlp: DbrxExpertGLU, r: int, lora_alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        E, F_, D = mlp.num_experts, mlp.ffn_hidden_size, mlp.d_model
        like = {"dtype": mlp.w1.dtype, "device": mlp.w1.device}
        self.lora_A = nn.ParameterDict({m: nn.Parameter(torch.empty(E, r, D, **like)) for m in EXPERT_MATRICES})
        self.lora_B = nn.ParameterDict({m: nn.Parameter(torch.zeros(E, F_, r, **like)) for m in EXPERT_MATRICES})
        for m in EXPERT_MATRICES:  # in adapter_parameters() order (a ParameterDict lists its keys sorted)
            _kaiming_uniform_(self.lora_A[m], D, generator)
        self.scaling = lora_alpha / r

    def delta(self, m: str) -> torch.Tensor:
        """s * B @ A per expert, [E, F, D] (under autocast, in the autocast dtype)."""
        return torch.bmm(self.lora_B[m], self.lora_A[m]) * self.scaling

    def forward(self, weights_EFD: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], ...]:
        return tuple((w_EFD + self.delta(m)).unbind(0) for m, w_EFD in zip(EXPERT_MATRICES, weights_EFD))

    def extra_repr(self) -> str:
        return f"r={self.lora_A['w1'].shape[1]}, scaling={self.scaling:g}"


# ---- apply / merge ---------------------------------------------------------------------------------------------
def _attentions(model: nn.Module):
    for i, block in enumerate(model.transformer.blocks):
        yield f"transformer.blocks.{i}.norm_attn_norm.attn", block.norm_attn_norm.attn


def _expert_mlps(model: nn.Module):
    for i, block in enumerate(model.transformer.blocks):
        yield f"transformer.blocks.{i}.ffn.experts.mlp", block.ffn.experts.mlp


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) or (isinstance(m, DbrxExpertGLU) and m.lora is not None)
               for m in model.modules())


def _refuse_quantised(model: nn.Module) -> None:
    from dbrx.quant import QuantExperts, QuantLinear

    if any(isinstance(m, (QuantExperts, QuantLinear)) for m in model.modules()):
        raise ValueError("this model's weights are quantised (dbrx.quant, for inference): LoRA adapts and merges into "
                         "the unquantised weights; load the checkpoint it was quantised from, and quantise after "
                         "merging")


def apply_lora(model: nn.Module, cfg: LoraConfig, generator: torch.Generator | None = None) -> nn.Module:
    """Freeze every base parameter and attach trainable adapters where cfg.target_modules says (in place; the
    model is returned for chaining). Adapters take the dtype and device of the weights they adapt. A's initial
    values come from `generator` (a CPU generator; torch's global one by default), drawn in
    adapter_parameters() order."""
    _refuse_quantised(model)
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge_lora() it before applying new ones")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, attn in _attentions(model):
        for name in ATTENTION_TARGETS:
            if name in cfg.target_modules:
                setattr(attn, name, LoraLinear(getattr(attn, name), cfg.r, cfg.lora_alpha, cfg.lora_dropout,
                                               generator))
    if "experts" in cfg.target_modules:
        for _, mlp in _expert_mlps(model):
            mlp.lora = ExpertLora(mlp, cfg.r, cfg.lora_alpha, generator)
    return model


def initial_adapter_state(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The values apply_lora(model, cfg, generator) gives the adapters, as full CPU tensors under the model's
    state_dict names, computed without touching the model: for a model whose adapters were made on the meta
    device and then sharded, each rank loads its pieces of these (the same values at any world size)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for peft_name, p in adapter_parameters(model).items():
        value = torch.zeros(p.shape, dtype=p.dtype)
        if ".lora_A" in peft_name:
            _kaiming_uniform_(value, p.shape[-1], generator)
        out[names[id(p)]] = value
    return out


def merged_weight(w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """w + s * B @ A, formed in fp32 (or w's dtype if wider) and rounded once to w's dtype. A linear's [O, D]
    weight with A [r, D], B [O, r]; or a fused expert tensor [E*F, D] with A [E, r, D], B [E, F, r]."""
    dtype = torch.promote_types(w.dtype, torch.float32)
    A, B = lora_A.to(dtype), lora_B.to(dtype)
    delta = (torch.bmm(B, A) if A.ndim == 3 else B @ A) * scaling
    return (w.to(dtype).view(delta.shape) + delta).view_as(w).to(w.dtype)


def merge_sources(model: nn.Module) -> dict[str, tuple[str, str, str, float]]:
    """For each adapted weight, by its plain (transformers') name: the state_dict names of its base weight, A
    and B, and the scaling. merge_lora's result without merging in place: a sharded export gathers these and
    calls merged_weight one tensor at a time."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for path, attn in _attentions(model):
        for name in ATTENTION_TARGETS:
            lora = getattr(attn, name)
            if isinstance(lora, LoraLinear):
                out[f"{path}.{name}.weight"] = (names[id(lora.base.weight)], names[id(lora.lora_A)],
                                                names[id(lora.lora_B)], lora.scaling)
    for path, mlp in _expert_mlps(model):
        if mlp.lora is not None:
            for m in EXPERT_MATRICES:
                out[f"{path}.{m}"] = (names[id(getattr(mlp, m))], names[id(mlp.lora.lora_A[m])],
                                      names[id(mlp.lora.lora_B[m])], mlp.lora.scaling)
    return out


def plain_names(model: nn.Module) -> dict[str, str]:
    """state_dict name -> transformers' name for every base weight (adapters left out): what a checkpoint of the
    model without adapters calls each tensor."""
    renamed = {base: plain for plain, (base, _, _, _) in merge_sources(model).items()}
    ids = {id(p) for p in adapter_parameters(model).values()}
    adapters = {n for n, p in model.named_parameters() if id(p) in ids}
    return {n: renamed.get(n, n) for n in model.state_dict() if n not in adapters}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weights and put the plain modules back, so state_dict() has exactly
    transformers' keys and shapes. The sum is formed in fp32 (or the weights' dtype if wider) and rounded once to
    the weights' dtype. Base parameters stay frozen, as apply_lora left them; lm_head is not touched."""
    for _, attn in _attentions(model):
        for name in ATTENTION_TARGETS:
            lora = getattr(attn, name)
            if isinstance(lora, LoraLinear):
                w_OD = lora.base.weight
                w_OD.copy_(merged_weight(w_OD, lora.lora_A, lora.lora_B, lora.scaling))
                setattr(attn, name, lora.base)
    for _, mlp in _expert_mlps(model):
        if mlp.lora is None:
            continue
        for m in EXPERT_MATRICES:
            w = getattr(mlp, m)
            w.copy_(merged_weight(w, mlp.lora.lora_A[m], mlp.lora.lora_B[m], mlp.lora.scaling))
        del mlp.lora  # out of _modules, then a plain None attribute: the no-adapter path is as before
        mlp.lora = None
    return model


# ---- adapter files ---------------------------------------------------------------------------------------------
def adapter_shapes(model: nn.Module, cfg: LoraConfig) -> dict[str, tuple[int, ...]]:
    """The tensors (peft names -> shapes) that apply_lora(model, cfg) creates, computed without touching it."""
    _refuse_quantised(model)
    out = {}
    for path, attn in _attentions(model):
        for name in ATTENTION_TARGETS:
            if name in cfg.target_modules:
                lin = getattr(attn, name)
                lin = lin.base if isinstance(lin, LoraLinear) else lin
                out[f"{_PEFT_PREFIX}{path}.{name}.lora_A.weight"] = (cfg.r, lin.in_features)
                out[f"{_PEFT_PREFIX}{path}.{name}.lora_B.weight"] = (lin.out_features, cfg.r)
    if "experts" in cfg.target_modules:
        for path, mlp in _expert_mlps(model):
            for m in EXPERT_MATRICES:
                out[f"{_PEFT_PREFIX}{path}.{m}.lora_A"] = (mlp.num_experts, cfg.r, mlp.d_model)
                out[f"{_PEFT_PREFIX}{path}.{m}.lora_B"] = (mlp.num_experts, mlp.ffn_hidden_size, cfg.r)
    return out


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """peft name -> the live adapter parameter, in the order adapter_shapes() lists them."""
    out = {}
    for path, attn in _attentions(model):
        for name in ATTENTION_TARGETS:
            lin = getattr(attn, name)
            if isinstance(lin, LoraLinear):
                out[f"{_PEFT_PREFIX}{path}.{name}.lora_A.weight"] = lin.lora_A
                out[f"{_PEFT_PREFIX}{path}.{name}.lora_B.weight"] = lin.lora_B
    for path, mlp in _expert_mlps(model):
        if mlp.lora is not None:
            for m in EXPERT_MATRICES:
                out[f"{_PEFT_PREFIX}{path}.{m}.lora_A"] = mlp.lora.lora_A[m]
                out[f"{_PEFT_PREFIX}{path}.{m}.lora_B"] = mlp.lora.lora_B[m]
    return out


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (detached, sharing storage), under peft's names."""
    return {name: p.detach() for name, p in adapter_parameters(model).items()}


def save_adapter(model: nn.Module, cfg: LoraConfig, directory: str | Path,
                 base_model_name_or_path: str | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write adapter_model.safetensors and adapter_config.json (each under a temporary name, then renamed).
    `tensors`: the adapters under peft's names, when the model's own are shards (gathered by the caller)."""
    tensors = lora_state_dict(model) if tensors is None else tensors
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save (apply_lora or load_adapter first)")
    expected = adapter_shapes(model, cfg)
    if {k: tuple(v.shape) for k, v in tensors.items()} != expected:
        raise ValueError(f"the model's adapters do not match the config (r={cfg.r}, "
                         f"target_modules={list(cfg.target_modules)}); pass the config they were applied with")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    atomic_write_text(directory / ADAPTER_CONFIG,
                      json.dumps(cfg.adapter_config(base_model_name_or_path), indent=2) + "\n")


def read_adapter_config(directory: str | Path) -> LoraConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a LoRA adapter directory with "
                              f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    file = directory / ADAPTER_CONFIG
    if not file.exists():
        raise CheckpointError(f"{directory}: no {ADAPTER_CONFIG} (expected a LoRA adapter directory, as "
                              "save_adapter or peft write one)")
    try:
        values = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    return LoraConfig.from_adapter_config(values, where=str(file))


def load_adapter(model: nn.Module, directory: str | Path) -> LoraConfig:
    """Apply LoRA with the directory's adapter_config.json and load its tensors; returns that config.

    Every tensor is checked against what the config implies before the model is touched: a missing,
    unexpected or mis-shaped tensor is an error naming it (and both shapes). A pickled adapter_model.bin is
    refused, never opened."""
    directory = Path(directory)
    cfg = read_adapter_config(directory)
    file = directory / ADAPTER_WEIGHTS
    if not file.exists():
        pickle = directory / "adapter_model.bin"
        if pickle.exists():
            raise CheckpointError(
                f"{directory} holds only {pickle.name}, a pickle. Loading a pickle can run arbitrary code, so this "
                f"project never unpickles one; save the adapter with safetensors (peft: safe_serialization=True)")
        raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS}")
    expected = adapter_shapes(model, cfg)
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            problems = [f"missing tensor {k!r} {list(s)}" for k, s in expected.items() if k not in stored]
            problems += [f"unexpected tensor {k!r} {list(s)}" for k, s in stored.items() if k not in expected]
            problems += [f"tensor {k!r} has shape {list(stored[k])}, the model and {ADAPTER_CONFIG} (r={cfg.r}) "
                         f"expect {list(s)}" for k, s in expected.items() if k in stored and stored[k] != s]
            if problems:
                more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
                raise CheckpointError(f"{file}: " + "; ".join(problems[:5]) + more)
            tensors = {name: f.get_tensor(name) for name in expected}
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise CheckpointError(f"{file}: tensor {name!r} has a non-float dtype {t.dtype}")

    apply_lora(model, cfg)
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            p.copy_(tensors[name])
    return cfg
