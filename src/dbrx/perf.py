"""Measuring the machine: matmul and matrix-vector throughput per dtype, memory bandwidth, and the choices that
follow from them (precision `auto`, the lm_head's layout, which MoE path runs). Nothing here assumes what is
fast: bf16 matmul is 2x fp32 on a Xeon with AMX and 100x slower than fp32 on an AVX2-only EPYC, where torch
emulates it. Every figure is measured once per process and cached; the two rates `--dtype auto` compares, once per
machine and kept on disk (decode_rates), so that its choice does not change from one run to the next."""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

GFLOP = 1e9

BF16_MIN_SPEEDUP = 1.3
"""bf16 is chosen by precision `auto` only where its matmul is at least this much faster than fp32's."""

BF16_WARN_SLOWDOWN = 5.0
"""An explicit bf16 request warns where bf16 matmul is more than this many times slower than fp32's."""


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], *, warmup: int = 1, reps: int = 5, device="cpu", best: bool = False) -> float:
    """Median (or with `best`, shortest) wall time of `fn` in seconds, after `warmup` untimed calls. The
    shortest suits ceilings measured on a shared machine, whose neighbours only ever slow a run down."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times) if best else statistics.median(times)


def _device_key(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


@functools.cache
def matmul_flops(dtype: torch.dtype = torch.float32, device: str = "cpu", seconds: float = 0.1) -> float:
    """FLOP/s of a square matmul, the largest (up to 2048, 8192 on a GPU) whose product takes under `seconds`:
    the ceiling for training and prefill. Sized by measurement, so that an emulated dtype (bf16 on AVX2, at
    ~1 GFLOP/s) costs a fraction of a second instead of minutes."""
    device = _device_key(device)
    top = 8192 if torch.device(device).type == "cuda" else 2048
    n, t = 128, 0.0
    while True:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        t = timeit(lambda: a @ b, warmup=1, reps=1 if n < top else 3, device=device)
        if n >= top or t * 8 > seconds:
            break
        n *= 2
    t = timeit(lambda: a @ b, warmup=0, reps=3, device=device, best=True)
    return 2 * n**3 / t


@functools.cache
def matvec_rate(dtype: torch.dtype, device: str = "cpu", column_major: bool = False, rows: int = 32768,
                cols: int = 2048) -> float:
    """Weights per second streamed by x @ W.T (W [rows, cols] row-major) or by x @ W_DV (column-major, i.e.
    a contiguous [cols, rows]): the ceiling of batch-1 decoding in that dtype and layout. The default 64M
    weights (256 MiB in fp32) are larger than the caches."""
    device = _device_key(device)
    w = torch.empty((cols, rows) if column_major else (rows, cols), dtype=dtype, device=device).fill_(0.01)
    w_VD = w.t() if column_major else w
    x = torch.full((1, cols), 0.5, dtype=dtype, device=device)
    t = timeit(lambda: x @ w_VD.T, warmup=1, reps=7, device=device, best=True)
    return rows * cols / t


def best_matvec_rate(dtype: torch.dtype, device: str = "cpu") -> float:
    """Weights/s of the faster matrix-vector layout in `dtype`."""
    return max(matvec_rate(dtype, device, False), matvec_rate(dtype, device, True))


def machine_cache_file() -> Path | None:
    """Where measurements that choices depend on are kept between runs: $DBRX_MACHINE_CACHE, else
    $XDG_CACHE_HOME/dbrx/machine.json (~/.cache/dbrx/machine.json); None when DBRX_MACHINE_CACHE is "off"."""
    chosen = os.environ.get("DBRX_MACHINE_CACHE")
    if chosen == "off":
        return None
    if chosen:
        return Path(chosen)
    try:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except (RuntimeError, KeyError):  # no home directory to be found: measured each run
        return None
    return root / "dbrx" / "machine.json"


def decode_rates(device: str = "cpu") -> tuple[dict[torch.dtype, float], str]:
    """fp32 and bf16 weights per second through a matrix-vector product (what `--dtype auto` compares), measured
    once per machine (CPU model, capability, threads, torch version) and kept in machine_cache_file(): measured
    afresh on every run, the two sat either side of the threshold from one run to the next on a shared VM (bf16
    1.16x and 1.41x fp32 minutes apart), and the same `dbrx generate` printed different text. Returns the rates
    and where they came from."""
    p = machine_profile(device)
    key = f"decode rates | {p.name} | {p.capability} | {p.threads} threads | torch {torch.__version__} | {device}"
    path = machine_cache_file()
    kept: dict = {}
    if path is not None:
        try:
            kept = json.loads(path.read_text())
            entry = kept[key]
            rates = {torch.float32: float(entry["float32"]), torch.bfloat16: float(entry["bfloat16"])}
            return rates, f"measured {entry['measured']}, kept in {path}"
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: measure (and rewrite)
            kept = kept if isinstance(kept, dict) else {}
    rates = {dt: best_matvec_rate(dt, device) for dt in (torch.float32, torch.bfloat16)}
    if path is None:
        return rates, "measured now"
    when = time.strftime("%Y-%m-%d %H:%M")
    kept[key] = {"float32": rates[torch.float32], "bfloat16": rates[torch.bfloat16], "measured": when}
    try:
        from dbrx.fileio import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(kept, indent=1, sort_keys=True) + "\n")
    except OSError:  # a read-only home: measured each run, as before
        return rates, "measured now"
    return rates, f"measured now, kept in {path}"


def matvec_bandwidth(dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """Bytes/s of the faster matrix-vector layout in `dtype` (fp32: the machine's effective memory
    bandwidth, against which decoding is measured)."""
    return best_matvec_rate(dtype, device) * dtype.itemsize


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class MachineProfile:
    """What benchmarks print first and what `auto` choices read."""

    device: str
    name: str  # CPU model or GPU name
    capability: str  # torch's CPU capability (AVX2, AVX512, ...) or the CUDA compute capability
    threads: int
    fp32_flops: float
    bf16_flops: float
    measured_bandwidth: float | None = None  # bytes/s, fp32 matrix-vector; measured when first read

    @property
    def bandwidth(self) -> float:
        """Measured on first use, not at start-up: the trainer reads only the matmul figures, and the 512 MiB
        of matrix-vector probes would add a second to every run."""
        if self.measured_bandwidth is not None:
            return self.measured_bandwidth
        return matvec_bandwidth(torch.float32, self.device)

    @property
    def bf16_speedup(self) -> float:
        return self.bf16_flops / self.fp32_flops

    def describe(self) -> str:
        return (f"{self.name} ({self.capability}), {self.threads} threads, torch {torch.__version__}: matmul "
                f"fp32 {self.fp32_flops / GFLOP:,.1f} GFLOP/s, bf16 {self.bf16_flops / GFLOP:,.1f} GFLOP/s "
                f"(bf16/fp32 {self.bf16_speedup:.2f}x); memory bandwidth {self.bandwidth / 1e9:.1f} GB/s")


@functools.cache
def _profile(device: str) -> MachineProfile:
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, capability, threads = props.name, f"sm_{props.major}{props.minor}", torch.get_num_threads()
    else:
        name, capability, threads = cpu_model(), torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()
    return MachineProfile(device, name, capability, threads, matmul_flops(torch.float32, device),
                          matmul_flops(torch.bfloat16, device))


def machine_profile(device: torch.device | str = "cpu") -> MachineProfile:
    return _profile(_device_key(device))


def bf16_is_slow(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether a reduced-precision matmul is slower than fp32 here (bf16 or fp16 emulated on a CPU without
    native support). Then bf16 weights compute in fp32 and grouped products are not used for them."""
    device = torch.device(device)
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    return matmul_flops(dtype, "cpu") < matmul_flops(torch.float32, "cpu")


