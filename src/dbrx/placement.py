"""Where an inference model goes: device specs, weight bytes under weight-only quantisation, a per-device plan
made from the config alone (nothing is loaded; the model is built on the meta device), and `dispatch`, which runs
a model whose blocks sit on several devices.

A plan places the embedding on the first device, the blocks in order so that each device's share of weights plus
KV cache (at `max_model_len` tokens) follows its usable memory, and the final norm and head on the last device.
Each device keeps RESERVE_BYTES for the runtime and activations. Quantised tensors are counted as the quantised
checkpoint stores them: int8 one byte per weight plus a scale per output channel; int4 half a byte per weight plus
a scale and a zero point per group of `group_size` weights along the input (both scales in the weights' dtype).
Experts are quantised; `include` adds "attention" (Wqkv, out_proj) and "lm_head". Everything else (embedding,
norms, router) stays in `dtype`.

Device specs, as `dbrx info --devices` takes them: `1xH200`, `2xH200`, `4x80GB` (a device of 80 GB, GPU memory
being labelled in binary units: 80 GiB), `H100,H100`, `cuda:0,cuda:1` (asks torch), `cpu` (this machine's
available memory).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field

import torch

from dbrx.config import DbrxConfig
from dbrx.quant import INCLUDABLE, int4_group

GiB = 2**30
RESERVE_BYTES = 2 * GiB
"""Kept free on each device: the CUDA context, allocator slack, and a prefill chunk's activations."""

DEVICE_KINDS = {  # memory as sold (GiB); usable is this minus RESERVE_BYTES
    "H200": 141, "H100": 80, "H800": 80, "A100": 80, "A100-80GB": 80, "A100-40GB": 40, "L40S": 48, "L40": 48,
    "A10G": 24, "A10": 24, "L4": 24, "RTX4090": 24, "MI300X": 192, "MI250X": 128, "B200": 180,
}
QUANTS = ("none", "int8", "int4")


@dataclass(frozen=True)
class Device:
    name: str  # "H200", "80GB", "cuda:0", "cpu"
    memory_bytes: int

    @property
    def usable_bytes(self) -> int:
        return max(0, self.memory_bytes - RESERVE_BYTES)

    def torch_name(self, place: int) -> str:
        """The torch device this stands for as the `place`-th of a list: a kind or size (H200, 80GB) is that
        place's CUDA device."""
        return self.name if self.name == "cpu" or self.name.startswith("cuda") else f"cuda:{place}"


def parse_devices(spec: str) -> list[Device]:
    """'2xH200' -> two H200s; '4x80GB'; 'H100,H100'; 'cuda:0,cuda:1'; 'cpu'. Raises ValueError naming the item."""
    devices: list[Device] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            raise ValueError(f"--devices {spec!r}: an empty item")
        count, what = 1, item
        match = re.fullmatch(r"(\d+)\s*[xX]\s*(.+)", item)
        if match:
            count, what = int(match.group(1)), match.group(2)
            if count < 1:
                raise ValueError(f"--devices {spec!r}: a count of {count} devices in {item!r}")
        if count > 1 and (what == "cpu" or what.startswith("cuda")):
            raise ValueError(f"--devices {spec!r}: {item!r} repeats one device; list them (cuda:0,cuda:1)")
        devices += [_device(what, spec)] * count
    return devices


def _device(what: str, spec: str) -> Device:
    kinds = {k.upper(): k for k in DEVICE_KINDS}
    if what.upper() in kinds:
        kind = kinds[what.upper()]
        return Device(kind, DEVICE_KINDS[kind] * GiB)
    size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(GB|GIB|G)", what.upper())
    if size:
        return Device(f"{size.group(1)}GB", int(float(size.group(1)) * GiB))
    if what == "cpu":
        from dbrx.checkpoint import available_memory_bytes

        return Device("cpu", available_memory_bytes())
    if re.fullmatch(r"cuda(:\d+)?", what):
        index = int(what.split(":")[1]) if ":" in what else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ValueError(f"--devices {spec!r}: {what} is not here (this machine has {found} CUDA devices); "
                             "to plan for devices elsewhere, name their kind: dbrx info --devices 2xH200")
        return Device(what, torch.cuda.get_device_properties(index).total_memory)
    raise ValueError(f"--devices {spec!r}: {what!r} is neither a device kind ({', '.join(DEVICE_KINDS)}), a size "
                     "such as 80GB, cuda:N nor cpu")


