"""Batch-1 decoding kernels, applied to a model from outside: products compiled by torch.compile (inductor) into
fused reductions, torch.mv for float linear layers, and for int4 weights dbrx.native's C kernel.

A decode step reads each active weight once, so it runs at the speed its products stream weights. On the CPUs
measured, torch's one-row products stream bf16 and int8 at about half fp32's bytes/s and pay ~50-90 us per call at
an expert's size. A reduction that loads the stored weights (float, int8 codes or two int4 codes per byte),
converts them in registers, applies the scales and accumulates in fp32 reads each byte once, and gathering the K
chosen experts inside the same reductions makes one call per layer's experts instead of three per expert.

`compile_decode(model)` compiles these for the model's experts, attention projections and output head, times the
model's decode steps with each candidate and without, part by part, and keeps the fastest (it says which, with the
times). Kernels timed alone mislead: their repetitions leave the weights in the cache, which a decode step, reading
every layer's weights once, does not. Nothing changes a parameter or a state_dict key; the compiled kernels run only
for one row without autograd (the C kernel up to dbrx.quant.NATIVE_ROWS rows), and longer prefills, larger batches
and training take the eager path. Compiling takes seconds per shape;
inductor's on-disk cache makes later processes faster. Where compilation fails (no C++ compiler, say), the eager
path stays, with a warning.

Shape legend: K experts chosen for the token, E experts, O output size, I input size, G int4 groups per row.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from dbrx.perf import timeit

MIN_GAIN = 0.03
"""A kernel replaces the eager path only where decode steps measure at least this much shorter with it: on a shared
2-core machine, steps of the same code differ by a few percent from one timing to the next."""


def rows_product(x_KI: torch.Tensor, w, scales, kind: str, group: int, idx_K) -> torch.Tensor:
    """y_KO (fp32) = x_k . W_k^T, row k against matrix W_k = w[idx_K[k]] (or against w [O, I] itself when idx_K is
    None): float weights; int8 codes with a scale per output; int4 codes two per byte (the even input column in
    the low nibble) with a scale and zero point per group of `group` inputs ([.., G, O, 2]), w = (q - 8) * s + z."""
    x_KI = x_KI.float()
    w_KOI = w[None] if idx_K is None else w[idx_K]
    if kind == "float":
        return (x_KI[:, None, :] * w_KOI.float()).sum(-1)
    s = scales[None] if idx_K is None else scales[idx_K]
    if kind == "int8":
        return (x_KI[:, None, :] * w_KOI.float()).sum(-1) * s.float()
    K, O, half = w_KOI.shape
    G = 2 * half // group
    q_KOGh = w_KOI.view(K, O, G, group // 2)
    scale_KOG1 = s[..., 0].float().transpose(1, 2)[..., None]
    zero_KOG1 = s[..., 1].float().transpose(1, 2)[..., None]
    x_K1Gh2 = x_KI.view(K, 1, G, group // 2, 2)
    low = ((q_KOGh & 15).float() - 8) * scale_KOG1 + zero_KOG1
    high = ((q_KOGh >> 4).float() - 8) * scale_KOG1 + zero_KOG1
    return (x_K1Gh2[..., 0] * low + x_K1Gh2[..., 1] * high).sum((-1, -2))


def _rows(x_KI, w, scales, kind, group, idx_K):
    return rows_product(x_KI, w, scales, kind, group, idx_K).to(x_KI.dtype)


def _experts_glu(x_1D, weights_K, experts_K, w1, v1, w2, act, kind, group1, group2):
    """One token through its K experts: sum_k weight_k * w2_k(act(w1_k x) * v1_k x). Float experts keep w2 as
    stored ([E, F, D], applied as h @ w2); quantised ones as [E, D, F] with scales per output (dbrx.quant)."""
    K = experts_K.shape[0]
    x_KD = x_1D.expand(K, x_1D.shape[-1])
    h_KF = act(rows_product(x_KD, *w1, kind, group1, experts_K)) * rows_product(x_KD, *v1, kind, group1, experts_K)
    if kind == "float":
        y_KD = (h_KF[:, :, None] * w2[0][experts_K].float()).sum(1)
    else:
        y_KD = rows_product(h_KF, *w2, kind, group2, experts_K)
    return (y_KD * weights_K[:, None].float()).sum(0, keepdim=True).to(x_1D.dtype)


_COMPILED: dict[str, object] = {}


def compiled(name: str):
    """The compiled form of one of this module's kernels, made once per process (inductor specialises it per shape
    and dtype on first call)."""
    if name not in _COMPILED:
        _separate_cache_per_isa()
        # each shape and dtype is its own compiled graph: a model's few (experts, attention, head; int8 and int4)
        # exceed dynamo's default of 8 per function, past which it would run the reduction eagerly, very slowly
        limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.recompile_limit = limit
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                               4 * limit)
        _COMPILED[name] = torch.compile({"rows": _rows, "experts_glu": _experts_glu}[name],
                                        dynamic=False)
    return _COMPILED[name]


def _separate_cache_per_isa() -> None:
    """Give inductor's on-disk cache a folder per CPU capability (AVX512, AVX2, ...) unless the user chose one:
    when the capability changed under one cache (ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine, here), kernels read
    back from it computed NaN and garbage. Importing torch._inductor.config sets the variable to the default folder
    itself, so that value counts as unchosen."""
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = os.path.abspath(default_cache_dir())
    if os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR", default)) == default:
        isa = torch.backends.cpu.get_cpu_capability()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default, f"dbrx-{isa.lower()}")


def int4_group_ok(group: int) -> bool:
    """The int4 kernel splits each group into pairs of codes (one byte)."""
    return group % 2 == 0


# ---- applying them to a model ---------------------------------------------------------------------------------
class CompiledRowLinear(nn.Linear):
    """nn.Linear (the same parameters and state_dict) whose one-row products without autograd run the compiled
    reduction; installed by compile_decode by changing a Linear's class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and not torch.is_grad_enabled() and self.bias is None:
            y = compiled("rows")(x.reshape(1, -1), self.weight, None, "float", 0, None)
            return y.view(*x.shape[:-1], self.out_features)
        return super().forward(x)


