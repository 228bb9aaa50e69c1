"""Measuring the machine: the ceilings that benchmarks and training logs compare against."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], *, warmup: int = 1, reps: int = 5, device="cpu") -> float:
    """Median wall time of `fn` in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matvec_bandwidth(nbytes: int = 256 * 2**20, dtype=torch.float32, device="cpu", reps: int = 7) -> float:
    """Bytes/s read by a large matrix-vector product (the ceiling for batch-1 decoding)."""
    cols = 4096
    rows = max(1, nbytes // (cols * dtype.itemsize))
    a = torch.randn(rows, cols, dtype=dtype, device=device)
    x = torch.randn(cols, dtype=dtype, device=device)
    seconds = timeit(lambda: torch.mv(a, x), warmup=2, reps=reps, device=device)
    return a.numel() * a.element_size() / seconds


def matmul_flops(n: int = 2048, dtype=torch.float32, device="cpu", reps: int = 5) -> float:
    """FLOP/s of a large square matmul (the ceiling for training and prefill)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    seconds = timeit(lambda: a @ b, warmup=2, reps=reps, device=device)
    return 2 * n**3 / seconds


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
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
