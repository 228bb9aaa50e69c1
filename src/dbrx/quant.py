"""Weight-only int8 / int4 quantisation for inference, applied to a loaded model from outside the model file.

The experts (127B of DBRX's 132B parameters) are quantised; `include` adds "attention" (Wqkv, out_proj) and
"lm_head". Activations stay in the model's dtype. int8 is symmetric with a scale per output channel; int4 is
asymmetric in groups of `group_size` along the input (the largest divisor of the input size below it, where it
does not divide), with a scale and a zero point per group (torch's int4 convention: w = (q - 8) * scale + zero,
q in 0..15), two codes per byte in memory as on disk. The experts' w2 is applied as h @ w2, so it is kept
transposed per expert ([E, D, F]): its scales are then per output channel like every other matrix's.

Each product runs through torch's packed CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`:
private, so guarded), with activations in the weights' dtype or in bf16, or a plain dequantise-then-matmul
fallback, or for int4 dbrx.native's C kernel (a token's experts in one call), whichever measured
faster for that matrix's shape and dtype on this machine (once per process); off the CPU, the fallback.
dbrx.kernels.compile_decode may switch one-row products to its compiled reduction, which reads the codes as stored,
or int4 ones to the C kernel, where decode steps measure faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dbrx.moe import _ACTIVATIONS, add_by_token
from dbrx.perf import timeit

BITS = (8, 4)
KERNELS = (None, "packed", "dequantize", "compiled", "native")
NATIVE_ROWS = 8
"""Up to this many rows (a short prompt chunk, a small decoding batch) go through dbrx.native's kernel one row at a
time, each reading the matrix again (from the cache, past the first); more take dequantise + matmul."""
INCLUDABLE = ("attention", "lm_head")
_KERNEL: dict[tuple, str] = {}
_ACT_NAMES = {fn: name for name, fn in _ACTIVATIONS.items()}


def int4_group(input_size: int, group_size: int) -> int:
    """The int4 group a matrix with this input size is quantised with: group_size where it divides the input,
    else its largest divisor below group_size (dbrx.placement counts the scales by the same rule)."""
    return max(d for d in range(1, min(group_size, input_size) + 1) if input_size % d == 0)


@dataclass(frozen=True)
class QuantConfig:
    bits: int
    group_size: int = 128
    include: tuple[str, ...] = ()

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits must be 8 or 4, got {self.bits}")
        bad = [i for i in self.include if i not in INCLUDABLE]
        if bad:
            raise ValueError(f"include {','.join(bad)}: only {', '.join(INCLUDABLE)} can be quantised besides experts")
        if self.bits == 4 and self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")


def quantize_int8(w_EOI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output channel: (q int8 [E, O, I], scale [E, O] in w's dtype)."""
    scale = w_EOI.float().abs().amax(dim=-1).clamp(min=1e-12) / 127
    q = torch.round(w_EOI.float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale.to(w_EOI.dtype)


def quantize_int4(w_EOI: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric in groups along the input: (q int32 codes 0..15 [E, O, I], scales_and_zeros [E, I/g, O, 2] in w's
    dtype), w ~ (q - 8) * scale + zero."""
    E, O, I = w_EOI.shape
    if I % group_size:
        raise ValueError(f"group_size {group_size} must divide the input size {I}")
    w = w_EOI.float().view(E, O, I // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(E, O, I)
    zero = lo + 8 * scale  # so that (q - 8) * scale + zero = q * scale + lo
    sz = torch.stack([scale, zero], dim=-1).transpose(1, 2).contiguous()  # [E, I/g, O, 2]
    return q, sz.to(w_EOI.dtype)


class QuantWeights(nn.Module):
    """E quantised matrices [O, I] (E = 1 for a linear layer); `mm(x, e)` = x @ W_e.T in x's dtype. Built from
    float weights (`quantized`) or from a quantised checkpoint's tensors (`from_stored`). int8 codes are kept as
    [E, O, I]; int4 codes two per byte, [E, O, I/2] (the checkpoint's layout). `kernel`: None (the faster eager one,
    measured), "packed", "dequantize", "compiled" (dbrx.kernels' reduction for one row, dequantise+matmul for
    more; what dbrx.kernels.compile_decode switches to where it measures faster) or, for int4 on the CPU, "native"
    (dbrx.native's C kernel for up to NATIVE_ROWS rows, each reading the matrix, dequantise+matmul for more)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype,
                 kernel: str | None = None):
        super().__init__()
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        self.E, self.O = codes.shape[:2]
        self.I = codes.shape[2] * (2 if bits == 4 else 1)
        # own, aligned copies: a tensor read from a safetensors file may start at any byte, and torch's packed
        # kernels crash on weights that are not aligned
        self.register_buffer("q", codes.clone(memory_format=torch.contiguous_format))
        self.register_buffer("scale" if bits == 8 else "sz", scales.clone(memory_format=torch.contiguous_format))
        self.kernel, self.compute_dtype = None, dtype
        self.use_kernel(kernel)

    @property
    def scales(self) -> torch.Tensor:
        return self.scale if self.bits == 8 else self.sz

    def use_kernel(self, kernel: str | None, compute_dtype: torch.dtype | None = None) -> None:
        """Switch to `kernel` (None: the faster of the eager ones, measured), with activations in `compute_dtype`
        (default: the weights' dtype), making or freeing what it reads."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(k for k in KERNELS if k)}, got {kernel!r}")
        if kernel == "compiled" and not self.compiles():
            raise ValueError(f"the compiled int4 kernel takes even group sizes, not {self.group_size}")
        if kernel == "native" and not self.native():
            raise ValueError(f"the native kernel takes int4 codes on the CPU in even groups, where it can be built: "
                             f"int{self.bits}, group {self.group_size}, {self.q.device}")
        self.kernel, self.compute_dtype = (kernel, compute_dtype or self.dtype) if kernel else self._choose_kernel()
        for name in ("kernel_scales", "packed_q"):
            self._buffers.pop(name, None)
        if self.kernel == "packed":  # what the packed kernel reads: scales in its dtype, int4 codes in its layout
            self.register_buffer("kernel_scales", self.scales.to(self.compute_dtype, copy=True), persistent=False)
            if self.bits == 4:  # per matrix (the layout tiles rows by 64)
                self.register_buffer("packed_q", torch.stack([torch._convert_weight_to_int4pack_for_cpu(
                    self.codes(e).to(torch.int32), 2) for e in range(self.E)]), persistent=False)
        if self.kernel == "native":  # each row's (scale, zero - 8 scale) pairs side by side, fp32
            from dbrx import native

            self.register_buffer("kernel_scales", native.kernel_scales(self.sz), persistent=False)

    def compiles(self) -> bool:
        """Whether dbrx.kernels' compiled reduction takes these codes."""
        from dbrx.kernels import int4_group_ok

        return self.bits == 8 or int4_group_ok(self.group_size)

    def native(self) -> bool:
        """Whether dbrx.native's C kernel takes these codes here (and could be built)."""
        from dbrx import native

        return self.bits == 4 and native.takes(self.group_size, self.q.device) and native.library() is not None

    @classmethod
    def quantized(cls, w_EOI: torch.Tensor, config: QuantConfig, kernel: str | None = None) -> "QuantWeights":
        # int4 groups run along the input; where group_size does not divide it, the largest divisor below it
        group = int4_group(w_EOI.shape[-1], config.group_size)
        if config.bits == 8:
            codes, scales = quantize_int8(w_EOI)
        else:
            if w_EOI.shape[-1] % 2:
                raise ValueError(f"int4 keeps two codes per byte: the input size must be even, not {w_EOI.shape[-1]}")
            codes, scales = quantize_int4(w_EOI, group)
            codes = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
        return cls(codes, scales, config.bits, group, w_EOI.dtype, kernel)

    def stored(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors: int8 codes and scales, or int4 codes two per byte (the even input column in
        the low nibble) with scales and zero points."""
        if self.bits == 8:
            return {"q": self.q, "scale": self.scale}
        return {"q4": self.q, "sz": self.sz}

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], bits: int, group_size: int, dtype: torch.dtype,
                    kernel: str | None = None) -> "QuantWeights":
        if bits == 8:
            return cls(tensors["q"], tensors["scale"].to(dtype), 8, group_size, dtype, kernel)
        packed, sz = tensors["q4"], tensors["sz"]
        group = packed.shape[-1] * 2 // sz.shape[1]  # the group this matrix was quantised with (see `quantized`)
        return cls(packed, sz.to(dtype), 4, group, dtype, kernel)

    def codes(self, e: int) -> torch.Tensor:
        """Matrix e's codes, one per element [O, I] (int8, or uint8 0..15)."""
        if self.bits == 8:
            return self.q[e]
        return torch.stack([self.q[e] & 15, self.q[e] >> 4], dim=-1).view(self.O, self.I)

    def dequantized(self, e: int) -> torch.Tensor:
        """W_e [O, I] in the model's dtype (the fallback's product, and what tests compare with)."""
        if self.bits == 8:
            return self.q[e].to(self.dtype) * self.scale[e][:, None]
        scale, zero = self.sz[e, ..., 0].t(), self.sz[e, ..., 1].t()  # [O, I/g]
        q = self.codes(e).view(self.O, -1, self.group_size).to(self.dtype)
        return ((q - 8) * scale[..., None] + zero[..., None]).view(self.O, self.I)

    def describe(self) -> str:
        if self.kernel == "compiled":
            return "compiled one-row reduction (dequantise + matmul for several rows)"
        if self.kernel == "native":
            from dbrx import native

            return f"C int4 kernel, {native.activations()} activations (dequantise + matmul past {NATIVE_ROWS} rows)"
        return "dequantise + matmul" if self.kernel == "dequantize" else \
            f"torch's packed int{self.bits} kernel, {str(self.compute_dtype).removeprefix('torch.')} activations"

    def mm(self, x_NI: torch.Tensor, e: int = 0) -> torch.Tensor:
        if self.kernel == "compiled" and x_NI.shape[0] == 1:
            from dbrx.kernels import compiled

            idx = torch.tensor([e], device=x_NI.device)
            return compiled("rows")(x_NI, self.q, self.scales, f"int{self.bits}", self.group_size, idx).to(self.dtype)
        if self.kernel == "native" and x_NI.shape[0] <= NATIVE_ROWS:
            from dbrx import native

            idx = torch.full((x_NI.shape[0],), e, dtype=torch.int64)
            return native.int4_rows(x_NI, self.q, self.kernel_scales, self.group_size, idx).to(self.dtype)
        if self.kernel in ("dequantize", "compiled", "native"):
            return F.linear(x_NI.to(self.dtype), self.dequantized(e))
        x_NI = x_NI.to(self.compute_dtype)
        if self.bits == 8:
            y = torch._weight_int8pack_mm(x_NI, self.q[e], self.kernel_scales[e])
        else:
            y = torch._weight_int4pack_mm_for_cpu(x_NI, self.packed_q[e], self.group_size, self.kernel_scales[e])
        return y.to(self.dtype)

    def _choose_kernel(self) -> tuple[str, torch.dtype]:
        """(kernel, the dtype its activations take): the fastest on one row of dequantise-then-matmul in the
        weights' dtype and, where torch's packed CPU kernel exists and takes this shape, that kernel in the
        weights' dtype and in bf16 (it is made for bf16: on the Xeons measured, fp32 activations made it 4-15x
        slower, bf16 ones 1.7-5x faster than an fp32 product), and for int4 dbrx.native's kernel where it builds.
        Measured once per bits, dtype, shape in a process."""
        key = (self.bits, self.dtype, self.O, self.I, self.group_size, str(self.q.device))
        if key in _KERNEL:
            return _KERNEL[key]
        x = torch.randn(1, self.I, dtype=self.dtype, device=self.q.device)
        options = {("dequantize", self.dtype): lambda: F.linear(x, self.dequantized(0))}
        op = "_weight_int8pack_mm" if self.bits == 8 else "_weight_int4pack_mm_for_cpu"
        if self.q.device.type == "cpu" and hasattr(torch, op) and (self.bits == 8 or self.O % 16 == 0):
            w = self.q[0] if self.bits == 8 else torch._convert_weight_to_int4pack_for_cpu(
                self.codes(0).to(torch.int32), 2)
            for dtype in dict.fromkeys((self.dtype, torch.bfloat16)):
                xd, sd = x.to(dtype), self.scales[0].to(dtype)
                options["packed", dtype] = (
                    (lambda xd=xd, sd=sd: torch._weight_int8pack_mm(xd, w, sd)) if self.bits == 8 else
                    (lambda xd=xd, sd=sd: torch._weight_int4pack_mm_for_cpu(xd, w, self.group_size, sd)))
        if self.native():
            from dbrx import native

            q, sc, idx = self.q[:1], native.kernel_scales(self.sz[:1]), torch.tensor([0])
            options["native", torch.float32] = lambda: native.int4_rows(x, q, sc, self.group_size, idx)
        times = {}
        for option, fn in options.items():
            try:
                times[option] = timeit(fn, reps=5, best=True)
            except (RuntimeError, TypeError):  # a build or shape the private kernel does not take
                continue
        _KERNEL[key] = min(times, key=times.get)
        return _KERNEL[key]


class QuantLinear(nn.Module):
    """nn.Linear (no bias) with quantised weights, for inference."""

    def __init__(self, weights: QuantWeights):
        super().__init__()
        self.weights = weights
        self.in_features, self.out_features = weights.I, weights.O

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig, kernel: str | None = None) -> "QuantLinear":
        return cls(QuantWeights.quantized(linear.weight.detach().contiguous()[None], config, kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights.mm(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)


class QuantExperts(nn.Module):
    """DbrxExperts with quantised w1, v1 (as [E, F, D]) and w2 (transposed per expert, [E, D, F]); each chosen
    expert runs on exactly the tokens routed to it. Inference only."""

    def __init__(self, w1: QuantWeights, v1: QuantWeights, w2: QuantWeights, act):
        super().__init__()
        self.w1, self.v1, self.w2, self.act = w1, v1, w2, act

    @classmethod
    def from_experts(cls, experts: nn.Module, config: QuantConfig, kernel: str | None = None) -> "QuantExperts":
        mlp = experts.mlp
        E, Fh, D = mlp.num_experts, mlp.ffn_hidden_size, mlp.d_model
        with torch.no_grad():
            w1 = QuantWeights.quantized(mlp.w1.detach().view(E, Fh, D), config, kernel)
            v1 = QuantWeights.quantized(mlp.v1.detach().view(E, Fh, D), config, kernel)
            w2 = QuantWeights.quantized(mlp.w2.detach().view(E, Fh, D).transpose(1, 2).contiguous(), config, kernel)
        return cls(w1, v1, w2, mlp.act)

    def matrices(self) -> tuple[QuantWeights, QuantWeights, QuantWeights]:
        return self.w1, self.v1, self.w2

    def compiles(self) -> bool:
        return all(w.compiles() for w in self.matrices())

    def _expert(self, x_nD: torch.Tensor, e: int) -> torch.Tensor:
        return self.w2.mm(self.act(self.w1.mm(x_nD, e)) * self.v1.mm(x_nD, e), e)

    def forward(self, x_ND, weights_NK, experts_NK, impl: str = "grouped") -> torch.Tensor:
        if torch.is_grad_enabled() and x_ND.requires_grad:
            raise RuntimeError("quantised experts are for inference; train the unquantised model")
        N, K = experts_NK.shape
        if N == 1 and all(w.kernel == "native" for w in self.matrices()) and self.act in _ACT_NAMES:
            from dbrx import native  # one call: both GLU products and w2 of the K experts

            w1, v1, w2 = ((w.q, w.kernel_scales, w.group_size) for w in self.matrices())
            return native.int4_experts(x_ND, weights_NK[0], experts_NK[0], w1, v1, w2, _ACT_NAMES[self.act])
        if N == 1 and all(w.kernel == "compiled" for w in self.matrices()):
            from dbrx.kernels import compiled  # one call: the K experts gathered inside fused reductions

            w1, v1, w2 = ((w.q, w.scales) for w in self.matrices())
            return compiled("experts_glu")(x_ND, weights_NK[0], experts_NK[0], w1, v1, w2, self.act,
                                           f"int{self.w1.bits}", self.w1.group_size, self.w2.group_size)
        if N == 1:
            y_1D = None
            for e, w in zip(experts_NK[0].tolist(), weights_NK[0].tolist()):
                out = self._expert(x_ND, e).to(x_ND.dtype) * w
                y_1D = out if y_1D is None else y_1D + out
            return y_1D
        order_S = experts_NK.reshape(-1).argsort(stable=True)
        counts = torch.bincount(experts_NK.reshape(-1), minlength=self.w1.E).tolist()
        token_S = order_S // K
        x_SD = x_ND.index_select(0, token_S)
        y_SD = torch.cat([self._expert(x_nD, e) for e, x_nD in enumerate(x_SD.split(counts)) if counts[e]])
        y_SD = y_SD.to(x_ND.dtype) * weights_NK.reshape(-1, 1).index_select(0, order_S)
        return add_by_token(y_SD, order_S, experts_NK, torch.zeros_like(x_ND))


def quantize(model, config: QuantConfig) -> dict[str, str]:
    """Quantise the model's experts (and `include`) in place, block by block (each block's float weights are freed
    as it goes); the model is then for inference only. Returns the kernel chosen for each kind of matrix."""
    chosen: dict[str, str] = {}
    for block in model.transformer.blocks:
        block.ffn.experts = QuantExperts.from_experts(block.ffn.experts, config)
        chosen["experts"] = block.ffn.experts.w1.describe()
        if "attention" in config.include:
            attn = block.norm_attn_norm.attn
            attn.Wqkv, attn.out_proj = QuantLinear.from_linear(attn.Wqkv, config), QuantLinear.from_linear(
                attn.out_proj, config)
            chosen["attention"] = attn.Wqkv.weights.describe()
    if "lm_head" in config.include:
        model.lm_head = QuantLinear.from_linear(model.lm_head, config)
        chosen["lm_head"] = model.lm_head.weights.describe()
    model.quant_config = config
    return chosen


# ---- quantised checkpoints -------------------------------------------------------------------------------------
METHOD = "dbrx-weight-only"


def _quantised_modules(config, qcfg: QuantConfig, block: int) -> dict[str, str]:
    """Module name -> kind for one block's quantised modules."""
    prefix = f"transformer.blocks.{block}"
    out = {f"{prefix}.ffn.experts": "experts"}
    if "attention" in qcfg.include:
        out.update({f"{prefix}.norm_attn_norm.attn.Wqkv": "linear", f"{prefix}.norm_attn_norm.attn.out_proj": "linear"})
    return out


def write_quantized(src, out, qcfg: QuantConfig, log=print) -> None:
    """`dbrx quantize`: read the checkpoint at `src` one block at a time, quantise it, and write a shard per block
    (plus one for the embedding, final norm and head) with an index, config.json carrying `quantization_config`,
    and the tokenizer files; the directory appears complete or not at all."""
    import json
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import save_file

    from dbrx.checkpoint import checkpoint_dtype, dtype_name, read_header
    from dbrx.config import DbrxConfig

    src, out = Path(src), Path(out)
    config = DbrxConfig.from_pretrained(src)
    if config.quantization_config is not None:
        raise ValueError(f"{src} is already quantised ({config.quantization_config})")
    E, Fh, D = config.num_experts, config.ffn_config.ffn_hidden_size, config.d_model
    header = read_header(src)
    groups = [[n for n in header if not n.startswith("transformer.blocks.")]]
    groups += [[n for n in header if n.startswith(f"transformer.blocks.{i}.")] for i in range(config.n_layers)]
    if out.exists():
        raise FileExistsError(f"{out} exists; give a new directory for the quantised checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        weight_map = {}
        for index, names in enumerate(groups):
            tensors = {}
            for name in names:
                with safe_open(header[name][2], framework="pt") as f:
                    tensors[name] = f.get_tensor(name)
            stored: dict[str, torch.Tensor] = {}
            for name, t in tensors.items():
                if ".ffn.experts.mlp." in name:
                    module, kind = name.rsplit(".mlp.", 1)
                    w = t.view(E, Fh, D) if kind != "w2" else t.view(E, Fh, D).transpose(1, 2).contiguous()
                    q = QuantWeights.quantized(w, qcfg, kernel="dequantize")
                    stored.update({f"{module}.{kind}.{k}": v for k, v in q.stored().items()})
                elif (("attention" in qcfg.include and (".attn.Wqkv." in name or ".attn.out_proj." in name))
                      or ("lm_head" in qcfg.include and name == "lm_head.weight")):
                    q = QuantWeights.quantized(t.contiguous()[None], qcfg, kernel="dequantize")
                    stored.update({f"{name.rsplit('.', 1)[0]}.weights.{k}": v for k, v in q.stored().items()})
                else:
                    stored[name] = t
            shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in stored.items()}, tmp / shard, metadata={"format": "pt"})
            weight_map.update({k: shard for k in stored})
            log(f"  {shard}: {'embedding, final norm, head' if index == 0 else f'block {index - 1}'}")
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=2) + "\n")
        qdict = {"quant_method": METHOD, "bits": qcfg.bits, "group_size": qcfg.group_size,
                 "include": list(qcfg.include)}
        stored = config.dtype or dtype_name(checkpoint_dtype(header) or torch.float32)
        config.replace(quantization_config=qdict, dtype=stored).save_pretrained(tmp)
        for file in src.iterdir():
            if file.name.startswith(("tokenizer", "special_tokens", "generation_config")) and file.is_file():
                shutil.copy2(file, tmp / file.name)
        umask = os.umask(0)
        os.umask(umask)
        for file in tmp.iterdir():  # mkdtemp makes everything private; the result gets the usual modes
            os.chmod(file, 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_quantized(model, tensors: dict[str, torch.Tensor], dtype: torch.dtype, target) -> None:
    """Give a meta-built model the quantised modules its `quantization_config` names, from a checkpoint's
    tensors (popped from `tensors`, each sent to target(its module's name)); what remains is the float part."""
    q = model.config.quantization_config
    qcfg = QuantConfig(q["bits"], q["group_size"], tuple(q.get("include", ())))

    def weights(prefix: str) -> QuantWeights:
        keys = ("q", "scale") if qcfg.bits == 8 else ("q4", "sz")
        missing = [f"{prefix}.{k}" for k in keys if f"{prefix}.{k}" not in tensors]
        if missing:
            raise ValueError(f"the quantised checkpoint lacks {', '.join(missing)}")
        return QuantWeights.from_stored({k: tensors.pop(f"{prefix}.{k}").to(target(prefix)) for k in keys},
                                        qcfg.bits, qcfg.group_size, dtype)

    for i, block in enumerate(model.transformer.blocks):
        base = f"transformer.blocks.{i}"
        block.ffn.experts = QuantExperts(weights(f"{base}.ffn.experts.w1"), weights(f"{base}.ffn.experts.v1"),
                                         weights(f"{base}.ffn.experts.w2"), block.ffn.experts.mlp.act)
        if "attention" in qcfg.include:
            attn = block.norm_attn_norm.attn
            attn.Wqkv = QuantLinear(weights(f"{base}.norm_attn_norm.attn.Wqkv.weights"))
            attn.out_proj = QuantLinear(weights(f"{base}.norm_attn_norm.attn.out_proj.weights"))
    if "lm_head" in qcfg.include:
        model.lm_head = QuantLinear(weights("lm_head.weights"))
    model.quant_config = qcfg
