"""`dbrx serve` under load and as lm-eval's backend, over real HTTP against one server subprocess on a tiny random
checkpoint (the helpers and checkpoint of tests/test_serve.py):

* 64 concurrent clients for a bounded time, streaming and not: every request gets exactly one complete 200
  answer, and once the load is over nothing is left behind (no running or waiting request, no KV slot in use, and
  the process' resident memory back within a stated bound of what it was after a warm-up round);
* lm-eval's own `local-completions` model pointed at /v1/completions scores a local multiple-choice task with the
  same per-choice log-likelihoods as `dbrx eval`'s lm-eval model (`dbrx`, dbrx.eval.scoring underneath).

Offline: the checkpoint, the task and its data are written to tmp_path."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402
from test_serve import MAX_LEN, model_dir, start_server, stop_server  # noqa: E402, F401 - model_dir: a fixture

CLIENTS = 64
LOAD_SECONDS = 15.0
MAX_TOKENS = 6
# The KV cache is allocated once (16 slots x MAX_LEN positions), so it cannot grow; what could is state kept per
# request or per step after its end: a logits row of this model is 100,352 floats (392 KiB), so keeping one per
# request over the several hundred requests of the load phase would add well over 64 MiB, and so would keeping
# a step's gathered keys and values. Below the bound lies what a healthy process still moves after the
# warm-up: allocator arenas and free lists (glibc keeps freed pages), uvicorn/asyncio buffers for 64
# connections, the metrics histograms. (A leak of a few KiB per request would pass: this bound catches tensors.)
RSS_GROWTH_BOUND_MIB = 64


@pytest.fixture(scope="module")
def server(model_dir):
    """16 slots, and a queue (256) large enough for all 64 clients, so no request is ever refused with 429."""
    proc, base = start_server(model_dir, "--max-num-seqs", "16", "--max-queue", "256", key=None)
    yield proc, base
    stop_server(proc)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def gauges(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=10).text
    return {k: float(v) for k, v in (x.split() for x in text.splitlines() if x and not x.startswith("#"))}


def one_request(http: httpx.Client, base: str, i: int) -> str:
    """One completion, streamed when i is odd; returns why it is incomplete, or '' when it is whole: status 200,
    exactly one choice with a finish_reason, MAX_TOKENS tokens unless a stop token ended it early, and for a
    stream exactly one [DONE] at the end with nothing after it."""
    body = {"prompt": f"request {i}: def f(x):", "max_tokens": MAX_TOKENS, "temperature": 0}
    url = base + "/v1/completions"
    if i % 2 == 0:
        r = http.post(url, json=body)
        if r.status_code != 200:
            return f"status {r.status_code}: {r.text[:200]}"
        out = r.json()
        choice, = out["choices"]
        n, finish = out["usage"]["completion_tokens"], choice["finish_reason"]
    else:
        with http.stream("POST", url, json={**body, "stream": True,
                                            "stream_options": {"include_usage": True}}) as r:
            if r.status_code != 200:
                return f"status {r.status_code}: {r.read()[:200]!r}"
            lines = [x for x in r.iter_lines() if x]
        if lines[-1] != "data: [DONE]" or lines.count("data: [DONE]") != 1:
            return f"stream did not end with one [DONE]: {lines[-2:]}"
        events = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
        finishes = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
        if len(finishes) != 1:
            return f"stream had {len(finishes)} finish reasons"
        n, finish = events[-1]["usage"]["completion_tokens"], finishes[0]
    if not (finish == "length" and n == MAX_TOKENS or finish == "stop" and n <= MAX_TOKENS):
        return f"finish_reason {finish} after {n} tokens"
    return ""


def drive(base: str, clients: int, seconds: float | None) -> tuple[int, list[str]]:
    """`clients` threads, each sending requests one after another until `seconds` have passed (or just one each
    when seconds is None); returns (requests sent, problems)."""
    sent, problems, lock = [0], [], threading.Lock()
    deadline = time.monotonic() + (seconds or 0)

    def client(c: int) -> None:
        with httpx.Client(timeout=120) as http:
            k = 0
            while True:
                i = c + k * clients
                with lock:
                    sent[0] += 1
                try:
                    problem = one_request(http, base, i)
                except Exception as e:  # noqa: BLE001 - a transport error is a lost request, counted below
                    problem = f"{type(e).__name__}: {e}"
                if problem:
                    with lock:
                        problems.append(f"request {i}: {problem}")
                k += 1
                if seconds is None or time.monotonic() >= deadline:
                    return

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sent[0], problems


def test_64_clients_get_every_answer_and_nothing_grows(server):
    proc, base = server
    sent, problems = drive(base, CLIENTS, None)  # warm-up: every connection, thread and buffer made once
    assert not problems and sent == CLIENTS, problems[:5]
    time.sleep(1)
    before_rss, before = rss_mib(proc.pid), gauges(base)

    t0 = time.monotonic()
    sent, problems = drive(base, CLIENTS, LOAD_SECONDS)
    elapsed = time.monotonic() - t0
    assert not problems, f"{len(problems)} of {sent} requests failed: {problems[:5]}"
    after = gauges(base)
    # exactly one answer per request sent: the server counted as many requests as we sent, and none errored
    assert after["dbrx_requests_total"] - before["dbrx_requests_total"] == sent
    assert after["dbrx_request_errors_total"] == before["dbrx_request_errors_total"]
    assert after["dbrx_client_disconnects_total"] == before["dbrx_client_disconnects_total"]
    assert sent > 2 * CLIENTS, f"only {sent} requests in {elapsed:.1f} s"

    for _ in range(50):  # the gauges settle as the engine thread frees the last slots
        if after["dbrx_requests_running"] == after["dbrx_requests_waiting"] == after["dbrx_kv_slots_in_use"] == 0:
            break
        time.sleep(0.1)
        after = gauges(base)
    assert (after["dbrx_requests_running"], after["dbrx_requests_waiting"], after["dbrx_kv_slots_in_use"]) == (0, 0, 0)
    growth = rss_mib(proc.pid) - before_rss
    print(f"\n{sent} requests from {CLIENTS} clients in {elapsed:.1f} s ({sent / elapsed:.1f}/s); "
          f"RSS {before_rss:.0f} MiB after warm-up, {growth:+.1f} MiB after the load")
    assert growth < RSS_GROWTH_BOUND_MIB, f"RSS grew {growth:.1f} MiB over {sent} requests"


MC_ROWS = [{"query": f"Question {i}: which word comes after {w}?", "choices": ["alpha", "beta gamma",
                                                                              "delta-epsilon!", " zeta"],
            "gold": i % 4} for i, w in enumerate("one two three four five six".split())]


def test_lm_evals_local_completions_equals_dbrx_eval(server, model_dir, tmp_path):
    """lm-eval's `local-completions` sends each (context, continuation) as token ids (tokenized by the HF
    tokenizer files saved with the checkpoint, split as lm-eval's hf model splits them), with echo, max_tokens 1
    and logprobs 1, and sums the continuation's echoed log-probabilities: per choice, the same numbers as
    `dbrx eval`'s lm-eval model, and the same greedy flags."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dbrx.eval.lm_eval import write_multiple_choice_task

    _, base = server
    root = tmp_path
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    write_multiple_choice_task(root / "tasks", "serve_mc", root / "mc.jsonl", cache_dir=root / "hf_datasets")
    tasks = TaskManager(include_path=str(root / "tasks"), include_defaults=False)

    def evaluate(model: str, model_args: str) -> list[dict]:
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["serve_mc"], device="cpu",
                                      task_manager=tasks, log_samples=True, bootstrap_iters=0)
        return out["samples"]["serve_mc"]

    served = evaluate("local-completions", f"base_url={base}/v1/completions,model={model_dir.name},"
                      f"tokenizer_backend=huggingface,tokenizer={model_dir},tokenized_requests=True,"
                      f"max_length={MAX_LEN},batch_size=4,max_retries=1")
    local = evaluate("dbrx", f"pretrained={model_dir},dtype=float32,batch_size=4")
    assert len(served) == len(local) == len(MC_ROWS)
    diffs = []
    for a, b in zip(served, local):
        assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a["filtered_resps"], b["filtered_resps"], strict=True):
            diffs.append(abs(ll_a - ll_b))
            assert greedy_a == greedy_b
    print(f"\nlocal-completions vs dbrx: {len(diffs)} choices, largest |difference| {max(diffs):.2e}")
    assert max(diffs) < 1e-5
