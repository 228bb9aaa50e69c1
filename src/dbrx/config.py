"""DBRX configuration: a typed dataclass spelled like Hugging Face's config.json, with named presets.

`DbrxConfig.from_dict` accepts what transformers writes (and the released dbrx-base/instruct config.json);
`to_dict` writes a config.json that transformers 4.x and 5.x both load. Anything that is not a DBRX field nor a
piece of transformers' bookkeeping is an error that names it, so a typo never silently becomes a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbrx.fileio import atomic_write_text

# Keys that transformers writes into config.json (at the top level or inside a sub-config) that carry no DBRX
# architecture. They are accepted and dropped; everything else must be a field.
_HF_BOOKKEEPING = frozenset(
    {
        "_name_or_path", "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype",
        "id2label", "label2id", "chunk_size_feed_forward", "is_encoder_decoder", "output_attentions",
        "output_hidden_states", "problem_type", "return_dict", "num_key_value_heads", "rope_parameters",
        "router_aux_loss_coef", "use_return_dict", "torchscript", "pruned_heads", "tf_legacy_loss",
        "use_bfloat16", "_attn_implementation_autoset",
        "dtype",  # inside attn_config/ffn_config transformers writes a null dtype; the top-level one is a field
    }
)

SUPPORTED_ACTIVATIONS = ("silu", "gelu")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def _check_fields(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Drop transformers' bookkeeping keys and refuse unknown ones, naming the nearest valid field."""
    names = [f.name for f in dataclasses.fields(cls)]
    kept = {}
    for key, value in values.items():
        if key in names:
            kept[key] = value
        elif key not in _HF_BOOKKEEPING:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{where}{near[0]}'?" if near else f"; valid fields: {', '.join(names)}"
            raise ValueError(f"unknown config field '{where}{key}'{hint}")
    return kept


