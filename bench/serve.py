"""`dbrx serve` on CPU against `dbrx generate` on the same weights (a preset with random seeded weights, fp32):

(a) one client streaming through the server: decode tokens/s vs `generate`'s (target >= 90%: HTTP, SSE and the
    engine's per-request bookkeeping should cost little next to a forward);
(b) 8 concurrent clients' aggregate tokens/s vs one client's (target >= 3x: continuous batching decodes them in
    one forward, and a decode step is bound by reading the weights, not by the rows);
(c) inter-token latency of one stream while another client sends a 2,000-token prompt (target p99 <= 3x the
    median; also shown against the same stream's median alone, the stricter reading): while streams decode, the
    server sizes prompt chunks by measured step times so that a step takes about --prefill-slowdown (2.5) times a
    decode-only step. The long prompt's time to first token, alone and beside the stream, shows what that costs.

    .venv/bin/python bench/serve.py [--preset dbrx-small] [--new-tokens 128] [--clients 8] [--long-prompt 2000]

The server is a subprocess. It idles while `generate` runs in this process, and the two are measured in turns,
rep by rep, so that neither gets the CPU's fast spell alone (a shared machine's speed drifts by minutes).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import torch

from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.generate import generate
from dbrx.serve.server import wait_until_healthy
from dbrx.perf import machine_profile
from dbrx.tokenizer import Tokenizer


def generate_decode_tps(model: DbrxForCausalLM, prompts: list[list[int]], n: int, reps: int) -> float:
    """`dbrx generate`'s decode speed as bench/generate.py measures it: rows x (n-1) tokens / (time for n tokens
    - time for 1), best of `reps`, so the prompts' prefill is left out. One prompt is generate's batch-1 path;
    several are decoded as one batch, the reference for what batching alone gains on this machine in (b)."""
    prompt = prompts[0] if len(prompts) == 1 else prompts
    generate(model, prompt, 2)  # warm-up

    def best(k: int) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            generate(model, prompt, k)
            times.append(time.perf_counter() - t0)
        return min(times)

    return len(prompts) * (n - 1) / (best(n) - best(1))


def start_server(model_dir: str, args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "dbrx", "serve", "--model", model_dir, "--port", str(port), "--dtype", "float32",
           "--max-num-seqs", str(max(args.clients, 2)), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--prefill-slowdown", str(args.prefill_slowdown)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, base, 120)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    return proc, base


def stream(base: str, prompt: list[int], n: int, times: list[float] | None = None) -> tuple[int, float, float]:
    """One streamed greedy completion; returns (tokens, time of its first token, time of its last), and appends
    each content chunk's arrival time to `times` as it comes (one chunk per token, but for a character split
    over tokens), so another thread can watch the stream progress."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    arrivals = times if times is not None else []
    start, tokens = len(arrivals), 0
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"]:
                arrivals.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return tokens, arrivals[start], arrivals[-1]


