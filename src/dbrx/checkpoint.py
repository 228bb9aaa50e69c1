"""Hugging Face-format checkpoints: safetensors only (single file or shards + index), config.json and
generation_config.json. Loading builds the model on the meta device and assigns the tensors read from disk, so
peak memory stays near one copy of the weights. A pickle checkpoint is never unpickled."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dbrx.config import DbrxConfig
from dbrx.fileio import atomic_path, atomic_write_text
from dbrx.perf import column_major_head_is_faster

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# DBRX's tokenizer ids (see dbrx.tokenizer); generation stops on either end token.
BOS_ID, PAD_ID, EOS_IDS = 100257, 100277, [100257, 100279]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file or tensor."""


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order; refuses pickles with the reason."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face-format checkpoint directory)")
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (expected a 'weight_map' object): {e}") from None
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are not in {path}: {', '.join(missing)}")
        return [path / f for f in files]
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle weights ({', '.join(pickles)}). Loading a pickle can run arbitrary code, so "
            "this project never unpickles one. Convert it once where you trust the file, e.g. with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _open(file: Path, device: str = "cpu"):
    try:
        return safe_open(file, framework="pt", device=device)
    except SafetensorError as e:
        size = file.stat().st_size
        raise CheckpointError(f"{file}: not a readable safetensors file ({size} bytes; truncated or corrupt?): {e}") from None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def read_header(path: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype, Path]]:
    """name -> (shape, dtype, file) for every tensor of a checkpoint, reading headers only."""
    out = {}
    for file in weight_files(path):
        with _open(file) as f:
            for name in f.keys():
                sl = f.get_slice(name)
                if name in out:
                    raise CheckpointError(f"tensor {name!r} is stored twice: in {out[name][2].name} and {file.name}")
                out[name] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype(), None), file)
    return out


def checkpoint_dtype(header: dict) -> torch.dtype | None:
    """The one dtype every tensor is stored in, or None when they differ."""
    dtypes = {dt for _, dt, _ in header.values()}
    return dtypes.pop() if len(dtypes) == 1 and None not in dtypes else None


