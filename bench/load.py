"""Peak memory while loading a checkpoint, in a fresh process: growth of the peak resident memory (VmHWM) over
DbrxForCausalLM.from_pretrained and one read of every weight, against the bytes of the weights and of the
largest block.

    .venv/bin/python bench/load.py [--preset dbrx-small] [--dtype float32] [--shard-size 200MB] [--devices cpu,cpu]

With --devices, the blocks are split in two halves over the two devices through the device_map path (each tensor
read on the host, then sent to its block's device): on GPUs the host keeps only what is in flight.
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
    devices = sys.argv[3].split(",") if len(sys.argv) > 3 else None
    if devices:  # first half of the blocks (and the embedding) on one device, the rest on the other
        n = int(sys.argv[4])
        dmap = {"transformer.wte": devices[0], "transformer.norm_f": devices[1], "lm_head": devices[1]}
        dmap.update({f"transformer.blocks.{i}": devices[i * 2 // n] for i in range(n)})
        m = DbrxForCausalLM.from_pretrained(sys.argv[1], dtype=sys.argv[2], device_map=dmap)
    else:
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
    ap.add_argument("--devices", help="two devices to split the blocks over (cpu,cpu; cuda:0,cuda:1)")
    args = ap.parse_args()
    import torch

    from dbrx.perf import machine_profile

    print(machine_profile().describe(), flush=True)
    cfg = DbrxConfig.from_name(args.preset)
    model = DbrxForCausalLM(cfg).to(getattr(torch, args.dtype))
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    block = sum(t.numel() * t.element_size() for t in model.transformer.blocks[0].state_dict().values())
    spread = [args.devices, str(cfg.n_layers)] if args.devices else []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size=args.shard_size)
        del model
        out = subprocess.run([sys.executable, "-c", MEASURE, tmp, args.dtype, *spread], capture_output=True,
                             text=True, check=True).stdout.split()
    grown, seconds = int(out[0]), float(out[1])
    where = f" over {args.devices} (device_map)" if args.devices else ""
    print(f"{args.preset} {args.dtype}{where}: weights {nbytes / 2**20:.0f} MiB, largest block {block / 2**20:.0f} MiB;"
          f" peak RSS growth (loading, then reading every weight once) {grown / 2**20:.0f} MiB = {grown / nbytes:.2f}x "
          f"the weights, {(grown - nbytes) / 2**20:+.0f} MiB = {(grown - nbytes) / block:+.2f} blocks above them; "
          f"loaded in {seconds:.2f} s")


if __name__ == "__main__":
    main()