@functools.lru_cache(maxsize=None)
def sdpa_upcast_is_faster(batch: int, heads: int, kv_heads: int, seq: int, head_dim: int,
                          dtype: torch.dtype = torch.bfloat16) -> tuple[bool, float, float]:
    """(whether attention runs faster in fp32 than in `dtype` on this CPU, the two times in ms), from a timed
    causal SDPA forward + backward at this shape, casts included. Measured once per shape and process: on a Xeon
    with AMX, torch 2.13's CPU flash attention took 10.3 ms in bf16 and 1.7 ms in fp32 at the demo's shape (16 x 4
    heads x 64 x 32, 2 threads)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, seq, head_dim, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=gen).to(dtype).requires_grad_()
    gqa = kv_heads != heads

    def run(compute: torch.dtype):
        out = F.scaled_dot_product_attention(q.to(compute), k.to(compute), v.to(compute), is_causal=True,
                                             enable_gqa=gqa).to(dtype)
        out.sum().backward()

    low = timeit(lambda: run(dtype), warmup=2, reps=5, best=True)
    high = timeit(lambda: run(torch.float32), warmup=2, reps=5, best=True)
    return high < low, high * 1e3, low * 1e3


# ---- precision `auto` ----------------------------------------------------------------------------------------
def choose_training_precision(requested: str, device: torch.device | str, log=print) -> str:
    """'auto' -> 'amp_bf16' on CUDA (with bf16 support) or where bf16 matmul is at least BF16_MIN_SPEEDUP x
    fp32's, else 'fp32'. An explicit 'amp_bf16' where bf16 is more than BF16_WARN_SLOWDOWN x slower warns."""
    device = torch.device(device)
    if device.type == "cuda":
        if requested == "auto":
            choice = "amp_bf16" if torch.cuda.is_bf16_supported() else "fp32"
            log(f"precision auto: {choice} (CUDA)")
            return choice
        return requested
    if requested == "fp32":
        return requested
    p = machine_profile(device)
    figures = (f"bf16 matmul {p.bf16_flops / GFLOP:,.1f} GFLOP/s, fp32 {p.fp32_flops / GFLOP:,.1f} GFLOP/s "
               f"on {p.name} ({p.capability})")
    if requested == "auto":
        choice = "amp_bf16" if p.bf16_speedup >= BF16_MIN_SPEEDUP else "fp32"
        log(f"precision auto: {choice} ({figures}: bf16/fp32 {p.bf16_speedup:.2f}x; bf16 is chosen from "
            f"{BF16_MIN_SPEEDUP}x)")
        return choice
    if p.bf16_speedup * BF16_WARN_SLOWDOWN < 1:
        warnings.warn(f"precision amp_bf16 on a machine where bf16 matmul is {1 / p.bf16_speedup:,.0f}x slower "
                      f"than fp32 ({figures}); training will be that much slower. Set precision: auto (or fp32), "
                      f"e.g. `dbrx train CONFIG.yaml precision=auto`", stacklevel=2)
    return requested


