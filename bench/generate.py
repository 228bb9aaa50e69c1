"""Batch-1 decoding: dbrx.generate against transformers' generate on the same weights, and against the
machine's memory-bandwidth ceiling (active weight bytes per token / bandwidth of a large matrix-vector product).

    .venv/bin/python bench/generate.py [--new-tokens 128] [--dtypes float32,bfloat16,auto] [--device cpu]
        [--quant int8,int4,int8+head,int4+head+attention]

With --quant, each weight-only quantisation (dbrx.quant: the experts; `+head`, `+attention` those too) is measured
the same way on the fp32 checkpoint, against its own ceiling (the bytes a step reads as stored) and against the best
unquantised decode of the run. With --compile, each is measured again after dbrx.kernels.compile_decode (compiled
one-row kernels where they measured faster), as `<name>+compiled`.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.generate import generate
from dbrx.kernels import compile_decode
from dbrx.quant import QuantConfig, quantize
from dbrx.perf import choose_inference_dtype, machine_profile, timeit


def active_weight_bytes(model: DbrxForCausalLM, dtype: torch.dtype) -> int:
    """Weights one decode step reads: active parameters, with one embedding row instead of the whole table."""
    cfg = model.config
    return (model.num_parameters(active=True) - cfg.vocab_size * cfg.d_model + cfg.d_model) * dtype.itemsize


def quantized_active_bytes(model: DbrxForCausalLM, bits: int, include: tuple[str, ...]) -> int:
    """What a decode step reads from a quantised model: top_k of the experts' codes and scales, the rest as stored,
    one embedding row."""
    from dbrx.placement import tensor_bytes

    cfg, total = model.config, 0
    for name, p in model.state_dict().items():
        dtype = p.dtype
        size = tensor_bytes(name, p.shape, dtype, f"int{bits}", 128, include, cfg.num_experts)
        if ".ffn.experts." in name:
            size = size * cfg.top_k // cfg.num_experts
        elif name == "transformer.wte.weight":
            size = cfg.d_model * dtype.itemsize
        total += size
    return total


def once(fn) -> float:
    """Seconds of one call: each rep of the run times every configuration once, in turns."""
    return timeit(fn, warmup=0, reps=1)


def bandwidth_now(device: str) -> float:
    """Bytes/s of the faster fp32 matrix-vector layout, measured afresh (not the process' cached figure)."""
    from dbrx.perf import matvec_rate

    return 4 * max(matvec_rate.__wrapped__(torch.float32, device, cm) for cm in (False, True))


def decode_speed(model, prompt, n: int) -> float:
    """Decode tok/s: the n - 1 tokens after the first, whose time is the prefill's."""
    return (n - 1) / (once(lambda: generate(model, prompt, n)) - once(lambda: generate(model, prompt, 1)))


def describe(chosen: dict[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in chosen.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dbrx-small")
    ap.add_argument("--d-model", type=int, help="change the preset's d_model (issue 15's 6-layer config: 384)")
    ap.add_argument("--n-layers", type=int, help="change the preset's number of blocks (6)")
    ap.add_argument("--ffn-hidden-size", type=int, help="change the preset's expert width (768)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--dtypes", default="float32,bfloat16,auto")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (ours and the ceiling only)")
    ap.add_argument("--quant", default="", help="also measure these: int8, int4, each with +head and/or "
                    "+attention (also quantised)")
    ap.add_argument("--compile", action="store_true", help="also measure each with dbrx.kernels.compile_decode")
    args = ap.parse_args()
    import transformers

    print(machine_profile(args.device).describe(), flush=True)
    cfg = DbrxConfig.from_name(args.preset)
    changes = {k: v for k, v in (("d_model", args.d_model), ("n_layers", args.n_layers)) if v}
    if args.ffn_hidden_size:
        changes["ffn_config"] = {"ffn_hidden_size": args.ffn_hidden_size}
    cfg = cfg.replace(**changes)
    torch.manual_seed(0)
    print(f"config {args.preset}{' (changed)' if changes else ''}: d_model {cfg.d_model}, {cfg.n_layers} layers, "
          f"{cfg.n_heads}/{cfg.kv_n_heads} heads, {cfg.num_experts} experts top {cfg.top_k}, width "
          f"{cfg.ffn_config.ffn_hidden_size}, vocab {cfg.vocab_size}; device {args.device}, transformers "
          f"{transformers.__version__}; every configuration measured in turns, rep by rep, with the bandwidth",
          flush=True)
    prompt = torch.randint(0, 100000, (args.prompt_tokens,)).tolist()
    n = args.new_tokens
    runs = {}  # label -> (decode function, bytes a step reads, note)
    with tempfile.TemporaryDirectory() as tmp:
        model = DbrxForCausalLM(cfg)
        model.save_pretrained(tmp)
        n_params = model.num_parameters()
        del model
        for dtype_name in args.dtypes.split(","):
            if dtype_name == "auto":  # what `dbrx generate --dtype auto` would choose here
                dtype = choose_inference_dtype("auto", args.device, torch.float32, n_params, None)
                dtype_name = f"auto={str(dtype).removeprefix('torch.')}"
            else:
                dtype = getattr(torch, dtype_name)
            for compiled in (False, True) if args.compile else (False,):
                ours = DbrxForCausalLM.from_pretrained(tmp, dtype=dtype, device=args.device)
                note = describe(compile_decode(ours, log=lambda _: None)) if compiled else ""
                generate(ours, prompt, 2)  # warm-up
                runs[dtype_name + "+compiled" * compiled] = (
                    lambda m=ours: decode_speed(m, prompt, n), active_weight_bytes(ours, dtype), note)
            if not args.no_hf:
                hf = transformers.DbrxForCausalLM.from_pretrained(tmp, dtype=dtype).to(args.device).eval()
                ids = torch.tensor([prompt], device=args.device)

                def hf_generate(k, hf=hf, ids=ids):
                    return hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)

                same = hf_generate(n)[0, len(prompt):].tolist() == generate(ours, prompt, n)
                runs[f"{dtype_name} transformers"] = (
                    lambda f=hf_generate: (n - 1) / (once(lambda: f(n)) - once(lambda: f(1))),
                    active_weight_bytes(ours, dtype), f"greedy tokens identical to ours: {same}")
        for spec in [q for q in args.quant.split(",") if q]:
            bits, parts = int(spec[3]), spec.split("+")[1:]
            if spec[:4] not in ("int8", "int4") or any(p not in ("head", "attention") for p in parts):
                raise SystemExit(f"--quant {spec}: int8 or int4, then +head and/or +attention")
            include = tuple("lm_head" if p == "head" else p for p in parts)
            for compiled in (False, True) if args.compile else (False,):
                model = DbrxForCausalLM.from_pretrained(tmp, dtype=torch.float32, device=args.device)
                size = quantized_active_bytes(model, bits, include)
                chosen = quantize(model, QuantConfig(bits, 128, include))
                if compiled:
                    chosen = compile_decode(model, log=lambda _: None)
                generate(model, prompt, 2)
                runs[spec + "+compiled" * compiled] = (lambda m=model: decode_speed(m, prompt, n), size,
                                                       describe(chosen))
        speeds = {label: 0.0 for label in runs}
        bw = 0.0
        for _ in range(args.reps):
            bw = max(bw, bandwidth_now(args.device))
            for label, (fn, _, _) in runs.items():
                speeds[label] = max(speeds[label], fn())
    print(f"memory bandwidth (fp32 matrix-vector, best of the reps): {bw / 1e9:.2f} GB/s")
    unquantised = [k for k in speeds if not k.startswith("int") and "transformers" not in k]
    best = max(unquantised, key=speeds.get, default=None)
    for label, (_, size, note) in runs.items():
        tps, ceiling = speeds[label], bw / size
        line = (f"[{label}] decode {tps:7.2f} tok/s = {tps / ceiling:5.1%} of its ceiling {ceiling:6.2f} tok/s "
                f"({size / 2**20:.0f} MiB/token)")
        base = label.split("+compiled")[0].split(" ")[0]
        if label.endswith("+compiled") and base in speeds:
            line += f"; {tps / speeds[base]:.2f}x eager"
        if label.endswith("transformers"):
            line += f"; ours/transformers = {speeds[base] / tps:.2f}x"
        if label.startswith("int") and best:
            line += f"; {tps / speeds[best]:.2f}x the best unquantised ({best}, {speeds[best]:.2f})"
        if label.startswith("int4") and "int8" + label[4:] in speeds:
            line += f"; {tps / speeds['int8' + label[4:]]:.2f}x int8{label[4:]}"
        print(line + (f" [{note}]" if note else ""), flush=True)
    auto = next((k for k in speeds if k.startswith("auto=") and "+" not in k and " " not in k), None)
    if auto:
        fastest = max((k for k in unquantised if not k.startswith("auto=")), key=speeds.get, default=None)
        if fastest:
            print(f"--dtype auto chose {auto.split('=')[1]}; the fastest decode measured here: {fastest} "
                  f"({speeds[fastest]:.2f} tok/s; auto {speeds[auto]:.2f})")


if __name__ == "__main__":
    main()
