"""One MoE layer: dbrx's DbrxFFN against transformers' DbrxFFN on the same weights, and against a dense GLU
layer with the same active FLOPs (hidden width top_k * expert width), in the same run.

    .venv/bin/python bench/moe.py [--preset dbrx-small] [--tokens 4096] [--dtype float32]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dbrx import DbrxConfig
from dbrx.moe import DbrxFFN
from dbrx.perf import bf16_is_slow, machine_profile, timeit


def hf_ffn(cfg: DbrxConfig, ours: DbrxFFN):
    import transformers
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN as HFDbrxFFN

    a, f = cfg.attn_config, cfg.ffn_config
    hf_cfg = transformers.DbrxConfig(
        d_model=cfg.d_model, n_heads=cfg.n_heads, n_layers=1, vocab_size=cfg.vocab_size,
        attn_config={"kv_n_heads": a.kv_n_heads, "clip_qkv": a.clip_qkv, "rope_theta": a.rope_theta},
        ffn_config={"ffn_hidden_size": f.ffn_hidden_size, "moe_num_experts": f.moe_num_experts,
                    "moe_top_k": f.moe_top_k, "moe_loss_weight": f.moe_loss_weight},
    )
    hf = HFDbrxFFN(hf_cfg)
    hf.load_state_dict(ours.state_dict())
    return hf.to(next(ours.parameters()).dtype)


class DenseGLU(torch.nn.Module):
    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(width, d_model) * 0.02)
        self.v1 = torch.nn.Parameter(torch.randn(width, d_model) * 0.02)
        self.w2 = torch.nn.Parameter(torch.randn(width, d_model) * 0.02)

    def forward(self, x):
        return (F.silu(x @ self.w1.T) * (x @ self.v1.T)) @ self.w2


def fwd_bwd(module, x, grad):
    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        out = module(x)
        (out[0] if isinstance(out, tuple) else out).backward(grad)
    return step


def forward_only(module, x):
    def step():
        with torch.inference_mode():
            module(x)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dbrx-small")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    print(machine_profile().describe(), flush=True)
    dtype = getattr(torch, args.dtype)
    if bf16_is_slow("cpu", dtype) and args.tokens > 256:
        # transformers computes in the emulated dtype: 4096 tokens would take it half an hour.
        print(f"{args.dtype} matmul is emulated here: --tokens {args.tokens} -> 256, --reps {args.reps} -> 3")
        args.tokens, args.reps = 256, min(args.reps, 3)
    cfg = DbrxConfig.from_name(args.preset)
    f = cfg.ffn_config
    torch.manual_seed(0)
    ours = DbrxFFN(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    ours = ours.to(dtype)
    hf = hf_ffn(cfg, ours)
    dense = DenseGLU(cfg.d_model, f.moe_top_k * f.ffn_hidden_size).to(dtype)
    print(f"{args.preset}: d_model {cfg.d_model}, {f.moe_num_experts} experts x width {f.ffn_hidden_size}, top "
          f"{f.moe_top_k}; dense GLU width {f.moe_top_k * f.ffn_hidden_size}; {args.dtype}, "
          f"{torch.get_num_threads()} threads")

    x = torch.randn(1, args.tokens, cfg.d_model, dtype=dtype, requires_grad=True)
    grad = torch.randn(1, args.tokens, cfg.d_model, dtype=dtype)
    t_ours = timeit(fwd_bwd(ours, x, grad), warmup=2, reps=args.reps)
    t_hf = timeit(fwd_bwd(hf, x, grad), warmup=2, reps=args.reps)
    t_dense = timeit(fwd_bwd(dense, x, grad), warmup=2, reps=args.reps)
    flops = 3 * 2 * 3 * args.tokens * f.moe_top_k * f.ffn_hidden_size * cfg.d_model  # fwd + 2x bwd
    print(f"forward+backward, {args.tokens} tokens: ours {t_ours * 1e3:.0f} ms ({flops / t_ours / 1e9:.0f} GFLOP/s), "
          f"transformers {t_hf * 1e3:.0f} ms, dense GLU {t_dense * 1e3:.0f} ms -> "
          f"transformers/ours {t_hf / t_ours:.2f}x, ours/dense {t_ours / t_dense:.2f}x")

    for n in (1, 2, 4, 8):
        xs = torch.randn(1, n, cfg.d_model, dtype=dtype)
        t_o = timeit(forward_only(ours, xs), warmup=5, reps=101)
        t_h = timeit(forward_only(hf, xs), warmup=5, reps=101)
        print(f"forward, {n} token(s): ours {t_o * 1e6:.0f} us, transformers {t_h * 1e6:.0f} us -> "
              f"transformers/ours {t_h / t_o:.2f}x")


if __name__ == "__main__":
    main()