class MvRowLinear(nn.Linear):
    """The same for torch.mv: a matrix-vector product, which on the CPUs measured streams bf16 weights ~1.3x faster
    than the one-row matrix product that F.linear runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and not torch.is_grad_enabled() and self.bias is None:
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        return super().forward(x)


class NativeRowLinear(nn.Linear):
    """The same for dbrx.native's fp32 row kernel (four rows at a time, the next four prefetched): on an AMD EPYC it
    streamed the 100k-row head at 27-28 GB/s, against F.linear's 21 column-major and 8 row-major. It takes fp32
    weights stored row-major (compile_decode lays the head out so while a row kernel runs it); others take
    nn.Linear's path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.numel() == self.in_features and not torch.is_grad_enabled() and self.bias is None and \
                w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous():
            from dbrx import native

            return native.f32_rows(x.reshape(1, -1), w).to(x.dtype).view(*x.shape[:-1], self.out_features)
        return super().forward(x)


ROW_LINEARS = {"compiled": CompiledRowLinear, "mv": MvRowLinear, "native": NativeRowLinear}


def _native_takes(linear: nn.Linear) -> bool:
    from dbrx import native

    w = linear.weight
    return w.dtype == torch.float32 and w.device.type == "cpu" and native.library() is not None


def _head_row_major(model, native: bool) -> None:
    """The head row-major while a row kernel (compiled or native) runs it; back to the layout it had (measured at
    load, for F.linear) after. A compiled bf16 head on dbrx-small took 11.4-16.1 ms steps row-major, 19.1 ms
    column-major, where eager took 15.5-22.0 and 19.6-20.7: which layout loading had measured decided whether
    compile_decode kept it."""
    if native and not hasattr(model, "_head_column_major"):
        model._head_column_major = model.lm_head.weight.stride(0) == 1
        model.relayout_lm_head(column_major=False)
    elif not native and hasattr(model, "_head_column_major"):
        model.relayout_lm_head(column_major=model.__dict__.pop("_head_column_major"))


def _float_experts_kernel(experts, x_1D, weights_1K, experts_1K):
    w1, v1, w2 = experts._inference_weights()
    return compiled("experts_glu")(x_1D, weights_1K[0], experts_1K[0], (w1, None), (v1, None), (w2, None),
                                   experts.mlp.act, "float", 0, 0)


