"""Peak memory while loading a checkpoint, in a fresh process: growth of the peak resident memory (VmHWM) over
DbrxForCausalLM.from_pretrained and one read of every weight, against the bytes of the weights.

    .venv/bin/python bench/load.py [--preset dbrx-small] [--dtype float32] [--shard-size 200MB]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap

from dbrx import DbrxConfig, DbrxForCausalLM

MEASURE = textwrap.dedent("""
    import sys, time
    import torch
    from dbrx import DbrxForCausalLM

    def hwm():  # this process's peak resident memory (VmHWM, reset at exec unlike ru_maxrss)
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    base = hwm()
    t0 = time.perf_counter()
    m = DbrxForCausalLM.from_pretrained(sys.argv[1], dtype=sys.argv[2])
    seconds = time.perf_counter() - t0
    for p in m.parameters():  # touch every weight: memory-mapped pages count once they are read
        p.sum()
    print(hwm() - base, seconds)
""")

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dbrx-small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--shard-size", default="200MB")
    args = ap.parse_args()
    import torch

    from dbrx.perf import machine_profile

    print(machine_profile().describe(), flush=True)
    model = DbrxForCausalLM(DbrxConfig.from_name(args.preset)).to(getattr(torch, args.dtype))
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size=args.shard_size)
        del model
        out = subprocess.run([sys.executable, "-c", MEASURE, tmp, args.dtype], capture_output=True, text=True,
                             check=True).stdout.split()
    grown, seconds = int(out[0]), float(out[1])
    print(f"{args.preset} {args.dtype}: weights {nbytes / 2**20:.0f} MiB; peak RSS growth (loading, then reading every weight once) "
          f"{grown / 2**20:.0f} MiB = {grown / nbytes:.2f}x the weights; loaded in {seconds:.2f} s")


if __name__ == "__main__":
    main()