def _positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _number(value: Any, name: str, *, low: float, high: float = math.inf, low_open: bool = False,
            allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + ("" if high == math.inf else f" and <= {high}")
        extra = " or null" if allow_none else ""
        raise ValueError(f"{name} must be a number {bound}{extra}, got {value!r}")


@dataclass
class DbrxAttentionConfig:
    attn_pdrop: float = 0.0
    clip_qkv: float | None = None
    kv_n_heads: int = 1
    rope_theta: float = 10000.0


@dataclass
class DbrxFFNConfig:
    ffn_act_fn: dict = field(default_factory=lambda: {"name": "silu"})
    ffn_hidden_size: int = 3584
    moe_num_experts: int = 4
    moe_top_k: int = 1
    moe_jitter_eps: float | None = None
    moe_loss_weight: float = 0.01
    moe_normalize_expert_weights: float | None = 1.0
    uniform_expert_assignment: bool = False


@dataclass
class DbrxConfig:
    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    max_seq_len: int = 2048
    vocab_size: int = 32000
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    attn_config: DbrxAttentionConfig = field(default_factory=DbrxAttentionConfig)
    ffn_config: DbrxFFNConfig = field(default_factory=DbrxFFNConfig)
    use_cache: bool = True
    initializer_range: float = 0.02
    output_router_logits: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    dtype: str | None = None  # the dtype the weights are stored in ("bfloat16" for the released models)
    # a checkpoint written by `dbrx quantize`: {"quant_method": "dbrx-weight-only", "bits", "group_size", "include"}
    quantization_config: dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.attn_config, dict):
            self.attn_config = DbrxAttentionConfig(**_check_fields(DbrxAttentionConfig, self.attn_config, "attn_config."))
        if isinstance(self.ffn_config, dict):
            ffn = dict(self.ffn_config)
            mirrored = ffn.pop("hidden_size", self.d_model)  # transformers mirrors d_model here
            if mirrored != self.d_model:
                raise ValueError(f"ffn_config.hidden_size ({mirrored}) must equal d_model ({self.d_model})")
            self.ffn_config = DbrxFFNConfig(**_check_fields(DbrxFFNConfig, ffn, "ffn_config."))
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_n_heads(self) -> int:
        return self.attn_config.kv_n_heads

    @property
    def num_experts(self) -> int:
        return self.ffn_config.moe_num_experts

    @property
    def top_k(self) -> int:
        return self.ffn_config.moe_top_k

    # ---- validation ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        a, f = self.attn_config, self.ffn_config
        for name in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size"):
            _positive_int(getattr(self, name), name)
        _positive_int(a.kv_n_heads, "attn_config.kv_n_heads")
        for name in ("ffn_hidden_size", "moe_num_experts", "moe_top_k"):
            _positive_int(getattr(f, name), f"ffn_config.{name}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head dim d_model/n_heads = {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % a.kv_n_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be divisible by attn_config.kv_n_heads ({a.kv_n_heads})"
            )
        if f.moe_top_k > f.moe_num_experts:
            raise ValueError(
                f"ffn_config.moe_top_k ({f.moe_top_k}) must be <= ffn_config.moe_num_experts ({f.moe_num_experts})"
            )
        _number(a.clip_qkv, "attn_config.clip_qkv", low=0, low_open=True, allow_none=True)
        _number(a.rope_theta, "attn_config.rope_theta", low=0, low_open=True)
        _number(a.attn_pdrop, "attn_config.attn_pdrop", low=0, high=1)
        _number(self.resid_pdrop, "resid_pdrop", low=0, high=1)
        _number(self.emb_pdrop, "emb_pdrop", low=0, high=1)
        _number(self.initializer_range, "initializer_range", low=0)
        _number(f.moe_jitter_eps, "ffn_config.moe_jitter_eps", low=0, high=1, allow_none=True)
        _number(f.moe_loss_weight, "ffn_config.moe_loss_weight", low=0)
        _number(f.moe_normalize_expert_weights, "ffn_config.moe_normalize_expert_weights", low=0,
                low_open=True, allow_none=True)
        act = f.ffn_act_fn.get("name") if isinstance(f.ffn_act_fn, dict) else None
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"ffn_config.ffn_act_fn must be {{'name': one of {list(SUPPORTED_ACTIVATIONS)}}}, got {f.ffn_act_fn!r}"
            )
        if f.uniform_expert_assignment:
            raise ValueError("ffn_config.uniform_expert_assignment=true is a debugging mode this project does not run")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings must be false: DBRX keeps lm_head separate from wte")
        if self.dtype is not None and self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {list(SUPPORTED_DTYPES)}, got {self.dtype!r}")
        q = self.quantization_config
        if q is not None and (not isinstance(q, dict) or q.get("quant_method") != "dbrx-weight-only"
                              or q.get("bits") not in (8, 4) or not isinstance(q.get("group_size"), int)):
            raise ValueError("quantization_config must be {\"quant_method\": \"dbrx-weight-only\", \"bits\": 8 or 4, "
                             f"\"group_size\": int, \"include\": [...]}} (as `dbrx quantize` writes it), got {q!r}")

    # ---- (de)serialisation ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DbrxConfig":
        values = dict(values)
        if values.get("model_type", "dbrx") != "dbrx":
            raise ValueError(f"model_type is {values['model_type']!r}; this loads DBRX configs (model_type 'dbrx')")
        dtype = values.pop("dtype", None) or values.pop("torch_dtype", None)
        values.pop("torch_dtype", None)
        if dtype is not None:
            values["dtype"] = str(dtype).removeprefix("torch.")
        return cls(**_check_fields(cls, values, ""))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ffn_config"]["hidden_size"] = self.d_model
        # transformers 5 validates float fields strictly (an int 1 is refused): write floats as floats.
        for section, keys in (("attn_config", ("attn_pdrop", "clip_qkv", "rope_theta")),
                              ("ffn_config", ("moe_jitter_eps", "moe_loss_weight", "moe_normalize_expert_weights"))):
            for key in keys:
                if out[section][key] is not None:
                    out[section][key] = float(out[section][key])
        for key in ("resid_pdrop", "emb_pdrop", "initializer_range"):
            out[key] = float(out[key])
        # LLM Foundry's debugging switch, which transformers' ffn_config does not know: 5.17's refuses the whole
        # config over it ("Found unknown kwargs"). Written only when on (which this project refuses anyway).
        if not out["ffn_config"]["uniform_expert_assignment"]:
            out["ffn_config"].pop("uniform_expert_assignment")
        out["model_type"] = "dbrx"
        out["architectures"] = ["DbrxForCausalLM"]
        # transformers 5 reads RoPE's theta from a top-level `rope_parameters`, not from attn_config, and falls
        # back to 10000 when it is absent; writing both keeps 4.x and 5.x on the checkpoint's real theta.
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": float(self.attn_config.rope_theta)}
        if self.dtype is None:
            out.pop("dtype")
        if self.quantization_config is None:
            out.pop("quantization_config")
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "DbrxConfig":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file}: no config.json (expected a Hugging Face-format DBRX directory)")
        try:
            values = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(values)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{file}: {e}") from None

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "config.json", json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> "DbrxConfig":
        """A copy with top-level fields changed; `attn_config`/`ffn_config` may be partial dicts."""
        values = dataclasses.asdict(self)
        for key, value in changes.items():
            if key in ("attn_config", "ffn_config") and isinstance(value, dict):
                values[key].update(value)
            else:
                values[key] = value
        return DbrxConfig.from_dict(values)

    @classmethod
    def from_name(cls, name: str) -> "DbrxConfig":
        if name not in PRESETS:
            near = difflib.get_close_matches(name, PRESETS, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}.{hint}")
        return cls.from_dict(json.loads(json.dumps(PRESETS[name])))