def _parts(model) -> dict[str, dict[str, tuple[list, list]]]:
    """Part -> {candidate kernel: (what switches the part to it, what switches it back)}: the experts, the
    attention projections and the output head, where a kernel here takes them."""
    from dbrx.moe import DbrxExperts
    from dbrx.quant import QuantExperts, QuantLinear

    def linear(owner, name) -> dict[str, tuple]:
        module = getattr(owner, name)
        if isinstance(module, QuantLinear):
            w, kernel, dtype = module.weights, module.weights.kernel, module.weights.compute_dtype
            return {k: ((lambda k=k: w.use_kernel(k)), (lambda: w.use_kernel(kernel, dtype)))
                    for k, ok in (("compiled", w.compiles()), ("native", w.native())) if ok}
        if type(module) is nn.Linear and module.bias is None:
            back = lambda: setattr(module, "__class__", nn.Linear)  # noqa: E731
            options = {k: ((lambda c=c: setattr(module, "__class__", c)), back) for k, c in ROW_LINEARS.items()
                       if k != "native" or _native_takes(module)}
            if module is getattr(model, "lm_head", None):  # the reductions read rows: lay the head out so for them
                for k in {"compiled", "native"} & set(options):
                    options[k] = ((lambda to=options[k][0]: (_head_row_major(model, True), to())),
                                  (lambda: (back(), _head_row_major(model, False))))
            return options
        return {}

    def together(switches: list[dict[str, tuple]]) -> dict[str, tuple[list, list]]:
        """One part made of several modules: the candidates all of them take."""
        common = set.intersection(*(set(s) for s in switches)) if switches else set()
        return {k: ([s[k][0] for s in switches], [s[k][1] for s in switches]) for k in sorted(common)}

    parts: dict[str, dict[str, tuple[list, list]]] = {}
    blocks = model.transformer.blocks
    experts = [b.ffn.experts for b in blocks]
    if all(isinstance(e, QuantExperts) for e in experts):
        matrices = [(w, w.kernel, w.compute_dtype) for e in experts for w in e.matrices()]
        undo = [lambda w=w, k=k, d=d: w.use_kernel(k, d) for w, k, d in matrices]
        parts["experts"] = {kernel: ([lambda w=w, kernel=kernel: w.use_kernel(kernel) for w, _, _ in matrices], undo)
                            for kernel, ok in (("compiled", all(e.compiles() for e in experts)),
                                               ("native", all(w.native() for w, _, _ in matrices))) if ok}
    elif all(type(e) is DbrxExperts and e.mlp.lora is None for e in experts):
        parts["experts"] = {"compiled": ([lambda e=e: setattr(e, "one_token", _float_experts_kernel) for e in experts],
                                         [lambda e=e: setattr(e, "one_token", None) for e in experts])}
    parts["attention"] = together([linear(b.norm_attn_norm.attn, n) for b in blocks for n in ("Wqkv", "out_proj")])
    parts["lm_head"] = together([linear(model, "lm_head")])
    return {part: candidates for part, candidates in parts.items() if candidates}


def _step_time(model, steps: int) -> float:
    """Seconds per batch-1 decode step (the shortest mean over `steps` steps of two tries)."""
    from dbrx.generate import decode_one_token, prefill
    from dbrx.model import KVCache
    from dbrx.placement import layer_devices

    dtype = model.transformer.wte.weight.dtype
    device = model.transformer.wte.weight.device
    cache = KVCache(model.config, 1, 2 * steps + 2, dtype, layer_devices(model))
    ids = torch.tensor([[1, 2]], device=device)
    prefill(model, ids, cache, None)
    best = float("inf")
    for start in (2, 2 + steps):
        t = timeit(lambda: [decode_one_token(model, ids[:, 0], cache, pos, None)
                            for pos in range(start, start + steps)], warmup=0, reps=1, device=device)
        best = min(best, t / steps)
    return best


class _Step(nn.Module):
    """What DecodeStep exports: one token [1, 1] at slot `pos` of a cache given as tensors -> logits [1, V]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids_11, pos, k, v):
        from dbrx.model import KVCache

        return self.model(ids_11, cache=KVCache.of(k, v), start_pos=pos).logits[:, -1]


def _fingerprint(model) -> tuple:
    """What a DecodeStep was built from: each module's class, tensors (storage, dtype, shape, layout) and kernel."""
    return tuple((type(m), getattr(m, "kernel", None),
                  tuple((t.data_ptr(), t.dtype, t.shape, t.stride()) for t in (*m._parameters.values(),
                                                                              *m._buffers.values()) if t is not None))
                 for m in model.modules())


