"""Batch-1 decoding: dbrx.generate against transformers' generate on the same weights, and against the
machine's memory-bandwidth ceiling (active weight bytes per token / bandwidth of a large matrix-vector product).

    .venv/bin/python bench/generate.py [--new-tokens 128] [--dtypes float32,bfloat16,auto] [--device cpu]
        [--quant int8,int4,int8+head,int4+head]

With --quant, each weight-only quantisation (dbrx.quant: the experts, `+head` the output head too) is measured the
same way on the fp32 checkpoint, against its own ceiling (the bytes a step reads as stored) and against the best
unquantised decode of the run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.generate import generate
from dbrx.perf import choose_inference_dtype, machine_profile, matvec_bandwidth


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


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dbrx-small")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--dtypes", default="float32,bfloat16,auto")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (ours and the ceiling only)")
    ap.add_argument("--quant", default="", help="also measure these: int8, int4, int8+head, int4+head")
    args = ap.parse_args()
    import transformers

    print(machine_profile(args.device).describe(), flush=True)
    cfg = DbrxConfig.from_name(args.preset)
    torch.manual_seed(0)
    print(f"config {args.preset}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.kv_n_heads} heads, "
          f"{cfg.num_experts} experts top {cfg.top_k}, width {cfg.ffn_config.ffn_hidden_size}, vocab {cfg.vocab_size}; "
          f"device {args.device}, transformers {transformers.__version__}")
    prompt = torch.randint(0, 100000, (args.prompt_tokens,)).tolist()
    n = args.new_tokens
    speeds = {}
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
            bw = matvec_bandwidth(torch.float32, args.device)
            ours = DbrxForCausalLM.from_pretrained(tmp, dtype=dtype, device=args.device)
            generate(ours, prompt, 2)  # warm-up
            t_ours = best_of(lambda: generate(ours, prompt, n), args.reps)
            t_prefill = best_of(lambda: generate(ours, prompt, 1), args.reps)
            decode_tps = (n - 1) / (t_ours - t_prefill)
            speeds[dtype_name] = decode_tps
            ceiling = bw / active_weight_bytes(ours, dtype)
            line = (f"[{dtype_name}] ours: {n / t_ours:7.2f} tok/s end to end, decode {decode_tps:7.2f} tok/s = "
                    f"{decode_tps / ceiling:5.1%} of the bandwidth ceiling {ceiling:6.2f} tok/s "
                    f"(fp32 matvec {bw / 1e9:.2f} GB/s, {active_weight_bytes(ours, dtype) / 2**20:.0f} MiB/token)")
            if not args.no_hf:
                hf = transformers.DbrxForCausalLM.from_pretrained(tmp, dtype=dtype).to(args.device).eval()
                ids = torch.tensor([prompt], device=args.device)

                def hf_generate(k=n):
                    return hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)

                ref = hf_generate()[0, len(prompt):].tolist()
                t_hf = best_of(hf_generate, args.reps)
                same = ref == generate(ours, prompt, n)
                line += (f"\n[{dtype_name}] transformers: {n / t_hf:7.2f} tok/s end to end; "
                         f"ours/transformers = {t_hf / t_ours:.2f}x; greedy tokens identical: {same}")
                del hf
            print(line, flush=True)
        from dbrx.quant import QuantConfig, quantize

        best = max(speeds, key=speeds.get) if speeds else None
        for spec in [q for q in args.quant.split(",") if q]:
            bits, include = int(spec[3]), ("lm_head",) if spec.endswith("+head") else ()
            model = DbrxForCausalLM.from_pretrained(tmp, dtype=torch.float32, device=args.device)
            ceiling = matvec_bandwidth(torch.float32, args.device) / quantized_active_bytes(model, bits, include)
            chosen = quantize(model, QuantConfig(bits, 128, include))
            generate(model, prompt, 2)
            t_all = best_of(lambda: generate(model, prompt, n), args.reps)
            tps = (n - 1) / (t_all - best_of(lambda: generate(model, prompt, 1), args.reps))
            speeds[spec] = tps
            vs = f"; {tps / speeds[best]:.2f}x the best unquantised ({best}, {speeds[best]:.2f})" if best else ""
            vs += f"; {tps / speeds['int8']:.2f}x int8" if spec == "int4" and "int8" in speeds else ""
            vs += f"; {tps / speeds['int8+head']:.2f}x int8+head" if spec == "int4+head" and "int8+head" in speeds else ""
            print(f"[{spec}] ours: decode {tps:7.2f} tok/s = {tps / ceiling:5.1%} of its ceiling {ceiling:6.2f} tok/s"
                  f"{vs} ({'; '.join(f'{k}: {v}' for k, v in chosen.items())})", flush=True)
            del model
    auto = next((k for k in speeds if k.startswith("auto=")), None)
    if auto:
        fastest = max((k for k in speeds if k != auto and not k.startswith("int")), key=speeds.get, default=None)
        if fastest:
            print(f"--dtype auto chose {auto.split('=')[1]}; the fastest decode measured here: {fastest} "
                  f"({speeds[fastest]:.2f} tok/s; auto {speeds[auto]:.2f})")


if __name__ == "__main__":
    main()