def concurrent_tps(base: str, prompts: list[list[int]], n: int) -> float:
    """Aggregate tokens/s of len(prompts) clients streaming at once: all their tokens over the wall time from
    the first request sent to the last token received."""
    results: list[tuple[int, float, float]] = []
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lambda p=p: results.append(stream(base, p, n))) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(r[0] for r in results) / (max(r[2] for r in results) - t0)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def report(name: str, value: str, ratio: float, target: str, ok: bool) -> None:
    print(f"{name}: {value}; ratio {ratio:.2f} (target {target}) {'OK' if ok else 'BELOW TARGET'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dbrx-small")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--long-prompt", type=int, default=2000, help="tokens of the prompt sent during (c)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512, help="the server's token budget per step")
    ap.add_argument("--prefill-slowdown", type=float, default=2.5, help="the server's bound on a prefilling step")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    print(machine_profile("cpu").describe(), flush=True)
    cfg = DbrxConfig.from_name(args.preset)
    print(f"config {args.preset}: d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.num_experts} experts top "
          f"{cfg.top_k}, vocab {cfg.vocab_size}; fp32, random weights (seed 0); {args.new_tokens} new tokens",
          flush=True)
    torch.manual_seed(0)
    prompts = [torch.randint(0, 100000, (args.prompt_tokens,)).tolist() for _ in range(args.clients)]
    long_prompt = torch.randint(0, 100000, (args.long_prompt,)).tolist()
    n = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        DbrxForCausalLM(cfg).save_pretrained(tmp)
        Tokenizer().save_pretrained(tmp)
        model = DbrxForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        proc, base = start_server(tmp, args)
        try:
            stream(base, prompts[0], 4)  # warm-up
            # The server idles (its engine thread waits on a queue) while generate runs here, and the two are
            # measured in turns, rep by rep, so that a slow spell of a shared machine touches both; best of reps.
            # (a) one stream's decode speed, from its first token to its last
            base_tps = best = 0.0
            for _ in range(args.reps):
                base_tps = max(base_tps, generate_decode_tps(model, prompts[:1], n, 1))
                tokens, first, last = stream(base, prompts[0], n)
                best = max(best, (tokens - 1) / (last - first))
            report("(a) one streaming client vs dbrx generate, decode", f"{best:.2f} vs {base_tps:.2f} tok/s",
                   best / base_tps, ">= 0.90", best >= 0.9 * base_tps)
            # (b) aggregate throughput, 8 clients against 1, both measured end to end
            one = many = batch_tps = 0.0
            for _ in range(args.reps):
                batch_tps = max(batch_tps, generate_decode_tps(model, prompts, n, 1))
                one = max(one, concurrent_tps(base, prompts[:1], n))
                many = max(many, concurrent_tps(base, prompts, n))
            report(f"(b) {args.clients} concurrent clients vs one, aggregate", f"{many:.2f} vs {one:.2f} tok/s",
                   many / one, ">= 3.00", many >= 3 * one)
            print(f"    reference, no server: dbrx generate decoding the {args.clients} prompts as one batch "
                  f"{batch_tps:.2f} vs one {base_tps:.2f} tok/s = {batch_tps / base_tps:.2f}x", flush=True)
            del model
            # (c) a stream's inter-token gaps while a long prompt is prefilled alongside it, against the same
            # stream alone; and what the bound costs the long prompt: its time to first token, alone and shared
            alone: list[float] = []
            stream(base, prompts[0], n, alone)
            alone_p50 = statistics.median(b - a for a, b in zip(alone, alone[1:]))
            sent = time.perf_counter()
            stream(base, long_prompt, 1)
            ttft_alone = time.perf_counter() - sent
            times: list[float] = []
            runner = threading.Thread(target=stream, args=(base, prompts[0], n, times))
            runner.start()
            while len(times) < 4:  # the stream is decoding before the long prompt arrives
                time.sleep(0.01)
            sent = time.perf_counter()
            stream(base, long_prompt, 1)
            ttft_shared = time.perf_counter() - sent
            runner.join()
            gaps = [b - a for a, b in zip(times, times[1:])]
            p50, p99 = statistics.median(gaps), percentile(gaps, 99)
            report(f"(c) inter-token latency during a {args.long_prompt}-token prompt",
                   f"p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, max {max(gaps) * 1e3:.1f} ms over "
                   f"{len(gaps)} gaps", p99 / p50, "p99 <= 3.00 x p50", p99 <= 3 * p50)
            report("    stricter: that p99 against the same stream's p50 alone", f"{alone_p50 * 1e3:.1f} ms alone",
                   p99 / alone_p50, "<= 3.00", p99 <= 3 * alone_p50)
            print(f"    the {args.long_prompt}-token prompt's time to first token: {ttft_shared:.2f} s beside the "
                  f"stream, {ttft_alone:.2f} s alone (the server's --prefill-slowdown trades this for (c))",
                  flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
