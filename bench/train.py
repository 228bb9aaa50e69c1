"""A full training step (forward, backward, AdamW) in tokens/s: dbrx against transformers' DbrxForCausalLM on
the same weights, batch and dtype, each in a fresh process (so peak memory is its own), plus MFU on
active-parameter FLOPs against the fp32/bf16 matmul peak measured in the same run.

    .venv/bin/python bench/train.py [--preset dbrx-small] [--batch 4] [--seq 512] [--precisions fp32,amp_bf16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap

STEP = textwrap.dedent("""
    import json, sys, time
    import torch
    impl, path, precision, batch, seq, steps = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])

    def hwm():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024

    torch.manual_seed(0)
    amp = precision == "amp_bf16"
    ids = torch.randint(0, 100000, (batch, seq))
    base = hwm()
    if impl == "dbrx":
        from dbrx import DbrxForCausalLM
        from dbrx.moe import load_balancing_loss
        from dbrx.perf import keep_freed_memory
        from dbrx.train.loss import chunked_cross_entropy_sum
        from dbrx.train.trainer import build_optimizer, training_layout
        keep_freed_memory()  # as the trainer does
        model = training_layout(DbrxForCausalLM.from_pretrained(path, dtype=torch.float32)).train()
        opt = build_optimizer(model, {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0})
        f = model.config.ffn_config

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                h, router_logits = model.hidden_states(ids)
                loss = chunked_cross_entropy_sum(h, model.lm_head.weight, ids,
                                                 compute_dtype=torch.bfloat16 if amp else torch.float32)
            aux = load_balancing_loss(router_logits, f.moe_num_experts, f.moe_top_k)
            (loss / ids[:, 1:].numel() + f.moe_loss_weight * aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        import transformers
        model = transformers.DbrxForCausalLM.from_pretrained(path, dtype=torch.float32).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = model(ids, labels=ids, output_router_logits=True)  # loss includes moe_loss_weight * aux
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up (optimizer state allocation)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    print(json.dumps({"tokens_per_s": batch * seq / seconds, "peak_bytes": hwm() - base}))
""")


# One training step sharded over torchrun's processes (FSDP2, and EP with --ep): tokens/s of the global batch and
# the share of the step each rank spends communicating (profiler events, waits included).
DIST_STEP = textwrap.dedent("""
    import collections, json, statistics, sys, time
    import torch
    from torch.profiler import profile
    from dbrx import DbrxForCausalLM
    from dbrx.parallel import ParallelConfig, init_distributed, parallelize
    from dbrx.perf import keep_freed_memory
    from dbrx.train.loss import chunked_cross_entropy_sum
    from dbrx.train.trainer import build_optimizer, training_layout
    path, out = sys.argv[1], sys.argv[2]
    batch, seq, steps, ep = map(int, sys.argv[3:7])
    dist = init_distributed("cpu")
    keep_freed_memory()
    torch.manual_seed(0)
    ids = torch.randint(0, 100000, (batch, seq)).chunk(dist.world_size)[dist.rank]
    model = training_layout(DbrxForCausalLM.from_pretrained(path, dtype=torch.float32)).train()
    if dist.enabled:
        parallelize(model, dist, ParallelConfig(dp_shard=dist.world_size, ep=ep), torch.device("cpu"))
    opt = build_optimizer(model, {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0})

    def step():
        h, _ = model.hidden_states(ids)
        loss = chunked_cross_entropy_sum(h, model.lm_head.weight, ids, compute_dtype=torch.float32)
        (loss / (batch * (seq - 1))).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    times = []
    with profile() as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    # Communication: FSDP2's gathers and gradient reductions (their copies in and out, the collectives and the
    # waits on them) and the all-to-alls of expert parallelism, as wall time on this rank's thread; an event inside
    # another one counted already is not counted again.
    def is_comm(name):
        return name.startswith(("FSDP::all_gather", "FSDP::post_backward_reduce", "fsdp::all_gather_copy_in",
                                "c10d::", "_c10d_functional", "gloo", "record_param_comms")) \
            or "all_to_all" in name or "alltoall" in name

    def counted_above(e):
        p = e.cpu_parent
        while p is not None and not is_comm(p.name):
            p = p.cpu_parent
        return p is not None

    # Only the training thread's events: gloo runs each collective on a thread of its own, overlapping the wait
    # that the training thread records for it.
    events = prof.events()
    main = collections.Counter(e.thread for e in events if e.name == "aten::mm").most_common(1)[0][0]
    comm = sum(e.cpu_time_total for e in events
               if e.thread == main and is_comm(e.name) and not counted_above(e)) / 1e6
    row = {"tokens_per_s": batch * seq / statistics.median(times), "comm_share": comm / sum(times)}
    shares = dist.sum_floats(*[row["comm_share"] if r == dist.rank else 0.0 for r in range(dist.world_size)])
    if dist.is_main:
        open(out, "w").write(json.dumps({**row, "comm_shares": shares}))
    if dist.enabled:
        torch.distributed.destroy_process_group()
""")


def run_sharded(path: str, nproc: int, ep: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script, out = f"{tmp}/step.py", f"{tmp}/out.json"
        open(script, "w").write(DIST_STEP)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        done = subprocess.run(launcher + [script, path, out, str(args.batch), str(args.seq), str(args.steps),
                                          str(ep)], capture_output=True, text=True)
        if done.returncode:
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
            return {"error": last}
        return json.loads(open(out).read())


def run(impl: str, path: str, precision: str, args) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, impl, path, precision, str(args.batch), str(args.seq),
                          str(args.steps)], capture_output=True, text=True)
    if out.returncode:
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit code {out.returncode}"
        return {"error": last}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dbrx-small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--precisions", default="fp32,amp_bf16")
    ap.add_argument("--force", action="store_true", help="run amp_bf16 even where bf16 matmul is emulated")
    ap.add_argument("--nproc", type=int, default=1,
                    help="also run the step (fp32) sharded over N torchrun processes on this host, against 1 "
                         "process, and report each rank's share of the step spent in communication")
    ap.add_argument("--ep", type=int, default=1, help="with --nproc: the expert-parallel degree")
    args = ap.parse_args()
    import torch

    from dbrx import DbrxConfig, DbrxForCausalLM
    from dbrx.perf import BF16_WARN_SLOWDOWN, choose_training_precision, machine_profile

    profile = machine_profile()
    print(profile.describe(), flush=True)
    auto = choose_training_precision("auto", "cpu", log=print)
    cfg = DbrxConfig.from_name(args.preset)
    torch.manual_seed(0)
    model = DbrxForCausalLM(cfg)
    active = model.num_parameters(active=True) - cfg.vocab_size * cfg.d_model
    flops_per_token = 6 * active + 12 * cfg.n_layers * cfg.d_model * args.seq
    peak = {"fp32": profile.fp32_flops, "amp_bf16": profile.bf16_flops}
    print(f"{args.preset}: {model.num_parameters():,} parameters, {active:,} active non-embedding; batch "
          f"{args.batch} x {args.seq} tokens; {flops_per_token / 1e6:.0f} MFLOP/token")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        del model
        results = {}
        precisions = [p for p in ("fp32", "amp_bf16") if p in args.precisions.split(",")]
        if "amp_bf16" in precisions and profile.bf16_speedup * BF16_WARN_SLOWDOWN < 1 and not args.force:
            precisions.remove("amp_bf16")
            print(f"amp_bf16 skipped: bf16 matmul is {1 / profile.bf16_speedup:,.0f}x slower than fp32 here "
                  f"(precision auto chooses {auto}); --force runs it anyway")
        if args.nproc > 1:  # same global batch: 1 process, then N (threads split between them)
            import os

            threads = torch.get_num_threads()
            for nproc in (1, args.nproc):
                os.environ["OMP_NUM_THREADS"] = str(max(1, threads // nproc))
                r = run_sharded(tmp, nproc, args.ep if nproc > 1 else 1, args)
                if "error" in r:
                    print(f"{nproc} process(es): fails: {r['error']}", flush=True)
                    continue
                shares = ", ".join(f"{x:.1%}" for x in r["comm_shares"])
                print(f"{nproc} process(es){f', EP {args.ep}' if nproc > 1 and args.ep > 1 else ''}, fp32, "
                      f"{max(1, threads // nproc)} thread(s) each: {r['tokens_per_s']:8.0f} tok/s; communication "
                      f"share of the step per rank: {shares}", flush=True)
            os.environ.pop("OMP_NUM_THREADS", None)
        for impl in ("dbrx",) + (() if args.no_hf else ("transformers",)):
            for precision in precisions:
                r = run(impl, tmp, precision, args)
                results[impl, precision] = r
                if "error" in r:
                    print(f"{impl:>12} {precision:>8}: fails: {r['error']}", flush=True)
                    continue
                mfu = r["tokens_per_s"] * flops_per_token / peak[precision]
                print(f"{impl:>12} {precision:>8}: {r['tokens_per_s']:8.0f} tok/s, MFU {mfu:5.1%} of the "
                      f"{precision} matmul peak, peak memory +{r['peak_bytes'] / 2**30:.2f} GiB", flush=True)
    speed = {k: v.get("tokens_per_s") for k, v in results.items()}
    ratios = []
    if speed.get(("dbrx", "amp_bf16")) and speed.get(("dbrx", "fp32")):
        ratios.append(f"amp_bf16 / fp32 (ours): {speed['dbrx', 'amp_bf16'] / speed['dbrx', 'fp32']:.2f}x")
    for precision in precisions:
        theirs = speed.get(("transformers", precision))
        if theirs and speed.get(("dbrx", precision)):
            ratios.append(f"ours / transformers {precision}: {speed['dbrx', precision] / theirs:.2f}x")
    print("; ".join(ratios))


if __name__ == "__main__":
    main()