def tensor_bytes(name: str, shape: torch.Size, dtype: torch.dtype, quant: str = "none", group_size: int = 128,
                 include: tuple[str, ...] = (), num_experts: int = 1) -> int:
    """Bytes of one checkpoint tensor as stored: quantised with its scales, or in `dtype`."""
    n = shape.numel()
    kind = ("experts" if ".ffn.experts.mlp." in name else "attention" if (".attn.Wqkv." in name or
            ".attn.out_proj." in name) else "lm_head" if name == "lm_head.weight" else None)
    if quant == "none" or kind is None or (kind != "experts" and kind not in include):
        return n * dtype.itemsize
    # output channels: rows of a [out, in] weight; the experts' w2 ([E*F, D], applied as h @ w2) is stored so that
    # its scales are per output channel too, D per expert
    inputs = shape[0] // num_experts if name.endswith("mlp.w2") else shape[-1]
    if quant == "int8":
        return n + n // inputs * dtype.itemsize
    # int4: a scale and a zero point per group along the input, in the group dbrx.quant takes for this input size
    groups = n // int4_group(inputs, group_size)
    return -(-n // 2) + groups * 2 * dtype.itemsize


@dataclass
class DevicePlan:
    device: Device
    parts: list[str] = field(default_factory=list)  # "embedding", "blocks 0-19", "head"
    weight_bytes: int = 0
    kv_bytes_per_token: int = 0

    def kv_tokens(self) -> int | None:
        """KV positions this device can hold after its weights (None: it holds no layer)."""
        if not self.kv_bytes_per_token:
            return None
        return max(0, self.device.usable_bytes - self.weight_bytes) // self.kv_bytes_per_token


@dataclass
class Plan:
    devices: list[DevicePlan]
    max_model_len: int
    quant: str
    dtype: torch.dtype
    kv_bytes_per_token: int
    expert_bytes: int
    other_bytes: int
    layer_device: list[int]  # block i -> index into devices

    @property
    def weight_bytes(self) -> int:
        return self.expert_bytes + self.other_bytes

    @property
    def weights_fit(self) -> bool:
        return all(d.weight_bytes <= d.device.usable_bytes for d in self.devices)

    @property
    def kv_tokens(self) -> int:
        """The most KV positions every device can hold at once (what a context or a batch's tokens can use)."""
        return min((t for t in (d.kv_tokens() for d in self.devices) if t is not None), default=0)

    @property
    def fits(self) -> bool:
        return self.weights_fit and self.kv_tokens >= self.max_model_len

    @property
    def stored_as(self) -> str:
        """What the weight bytes count: the dtype, or the quantisation with the rest in the dtype."""
        from dbrx.checkpoint import dtype_name

        name = dtype_name(self.dtype)
        return name if self.quant == "none" else f"{self.quant} with the rest in {name}"

    def device_map(self) -> dict[str, str]:
        """Module name -> torch device, as from_pretrained(device_map=...) takes it: a device given by its kind
        or size is the CUDA device of its place in the list."""
        def torch_name(d: int) -> str:
            return self.devices[d].device.torch_name(d)

        last = torch_name(self.layer_device[-1])
        return {"transformer.wte": torch_name(0),
                **{f"transformer.blocks.{i}": torch_name(d) for i, d in enumerate(self.layer_device)},
                "transformer.norm_f": last, "lm_head": last}


@functools.lru_cache(maxsize=8)
def _shapes(config_json: str) -> tuple[tuple[str, torch.Size], ...]:
    """(name, shape) of each tensor of a meta model of this config (built once: `dbrx info` plans many layouts)."""
    from dbrx.model import DbrxForCausalLM

    with torch.device("meta"):
        model = DbrxForCausalLM(DbrxConfig.from_dict(json.loads(config_json)))
    return tuple((name, p.shape) for name, p in model.state_dict().items())


def module_bytes(config: DbrxConfig, dtype: torch.dtype, quant: str = "none", group_size: int = 128,
                 include: tuple[str, ...] = ()) -> tuple[int, list[int], int, int]:
    """(embedding bytes, each block's bytes, final norm + head bytes, expert bytes in all), from a meta model."""
    if quant not in QUANTS:
        raise ValueError(f"quantisation {quant!r}: one of {', '.join(QUANTS)}")
    bad = [i for i in include if i not in INCLUDABLE]
    if bad:
        raise ValueError(f"--include {','.join(bad)}: only {', '.join(INCLUDABLE)} can be quantised besides experts")
    if quant == "int4" and group_size < 1:
        raise ValueError(f"--group-size must be positive, got {group_size}")
    blocks = [0] * config.n_layers
    embedding = head = experts = 0
    for name, shape in _shapes(json.dumps(config.to_dict(), sort_keys=True)):
        size = tensor_bytes(name, shape, dtype, quant, group_size, include, config.num_experts)
        if ".ffn.experts.mlp." in name:
            experts += size
        if name.startswith("transformer.blocks."):
            blocks[int(name.split(".")[2])] += size
        elif name.startswith("transformer.wte"):
            embedding += size
        else:
            head += size
    return embedding, blocks, head, experts


def stored_quant(config: DbrxConfig) -> dict:
    """plan()'s quant, group_size and include for a checkpoint as config.json describes it: what `dbrx quantize`
    wrote (its quantization_config), else none."""
    q = config.quantization_config
    if q is None:
        return {"quant": "none"}
    return {"quant": f"int{q['bits']}", "group_size": q["group_size"], "include": tuple(q.get("include", ()))}


def plan(config: DbrxConfig, devices: list[Device], max_model_len: int | None = None,
         dtype: torch.dtype = torch.bfloat16, quant: str = "none", group_size: int = 128,
         include: tuple[str, ...] = (), kv_dtype: torch.dtype | None = None) -> Plan:
    """Blocks placed in order, each device taking a share of weights + KV cache proportional to its usable
    memory; the embedding on the first device, the final norm and head on the last one that holds a block."""
    from dbrx.model import KVCache

    if not devices:
        raise ValueError("no devices to plan for")
    max_model_len = max_model_len or config.max_seq_len
    embedding, blocks, head, experts = module_bytes(config, dtype, quant, group_size, include)
    kv_token = KVCache.bytes_per_token(config, kv_dtype or dtype)
    kv_layer = kv_token // config.n_layers
    need = [b + kv_layer * max_model_len for b in blocks]
    capacity = [d.usable_bytes for d in devices]
    total, room = embedding + head + sum(need), sum(capacity) or 1
    # device d takes what lies below its cumulative share of everything: a block goes where its middle falls
    bounds = [total * sum(capacity[:d + 1]) / room for d in range(len(devices))]
    layer_device, d, placed = [], 0, embedding
    for n in need:
        while d + 1 < len(devices) and placed + n / 2 > bounds[d]:
            d += 1
        layer_device.append(d)
        placed += n
    plans = [DevicePlan(dev) for dev in devices]
    plans[0].parts.append("embedding")
    plans[0].weight_bytes += embedding
    for i, d in enumerate(layer_device):
        plans[d].weight_bytes += blocks[i]
        plans[d].kv_bytes_per_token += kv_layer
    for d in sorted(set(layer_device)):
        held = [i for i, x in enumerate(layer_device) if x == d]
        plans[d].parts.append(f"blocks {held[0]}-{held[-1]}" if len(held) > 1 else f"block {held[0]}")
    plans[layer_device[-1]].parts.append("final norm + head")
    plans[layer_device[-1]].weight_bytes += head
    return Plan(plans, max_model_len, quant, dtype, kv_token, experts, embedding + sum(blocks) + head - experts,
                layer_device)


def suggestions(config: DbrxConfig, devices: list[Device], max_model_len: int, dtype: torch.dtype, quant: str,
                group_size: int, include: tuple[str, ...]) -> list[str]:
    """What would fit where this does not: a lower-bit quantisation on these devices, more of the same devices,
    or the longest context these devices hold."""
    out = []
    for q in QUANTS[QUANTS.index(quant) + 1:]:
        if plan(config, devices, max_model_len, dtype, q, group_size, include).fits:
            out.append(f"--quant {q} on these devices")
            break
    kinds = {d.name for d in devices}
    if len(kinds) == 1 and not devices[0].name.startswith(("cuda", "cpu")):
        for n in range(len(devices) + 1, 65):
            if plan(config, [devices[0]] * n, max_model_len, dtype, quant, group_size, include).fits:
                out.append(f"--devices {n}x{devices[0].name} (quantisation {quant})")
                break
    current = plan(config, devices, max_model_len, dtype, quant, group_size, include)
    if current.weights_fit and 0 < current.kv_tokens < max_model_len:
        out.append(f"--max-model-len {current.kv_tokens} (the longest context these devices hold)")
    return out


# ---- several devices -------------------------------------------------------------------------------------------
def device_for(name: str, device_map: dict[str, str]) -> str:
    """The device of a parameter or module name: its longest prefix in device_map ("" maps everything)."""
    best = None
    for prefix in device_map:
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and (best is None or
                                                                                   len(prefix) > len(best)):
            best = prefix
    if best is None:
        raise ValueError(f"device_map places no module that holds {name!r}; give it a device (or use \"auto\")")
    return device_map[best]


def check_device_map(model: torch.nn.Module, device_map: dict[str, str]) -> None:
    """Every key names a module of the model and every value is a torch device."""
    modules = dict(model.named_modules())
    for prefix, device in device_map.items():
        if prefix and prefix not in modules:
            near = ", ".join(m for m in modules if m.count(".") <= 2 and m.startswith(prefix.split(".")[0]))[:200]
            raise ValueError(f"device_map key {prefix!r} is not a module of the model (modules: {near or '...'})")
        try:
            torch.device(device)
        except RuntimeError:
            raise ValueError(f"device_map[{prefix!r}] = {device!r} is not a torch device (cpu, cuda:0, ...)") from None
        present(device, f"device_map[{prefix!r}]")


def present(device, what: str = "device") -> torch.device:
    """`device` as a torch.device, where it exists on this machine: a CUDA device needs a CUDA build of torch and
    that many visible GPUs (otherwise torch fails later, in the middle of a load, with an assertion)."""
    d = torch.device(device)
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            build = "a CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise ValueError(f"{what} {str(device)!r}: no CUDA device here (torch {torch.__version__}, {build})")
        if (d.index or 0) >= n:
            raise ValueError(f"{what} {str(device)!r}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    return d


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True) if x.device != device else x
    if isinstance(x, tuple):
        return tuple(_to(t, device) for t in x)
    return x


def dispatch(model) -> None:
    """Run a model whose modules sit on several devices (placed already, e.g. by loading a device_map): each block,
    the final norm and the head get their inputs moved to their own device at their boundary, and the head's
    output (the logits) goes back to the embedding's device, where the caller's inputs live. Nothing moves when
    everything is on one device. The model file is unchanged: this is applied from outside."""
    home = model.transformer.wte.weight.device
    modules = [*model.transformer.blocks, model.transformer.norm_f, model.lm_head]
    for module in modules:
        device = next(iter([*module.parameters(), *module.buffers()])).device  # a quantised head has buffers
        for handle in getattr(module, "_dbrx_dispatch", ()):
            handle.remove()
        module._dbrx_dispatch = [module.register_forward_pre_hook(
            lambda m, args, device=device: tuple(_to(a, device) for a in args))]
    model.lm_head._dbrx_dispatch.append(model.lm_head.register_forward_hook(
        lambda m, args, out: _to(out, home)))


def layer_devices(model) -> list[torch.device]:
    """The device of each block (where its KV cache belongs)."""
    return [block.norm_attn_norm.norm_1.weight.device for block in model.transformer.blocks]