_RELEASED = {
    "d_model": 6144,
    "n_heads": 48,
    "n_layers": 40,
    "max_seq_len": 32768,
    "vocab_size": 100352,
    "attn_config": {"clip_qkv": 8.0, "kv_n_heads": 8, "rope_theta": 500000.0},
    "ffn_config": {"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4, "moe_jitter_eps": 0.0,
                   "moe_loss_weight": 0.05, "moe_normalize_expert_weights": 1.0},
    "dtype": "bfloat16",
}

# CPU-sized presets keep the fine-grained shape (16 experts, top 4) and the full cl100k vocabulary. dbrx-tiny is
# the `make demo` model, shaped for a fixed few minutes of 2-core training: the 100k-vocab head takes most of a
# step and its matmuls grow with d_model, so a narrow model gets more steps. At equal time (about 5 minutes),
# d_model 128 with 2 layers reached 4.82 nats held-out: 4.84 at d_model 96 or 192, 4.93 at 256, 4.84 and 4.83
# with 3 and 4 layers at 128 (README).
PRESETS: dict[str, dict[str, Any]] = {
    "dbrx-base": _RELEASED,
    "dbrx-instruct": _RELEASED,
    "dbrx-small": {
        "d_model": 512, "n_heads": 8, "n_layers": 4, "max_seq_len": 2048, "vocab_size": 100352,
        "attn_config": {"clip_qkv": 8.0, "kv_n_heads": 2, "rope_theta": 500000.0},
        "ffn_config": {"ffn_hidden_size": 1024, "moe_num_experts": 16, "moe_top_k": 4, "moe_jitter_eps": 0.0,
                       "moe_loss_weight": 0.05, "moe_normalize_expert_weights": 1.0},
    },
    "dbrx-tiny": {
        "d_model": 128, "n_heads": 4, "n_layers": 2, "max_seq_len": 1024, "vocab_size": 100352,
        "attn_config": {"clip_qkv": 8.0, "kv_n_heads": 2, "rope_theta": 10000.0},
        "ffn_config": {"ffn_hidden_size": 192, "moe_num_experts": 16, "moe_top_k": 4, "moe_jitter_eps": 0.0,
                       "moe_loss_weight": 0.05, "moe_normalize_expert_weights": 1.0},
    },
}