def check_against(state: dict[str, torch.Tensor], header: dict, path: Path) -> None:
    """The checkpoint's tensors (`header`, from read_header) are exactly `state`'s names and shapes."""
    expected = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in expected if k not in header]
    unexpected = [k for k in header if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected tensor(s): {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
    for name, shape in expected.items():
        if name in header and header[name][0] != shape:
            problems.append(
                f"tensor {name!r} in {header[name][2].name} has shape {list(header[name][0])}, "
                f"the config expects {list(shape)}"
            )
        elif name in header and header[name][1] is None:
            problems.append(f"tensor {name!r} in {header[name][2].name} has a non-float dtype")
    if problems:
        raise CheckpointError(f"{path}: weights do not match config.json: " + "; ".join(problems))


def load_pretrained(cls, path: str | Path, dtype=None, device="cpu", device_map=None, max_memory=None):
    """The model on `device`, or with `device_map` ("auto", or module name -> device, as transformers takes it) its
    blocks on several devices: each tensor is read and sent to its module's device one at a time, so host memory
    stays about one tensor above what is loaded there, and dbrx.placement.dispatch moves activations between
    devices at block boundaries. "auto" (or "balanced") plans from config.json alone (dbrx.placement.plan) over
    `max_memory` ({device or CUDA index: bytes or "70GiB"}), else every visible CUDA device, else the CPU; a device
    name ("cuda:0") puts everything there. dtype None or "auto" keeps the stored dtype."""
    from dbrx.placement import check_device_map, device_for, dispatch, present

    path = Path(path)
    if isinstance(device_map, str) and device_map not in ("auto", "balanced"):
        if device_map in ("sequential", "balanced_low_0"):
            raise ValueError(f"device_map={device_map!r}: dbrx places blocks in proportion to each device's memory "
                             "(\"auto\", or \"balanced\" as transformers calls it), or as a dict you give")
        device_map = {"": device_map}  # one device, as transformers takes device_map="cuda:0"
    if device_map is None:
        present(device)
    config = DbrxConfig.from_pretrained(path)
    header = read_header(path)
    if dtype == "auto":  # transformers' meaning: as the checkpoint stores it
        dtype = None
    dtype = resolve_dtype(dtype) or checkpoint_dtype(header) or resolve_dtype(config.dtype) or torch.float32
    with torch.device("meta"):
        model = cls(config)
    quantized = config.quantization_config is not None
    if not quantized:
        check_against(model.state_dict(), header, path)
    if device_map in ("auto", "balanced"):
        device_map = auto_device_map(config, dtype, max_memory)
    elif device_map is not None:
        if not isinstance(device_map, dict):
            raise ValueError(f"device_map must be \"auto\", a device name or a dict of module name -> device, got "
                             f"{device_map!r}")
        check_device_map(model, device_map)
    target = (lambda name: device_for(name, device_map)) if device_map is not None else (lambda name: str(device))

    state = {}
    for file in dict.fromkeys(f for _, _, f in header.values()):
        with _open(file, device="cpu" if device_map is not None else str(device)) as f:
            for name in f.keys():
                try:
                    t = f.get_tensor(name)
                except SafetensorError as e:
                    raise CheckpointError(f"{file}: cannot read tensor {name!r} (truncated file?): {e}") from None
                state[name] = t if quantized and not t.dtype.is_floating_point else t.to(device=target(name),
                                                                                        dtype=dtype)
                del t
    if quantized:  # `dbrx quantize`'s checkpoint: the quantised modules first, then the float rest
        from dbrx.quant import load_quantized

        load_quantized(model, state, dtype, target)
        result = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in result.missing_keys if not k.endswith((".q", ".q4", ".scale", ".sz"))]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{path}: the quantised checkpoint does not match config.json: missing "
                                  f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    else:
        model.load_state_dict(state, strict=True, assign=True)
    del state
    if isinstance(model.lm_head, torch.nn.Linear):
        model.relayout_lm_head(column_major_head_is_faster(model.lm_head.weight))
    if device_map is not None:
        dispatch(model)
    model.config.dtype = dtype_name(dtype)
    return model.eval()


def auto_device_map(config: DbrxConfig, dtype: torch.dtype, max_memory: dict | None = None) -> dict[str, str]:
    """device_map="auto": blocks by dbrx.placement.plan over max_memory's devices (each size is what the model may
    use there), else every visible CUDA device, else the CPU; refused, naming the shortfall, when the weights do not
    fit."""
    from dbrx.placement import RESERVE_BYTES, Device, parse_devices, plan, present, stored_quant

    if max_memory:
        devices = []
        for key, size in max_memory.items():
            name = f"cuda:{key}" if isinstance(key, int) else str(key)
            try:
                torch.device(name)
            except RuntimeError:
                raise ValueError(f"max_memory key {key!r} is not a device (cpu, cuda:0 or a CUDA index)") from None
            present(name, "max_memory key")
            devices.append(Device(name, parse_size(size) + RESERVE_BYTES))
    elif torch.cuda.is_available():
        devices = parse_devices(",".join(f"cuda:{i}" for i in range(torch.cuda.device_count())))
    else:
        devices = parse_devices("cpu")
    p = plan(config, devices, min(config.max_seq_len, 4096), dtype, **stored_quant(config))
    if not p.weights_fit:
        worst = max(p.devices, key=lambda d: d.weight_bytes - d.device.usable_bytes)
        raise ValueError(f"device_map=\"auto\": the weights ({p.weight_bytes / 2**30:.1f} GiB in {p.stored_as}) "
                         f"do not fit: {worst.device.name} would need {worst.weight_bytes / 2**30:.1f} GiB, "
                         f"{worst.device.usable_bytes / 2**30:.1f} GiB usable; give more devices or max_memory")
    return p.device_map()


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like '5GB', '500MB', '2GiB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def save_pretrained(model, path: str | Path, max_shard_size: int | str = "5GB") -> None:
    """Write config.json, generation_config.json and the weights (one file, or shards + index) so that both
    this project and transformers load them. Every file is written under a temporary name, then renamed."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for name, shard in zip(names, shards):
        with atomic_path(path / name) as tmp:
            save_file({k: v.cpu() for k, v in shard.items()}, tmp, metadata={"format": "pt"})
    if len(shards) > 1:
        write_index(path, {k: n for n, shard in zip(names, shards) for k in shard},
                    sum(t.numel() * t.element_size() for t in state.values()))
    # Weights of an earlier save in another layout would shadow or confuse this one.
    for old in path.glob("model*.safetensors*"):
        if old.name not in names and not (len(shards) > 1 and old.name == INDEX_FILE):
            old.unlink()

    write_configs(path, model.config, next(model.parameters()).dtype)


def write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json of a sharded checkpoint: which file holds each tensor."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    atomic_write_text(path / INDEX_FILE, json.dumps(index, indent=2) + "\n")


def write_configs(path: Path, config: DbrxConfig, dtype: torch.dtype) -> None:
    """config.json (naming the weights' dtype) and generation_config.json."""
    config = config.replace(dtype=dtype_name(dtype))
    config.save_pretrained(path)
    atomic_write_text(path / "generation_config.json", json.dumps(generation_config(config), indent=2) + "\n")


def generation_config(config: DbrxConfig) -> dict:
    """DBRX's special ids when the vocabulary holds them (a toy vocabulary does not)."""
    out: dict = {"_from_model_config": True}
    if config.vocab_size > max(EOS_IDS):
        out.update(bos_token_id=BOS_ID, eos_token_id=EOS_IDS, pad_token_id=PAD_ID)
    return out


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (or physical memory where that file is absent)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