class DecodeStep:
    """A model's whole batch-1 decode step as one compiled program: exported (torch.export, non-strict) with the
    position and the cache's length symbolic, then compiled by inductor into one callable, run without dynamo.

    Between a step's products sit ~40 small operations a block (norms, RoPE, the cache writes, attention over the
    cache, the router, residuals), each a Python call and a dispatch when eager: on an AMD EPYC they took ~1.1 ms of
    dbrx-small's int4 step of 3.4 ms. Here inductor fuses them into a few C++ loops, and no guards are evaluated
    before each call (torch.compile's took 0.1-0.2 ms a step there, checking the model's ~150 tensors). The products
    run what compile_decode chose for them: the C kernels as opaque operators (dbrx.native), the compiled
    reductions traced into the program.

    It takes a step of one row without a mask or autograd, on a KVCache in the dtype and on the device it was built
    for; anything else runs the eager step. It holds the model's own tensors, not copies: weights changed in place
    (load_state_dict) hold, while a module or tensor replaced (quantize, .to(), LoRA) makes it stale, which
    `current` tells (dbrx.generate then warns and runs the eager step)."""

    def __init__(self, model):
        from torch._inductor.compile_fx import compile_fx
        from torch.export import Dim

        from dbrx.model import KVCache

        cfg = model.config
        param = model.transformer.wte.weight
        self.device, self.dtype, self.max_len = param.device, model.compute_dtype or param.dtype, cfg.max_seq_len
        # the example: a length and slot equal to nothing else (equal sizes can be taken for one symbol when traced)
        length = min(11, cfg.max_seq_len)
        cache = KVCache(cfg, 1, length, self.dtype, self.device)
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        slots = Dim("cache_len", min=2, max=cfg.max_seq_len)
        shapes = {"ids_11": None, "pos": Dim.DYNAMIC, "k": [{2: slots}] * cfg.n_layers,
                  "v": [{2: slots}] * cfg.n_layers}
        with torch.no_grad():
            program = torch.export.export(_Step(model), (ids, length // 2, cache.k, cache.v), dynamic_shapes=shapes,
                                          strict=False).module()
            # compiled for the graph's symbolic inputs (real ones would specialise the position and length); the
            # graph module holds closures inductor's on-disk cache cannot pickle
            symbolic = [n.meta["val"] for n in program.graph.nodes if n.op == "placeholder"]
            self._run = compile_fx(program, symbolic, config_patches={"fx_graph_cache": False})
        self._fingerprint = _fingerprint(model)

    def current(self, model) -> bool:
        """Whether the model still has the modules and tensors this was built from."""
        return _fingerprint(model) == self._fingerprint

    def takes(self, ids_B: torch.Tensor, cache, pos: int, mask_BS: torch.Tensor | None) -> bool:
        from dbrx.model import KVCache

        if mask_BS is not None or ids_B.shape != (1,) or type(cache) is not KVCache or torch.is_grad_enabled():
            return False
        k = cache.k[0]
        return (k.dtype == self.dtype and k.device == self.device and k.shape[0] == 1 and
                2 <= cache.max_len <= self.max_len and 0 <= pos < cache.max_len)

    def __call__(self, ids_B: torch.Tensor, cache, pos: int) -> torch.Tensor:
        """Logits [1, V] of the token at slot `pos`, its keys and values written to the cache."""
        out = self._run(ids_B[:, None], pos, *cache.k, *cache.v)
        return out[0] if isinstance(out, (tuple, list)) else out


def compile_decode(model, log=print, steps: int = 8, tries: int = 3) -> dict[str, str]:
    """Compile the one-row kernels for the model's experts, attention projections (Wqkv, out_proj) and output head,
    and keep each where batch-1 decode steps of this model, on its devices, measure MIN_GAIN faster with it than
    without (part by part, the candidates timed in turns `tries` times, the shortest of each kept): a kernel timed
    alone runs on weights its repetitions left in the cache, unlike a decode step. The kept kernels are then timed
    together against none, and all dropped unless that also saves MIN_GAIN (where the first `tries` turns say it does
    not, `tries` more are added before it holds: one slow spell dropped compiled int8 experts that had taken a
    quarter off each step part by part). Returns what was chosen for each part,
    with every candidate's step time, and under "together" that last verdict."""
    undo_compile_decode(model)
    steps = max(1, min(steps, (model.config.max_seq_len - 2) // 2))  # the timing's cache fits the model
    parts = _parts(model)
    chosen: dict[str, str] = {}
    kept: dict[str, tuple[list, list]] = {}

    def switch(fns):
        for fn in fns:
            fn()

    try:
        with torch.inference_mode():
            for candidates in parts.values():  # compile every kernel first: the timings then hold no compilation
                for apply, undo in candidates.values():
                    switch(apply)
                    _step_time(model, 2)
                    switch(undo)
            _step_time(model, 2)
            for part, candidates in parts.items():
                times = {name: float("inf") for name in ("eager", *candidates)}
                for _ in range(tries):
                    times["eager"] = min(times["eager"], _step_time(model, steps))
                    for name, (apply, undo) in candidates.items():
                        switch(apply)
                        times[name] = min(times[name], _step_time(model, steps))
                        switch(undo)
                best = min(times, key=times.get)
                if times[best] > times["eager"] * (1 - MIN_GAIN):  # within the machine's noise: stay eager
                    best = "eager"
                if best != "eager":
                    switch(candidates[best][0])
                    kept[part] = candidates[best]
                steps_ms = ", ".join(f"{k} {t * 1e3:.2f} ms" for k, t in times.items())
                chosen[part] = f"{best} (decode step: {steps_ms})"
            if kept:  # the kept kernels together against none, timed afresh: a second look at a noisy machine
                eager = together = float("inf")
                for _ in range(2):  # a verdict against the part-wise timings is looked at twice before it holds
                    for _ in range(tries):
                        switch(fn for _, undo in kept.values() for fn in undo)
                        eager = min(eager, _step_time(model, steps))
                        switch(fn for apply, _ in kept.values() for fn in apply)
                        together = min(together, _step_time(model, steps))
                    if together <= eager * (1 - MIN_GAIN):
                        break
                verdict = "kept" if together <= eager * (1 - MIN_GAIN) else "dropped"
                if verdict == "dropped":
                    switch(fn for _, undo in kept.values() for fn in undo)
                    for part in kept:  # what runs is eager; the timing that first picked it stays on show
                        chosen[part] = "eager, dropped with the others: " + chosen[part]
                chosen["together"] = (f"{verdict} (decode step: eager {eager * 1e3:.2f} ms, with "
                                      f"{', '.join(kept)} {together * 1e3:.2f} ms)")
    except Exception as e:  # noqa: BLE001 - a compiler or backend the machine lacks: keep the eager path
        warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); decoding "
                      "keeps the eager kernels", stacklevel=2)
        undo_compile_decode(model)
        return {}
    if _one_cpu(model):
        chosen["step"] = _choose_step(model, steps, tries)
    for part, verdict in chosen.items():
        log(f"compiled decode, {part}: {verdict}")
    return chosen


def _one_cpu(model) -> bool:
    """The compiled step is built for models on one CPU (on a GPU, launches would want CUDA graphs: not measured)."""
    return {t.device.type for t in (*model.parameters(), *model.buffers())} == {"cpu"}


def _choose_step(model, steps: int, tries: int) -> str:
    """Build the whole step's DecodeStep over the kernels chosen and keep it where steps measure MIN_GAIN shorter
    with it (turn by turn, `tries` times, the shortest of each). Where export or compilation fails, say why and
    decode eagerly."""
    try:
        step = DecodeStep(model)
        with torch.inference_mode():
            model.decode_step = step
            _step_time(model, 2)  # first calls allocate
            eager = compiled = float("inf")
            for _ in range(tries):
                model.decode_step = None
                eager = min(eager, _step_time(model, steps))
                model.decode_step = step
                compiled = min(compiled, _step_time(model, steps))
    except Exception as e:  # noqa: BLE001 - a model torch.export cannot trace, a compiler the machine lacks
        model.decode_step = None
        return f"eager (the step could not be compiled: {type(e).__name__}: {str(e).splitlines()[0][:200]})"
    kept = compiled <= eager * (1 - MIN_GAIN)
    model.decode_step = step if kept else None
    return f"{'compiled' if kept else 'eager'} (decode step: eager {eager * 1e3:.2f} ms, compiled {compiled * 1e3:.2f} ms)"


def undo_compile_decode(model) -> None:
    """Back to the eager kernels everywhere."""
    from dbrx.quant import QuantWeights

    if hasattr(model, "decode_step"):
        model.decode_step = None
    for module in model.modules():
        if type(module) in ROW_LINEARS.values():
            module.__class__ = nn.Linear
    if hasattr(model, "relayout_lm_head"):
        _head_row_major(model, False)
    for module in model.modules():
        if hasattr(module, "one_token"):
            module.one_token = None
        if isinstance(module, QuantWeights) and module.kernel in ("compiled", "native"):
            module.use_kernel(None)
