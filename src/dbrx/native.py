"""One-row products in C (csrc/rows.c), built with the machine's C compiler on first use and called through ctypes:
dbrx.quant's "native" int4 kernel, and dbrx.kernels' fp32 row kernel.

At an expert's size torch's packed int4 CPU kernel streams its weights at a third to half of the memory's speed
(about 17-40 us a 0.3 MB matrix, much of it per call), and inductor's reductions over nibbles compute more than they
read. This kernel converts the stored codes in registers and runs a token's K experts, both GLU products and w2, in
one call per layer. Where the CPU has AVX512-BF16 it feeds vdpbf16ps (activations rounded to bf16, as the packed
kernel rounds them); elsewhere it converts to fp32 for FMAs (AVX-512 or AVX2) or runs a plain loop, activations in
fp32. On an AMD EPYC (Zen 4, 2 threads; docs/inference.md): dbrx-small's experts 1.2-1.3 ms a step against the
packed kernel's 1.6 ms, its int4 head 1.25-1.36 ms against 1.43-1.45 (weights not in the cache).

For fp32 weights stored row-major, the same loop shape (four rows' dot products at a time, the next four rows
prefetched) streamed the 100k x 384 head at 27-28 GB/s there, where torch's one-row product reached 21 column-major
and 8 row-major: dbrx.kernels offers it for float heads and attention projections.

Built once per source, compiler, flags and CPU model into $DBRX_KERNEL_CACHE or $XDG_CACHE_HOME/dbrx/kernels
(~/.cache/dbrx/kernels), written to a temporary name and renamed. With no compiler, or where the build fails,
`library()` is None (warned once) and dbrx.quant keeps torch's kernels. OpenMP comes from torch's own runtime,
already loaded in the process, with torch's intra-op thread count (torch.set_num_threads holds, in any thread).

Shape legend: K rows of input (one per chosen expert), E matrices, O outputs, I inputs, G groups per row,
D d_model, F expert width.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "rows.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
ACTIVATIONS = {"silu": 0, "gelu": 1}
_LIBRARIES: dict[tuple[str, ...], ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    chosen = os.environ.get("DBRX_KERNEL_CACHE")
    if chosen:
        return Path(chosen)
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dbrx" / "kernels"
    except (RuntimeError, KeyError):  # no home directory: a private folder for this process (a shared one in /tmp
        return Path(tempfile.mkdtemp(prefix="dbrx-kernels-"))  # could hold a library planted under the same name)


def _cpu_features() -> str:
    """What the CPU offers, for the build's key: a library built with -march=native on one CPU may not run on another
    of the same model name (a home directory shared between machines)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(flags: tuple[str, ...] = FLAGS, out_dir: Path | None = None) -> Path:
    """Compile csrc/rows.c with `flags` (cached: a build with the same source, compiler, flags and CPU is reused).
    Raises RuntimeError saying what failed."""
    from dbrx.perf import cpu_model

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} --version failed: {e}") from e
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(), cpu_model().encode(),
                                     _cpu_features().encode()]))
    out_dir = out_dir or cache_dir()
    path = out_dir / f"rows-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        run = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
        if run.returncode:
            raise RuntimeError(f"{cc} {' '.join(flags)} {SOURCE.name} failed: {run.stderr.strip()[-500:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def library(flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL | None:
    """The built kernels, or None where they cannot be built here (warned once per process)."""
    if flags not in _LIBRARIES:
        try:
            lib = ctypes.CDLL(str(build(flags)))
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            warnings.warn(f"dbrx.native: the C kernels are unavailable ({e}); torch's kernels stay", stacklevel=2)
            lib = None
        if lib is not None:
            p, n = ctypes.c_void_p, ctypes.c_int64
            i = ctypes.c_int
            lib.dbrx_int4_rows.argtypes = [n, n, n, n, p, p, p, p, p, i]
            lib.dbrx_int4_experts.argtypes = [n, n, n, n, n, i, *[p] * 10, i]
            lib.dbrx_f32_rows.argtypes = [n, n, n, p, p, p, i]
            for fn in (lib.dbrx_int4_rows, lib.dbrx_int4_experts, lib.dbrx_int4_isa, lib.dbrx_f32_rows):
                fn.restype = ctypes.c_int
        _LIBRARIES[flags] = lib
    return _LIBRARIES[flags]


ISAS = {3: ("AVX512-BF16", "bfloat16"), 2: ("AVX-512", "float32"), 1: ("AVX2", "float32"), 0: ("plain C", "float32")}


def isa(lib: ctypes.CDLL | None = None) -> tuple[str, str]:
    """(the loop the built kernel runs, the dtype its activations take)."""
    return ISAS[(lib or library()).dbrx_int4_isa()]


def activations() -> str:
    return isa()[1]


def takes(group: int, device: torch.device) -> bool:
    """Whether this kernel applies: codes on the CPU whose groups hold whole bytes."""
    return device.type == "cpu" and group % 2 == 0


def kernel_scales(sz_EGO2: torch.Tensor) -> torch.Tensor:
    """dbrx.quant's (scale, zero) [E, G, O, 2] -> what the kernel reads, [E, O, G, 2] fp32 (scale, zero - 8 scale):
    each row's pairs side by side, w = q * scale + (zero - 8 scale)."""
    s = sz_EGO2.float()
    return torch.stack([s[..., 0], s[..., 1] - 8 * s[..., 0]], dim=-1).transpose(1, 2).contiguous()


def _check(status: int) -> None:
    if status:
        raise MemoryError("dbrx.native: the C kernel could not allocate its buffers")


def _require(condition: bool, what: str) -> None:
    """The C code reads raw memory: shapes and layouts are checked here, where a mistake can still be named."""
    if not condition:
        raise ValueError(f"dbrx.native: {what}")


def int4_rows(x_KI: torch.Tensor, q_EOH: torch.Tensor, sc_EOG2: torch.Tensor, group: int, idx_K: torch.Tensor | None,
              lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """y_KO (fp32) = x_k . W_{idx_K[k]} (each row against matrix 0 where idx_K is None)."""
    if lib is None and torch.compiler.is_compiling():  # traced (dbrx.kernels.DecodeStep): an opaque op
        return torch.ops.dbrx.int4_rows(x_KI, q_EOH, sc_EOG2, group, idx_K)
    lib = lib or library()
    x_KI = x_KI.float().contiguous()
    K, I = x_KI.shape
    E, O, H = q_EOH.shape
    _require(q_EOH.dtype == torch.uint8 and q_EOH.is_contiguous() and 2 * H == I and I % group == 0 and
             group % 2 == 0, f"int4 codes {tuple(q_EOH.shape)} {q_EOH.dtype} for inputs of {I} in groups of {group}")
    _require(sc_EOG2.dtype == torch.float32 and sc_EOG2.is_contiguous() and
             tuple(sc_EOG2.shape) == (E, O, I // group, 2), f"kernel scales {tuple(sc_EOG2.shape)} for {E}x{O} rows")
    _require(idx_K is not None or E == 1, "several matrices and no index")
    y_KO = torch.empty(K, O)
    idx = None if idx_K is None else idx_K.to(torch.int64).contiguous()
    _check(lib.dbrx_int4_rows(K, O, I, group, x_KI.data_ptr(), q_EOH.data_ptr(), sc_EOG2.data_ptr(),
                              None if idx is None else idx.data_ptr(), y_KO.data_ptr(), torch.get_num_threads()))
    return y_KO


def int4_experts(x_1D: torch.Tensor, weights_K: torch.Tensor, experts_K: torch.Tensor, w1, v1, w2, act: str,
                 lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """One token through its K experts, sum_k weight_k * w2_k(act(w1_k x) * v1_k x), in x's dtype. w1, v1, w2:
    (codes, kernel_scales, group); w1, v1 [E, F, D/2]; w2 transposed per expert, [E, D, F/2]."""
    if lib is None and torch.compiler.is_compiling():
        return torch.ops.dbrx.int4_experts(x_1D, weights_K, experts_K, *w1, *v1[:2], *w2, act)
    lib = lib or library()
    x = x_1D.float().contiguous()
    weight = weights_K.float().contiguous()
    idx = experts_K.to(torch.int64).contiguous()
    (q1, sc1, g1), (qv, scv, _), (q2, sc2, g2) = w1, v1, w2
    F, D = q1.shape[1], x.shape[-1]
    _require(all(t.is_contiguous() for t in (q1, sc1, qv, scv, q2, sc2)) and q1.shape == qv.shape and
             tuple(q1.shape[1:]) == (F, D // 2) and tuple(q2.shape[1:]) == (D, F // 2),
             f"expert codes w1 {tuple(q1.shape)}, v1 {tuple(qv.shape)}, w2 {tuple(q2.shape)} for d_model {D}")
    y = torch.empty(D)
    _check(lib.dbrx_int4_experts(idx.shape[0], D, F, g1, g2, ACTIVATIONS[act], x.data_ptr(), weight.data_ptr(),
                                 idx.data_ptr(), q1.data_ptr(), sc1.data_ptr(), qv.data_ptr(), scv.data_ptr(),
                                 q2.data_ptr(), sc2.data_ptr(), y.data_ptr(), torch.get_num_threads()))
    return y.view(1, D).to(x_1D.dtype)


def f32_rows(x_KI: torch.Tensor, w_OI: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """y_KO = x_KI @ w_OI.T for fp32 weights stored row-major (contiguous): each row's dot product four rows at a
    time, the next rows prefetched."""
    if lib is None and torch.compiler.is_compiling():
        return torch.ops.dbrx.f32_rows(x_KI, w_OI)
    lib = lib or library()
    x_KI = x_KI.float().contiguous()
    K, I = x_KI.shape
    O = w_OI.shape[0]
    _require(w_OI.dtype == torch.float32 and w_OI.is_contiguous() and w_OI.shape == (O, I),
             f"fp32 row-major weights [{O}, {I}], got {tuple(w_OI.shape)} {w_OI.dtype}")
    y_KO = torch.empty(K, O)
    _check(lib.dbrx_f32_rows(K, O, I, x_KI.data_ptr(), w_OI.data_ptr(), y_KO.data_ptr(), torch.get_num_threads()))
    return y_KO


# ---- the same kernels as torch operators, for graphs that trace through them --------------------------------------
# dbrx.kernels.DecodeStep exports a whole decode step and compiles it with inductor: the C calls are opaque operators
# there, with their output shapes declared for tracing. Eager calls go through ctypes directly (an operator's
# dispatch costs a few microseconds a call).
Tensor = torch.Tensor


@torch.library.custom_op("dbrx::int4_rows", mutates_args=())
def _int4_rows_op(x_KI: Tensor, q_EOH: Tensor, sc_EOG2: Tensor, group: int, idx_K: Tensor | None) -> Tensor:
    return int4_rows(x_KI, q_EOH, sc_EOG2, group, idx_K, library())


@_int4_rows_op.register_fake
def _(x_KI, q_EOH, sc_EOG2, group, idx_K):
    return x_KI.new_empty(x_KI.shape[0], q_EOH.shape[1], dtype=torch.float32)


@torch.library.custom_op("dbrx::int4_experts", mutates_args=())
def _int4_experts_op(x_1D: Tensor, weights_K: Tensor, experts_K: Tensor, q1: Tensor, sc1: Tensor, group1: int,
                     qv: Tensor, scv: Tensor, q2: Tensor, sc2: Tensor, group2: int, act: str) -> Tensor:
    return int4_experts(x_1D, weights_K, experts_K, (q1, sc1, group1), (qv, scv, group1), (q2, sc2, group2), act,
                        library())


@_int4_experts_op.register_fake
def _(x_1D, weights_K, experts_K, q1, sc1, group1, qv, scv, q2, sc2, group2, act):
    return x_1D.new_empty(1, x_1D.shape[-1])


@torch.library.custom_op("dbrx::f32_rows", mutates_args=())
def _f32_rows_op(x_KI: Tensor, w_OI: Tensor) -> Tensor:
    return f32_rows(x_KI, w_OI, library())


@_f32_rows_op.register_fake
def _(x_KI, w_OI):
    return x_KI.new_empty(x_KI.shape[0], w_OI.shape[0], dtype=torch.float32)