def choose_inference_dtype(requested: torch.dtype | str | None, device: torch.device | str, stored: torch.dtype | None,
                           n_params: int, memory_bytes: int | None, log=print) -> torch.dtype:
    """The dtype weights are loaded and computed in. 'auto': bf16 on CUDA; on a CPU, fp32 unless bf16 weights
    stream at least BF16_MIN_SPEEDUP x as many weights per second through a matrix-vector product (batch-1
    decoding reads every active weight once per token), or fp32 weights would not fit in 90% of `memory_bytes`.
    None or 'stored' keeps the stored dtype. An explicit bf16 where bf16 matmul is more than BF16_WARN_SLOWDOWN x
    slower than fp32 warns."""
    from dbrx.checkpoint import dtype_name, resolve_dtype

    device = torch.device(device)
    if requested != "auto":
        dtype = resolve_dtype(None if requested == "stored" else requested) or stored or torch.float32
        if requested is not None and dtype == torch.bfloat16 and device.type == "cpu":
            p = machine_profile(device)
            if p.bf16_speedup * BF16_WARN_SLOWDOWN < 1:
                log(f"warning: bfloat16 matmul is {1 / p.bf16_speedup:,.0f}x slower than float32 on {p.name} "
                    f"({p.capability}: bf16 {p.bf16_flops / GFLOP:,.1f} GFLOP/s, fp32 "
                    f"{p.fp32_flops / GFLOP:,.1f}); the experts will compute in float32 from the bf16 weights. "
                    f"--dtype auto chooses what is fastest here")
        return dtype
    if device.type == "cuda":
        log("dtype auto: bfloat16 (CUDA)")
        return torch.bfloat16
    rates, source = decode_rates(str(device))
    fits = [dt for dt in rates if memory_bytes is None or n_params * dt.itemsize <= 0.9 * memory_bytes]
    # bf16 must stream clearly more weights per second: its decode has more per-call overhead than fp32's.
    fast_bf16 = rates[torch.bfloat16] >= BF16_MIN_SPEEDUP * rates[torch.float32]
    choice = torch.bfloat16 if torch.float32 not in fits or fast_bf16 else torch.float32
    p = machine_profile(device)
    log(f"dtype auto: {dtype_name(choice)} (weights streamed per second by a matrix-vector product: float32 "
        f"{rates[torch.float32] / 1e9:.2f} G, bfloat16 {rates[torch.bfloat16] / 1e9:.2f} G, {source}; matmul fp32 "
        f"{p.fp32_flops / GFLOP:,.1f} GFLOP/s, bf16 {p.bf16_flops / GFLOP:,.1f} GFLOP/s"
        + ("" if len(fits) == 2 else "; float32 weights would not fit in memory") + ")")
    return choice


_HEAD_LAYOUT: dict[tuple, bool] = {}


def column_major_head_is_faster(w_VD: torch.Tensor) -> bool:
    """Whether a batch-1 product with this lm_head weight [V, D] is faster stored column-major (x @ W_DV) than
    row-major (x @ W.T). Measured on the weight itself and a column-major copy (the copy that relayout would
    make anyway, so the peak memory is the same), once per shape, dtype and device in a process. fp32 on the
    Xeons measured favours column-major by about 15%; emulated bf16 (AVX2) is 9x slower column-major."""
    key = (tuple(w_VD.shape), w_VD.dtype, str(w_VD.device))
    if key not in _HEAD_LAYOUT:
        if w_VD.device.type != "cpu":
            return False
        with torch.no_grad():
            x = torch.full((1, w_VD.shape[1]), 0.5, dtype=w_VD.dtype)
            row_major = w_VD.contiguous()
            t_row = timeit(lambda: x @ row_major.T, warmup=1, reps=7, best=True)
            del row_major
            col_major = w_VD.t().contiguous().t()
            t_col = timeit(lambda: x @ col_major.T, warmup=1, reps=7, best=True)
        # Row-major is the natural layout: column-major must win clearly, not by noise.
        _HEAD_LAYOUT[key] = t_col * 1.05 < t_row
    return _HEAD_LAYOUT[key]


# ---- memory --------------------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS, for a training process.

    A training step frees and re-allocates the same large tensors (the head's gradients and the logits are
    100 MB each at a 100k vocabulary). glibc serves anything over 32 MB with a fresh mmap, so every step
    page-faults through them again: 5-10% of a CPU step. With mmap off and trimming off, the heap keeps them.
    The resident size then stays at its peak, which a training run reaches on its first step anyway. Returns
    whether it applied (glibc only; elsewhere nothing changes)."""
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
