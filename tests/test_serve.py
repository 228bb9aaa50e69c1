"""`dbrx serve` over real HTTP: a server subprocess on a tiny random checkpoint, driven by the official `openai`
client (answers equal `generate`, streamed text equals whole text, log-likelihoods equal the model's own) and by
raw HTTP for the error paths and the safety rules."""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from dbrx import DbrxConfig, DbrxForCausalLM
from dbrx.generate import generate
from dbrx.serve.server import wait_until_healthy
from dbrx.tokenizer import STOP_IDS, Tokenizer

KEY = "test-key-123"
MAX_LEN = 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, *extra, key=KEY):
    port = free_port()
    cmd = [sys.executable, "-m", "dbrx", "serve", "--model", str(model_dir), "--port", str(port), "--dtype",
           "float32", "--max-model-len", str(MAX_LEN), *extra]
    if key:
        cmd += ["--api-key", key]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_until_healthy(proc, base, 60)
    return proc, base


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_model")
    cfg = DbrxConfig.from_name("dbrx-tiny").replace(d_model=64, n_heads=4, n_layers=2, max_seq_len=512,
                                                    ffn_config={"ffn_hidden_size": 48})
    torch.manual_seed(0)
    DbrxForCausalLM(cfg).save_pretrained(path)
    Tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return DbrxForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def server(model_dir):
    proc, base = start_server(model_dir, "--max-num-seqs", "4")
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


tok = Tokenizer()


def greedy(model, ids, n):
    out = generate(model, ids, n, stop_token_ids=list(STOP_IDS))
    return out[:-1] if out and out[-1] in STOP_IDS else out


def test_completions_greedy_equal_generate_and_streaming_equals_whole(client, model):
    prompt = "def fibonacci(n):"
    want = tok.decode(greedy(model, tok.encode(prompt), 12))
    r = client.completions.create(model="serve_model0", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == 12
    assert r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="serve_model0", prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 12
    # token-id prompts, and several prompts in one request
    r = client.completions.create(model="serve_model0", prompt=[tok.encode(prompt), tok.encode("class A:")],
                                  max_tokens=5, temperature=0)
    assert [c.text for c in r.choices] == [tok.decode(greedy(model, tok.encode(p), 5))
                                           for p in (prompt, "class A:")]


def test_chat_uses_dbrx_template_and_default_system_prompt(client, model):
    messages = [{"role": "user", "content": "Hello there"}]
    ids = tok.apply_chat_template(messages)
    assert "You are DBRX" in tok.decode(ids)
    want = tok.decode(greedy(model, ids, 10))
    r = client.chat.completions.create(model="serve_model0", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="serve_model0", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"
    r = client.chat.completions.create(model="serve_model0", messages=messages, max_completion_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and len(content[0].top_logprobs) == 2
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-5)  # greedy: the top


def test_n_with_seed_is_repeatable_and_stop_strings_cut_the_text(client, model):
    kw = dict(model="serve_model0", prompt="import os", max_tokens=8, temperature=1.0, n=2, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2
    assert a.usage.completion_tokens == 16
    full = tok.decode(greedy(model, tok.encode("import os"), 20))
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), full
    r = client.completions.create(model="serve_model0", prompt="import os", max_tokens=20, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="serve_model0", prompt="import os", max_tokens=20,
                                              temperature=0, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_echo_logprobs_are_the_models_log_likelihoods(client, model):
    """lm-eval's local-completions: echo with max_tokens 0 returns the prompt's token log-probabilities."""
    ids = tok.encode("The quick brown fox jumps")
    r = client.completions.create(model="serve_model0", prompt=ids, max_tokens=0, echo=True, logprobs=3,
                                  temperature=0)
    lp = r.choices[0].logprobs
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(float(want[t - 1, ids[t]]), abs=1e-5)
        assert len(lp.top_logprobs[t]) == 3
    assert r.choices[0].text == tok.decode(ids) and r.usage.completion_tokens == 0
    # echo with one generated token (lm-eval's own payload): the prompt's logprobs, then the new token's
    r = client.completions.create(model="serve_model0", prompt=ids, max_tokens=1, echo=True, logprobs=1,
                                  temperature=0)
    assert len(r.choices[0].logprobs.token_logprobs) == len(ids) + 1
    assert r.choices[0].logprobs.token_logprobs[1] == pytest.approx(lp.token_logprobs[1], abs=1e-5)


def test_models_health_and_metrics(server):
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server + "/health").status_code == 200  # no key needed
    models = httpx.get(server + "/v1/models", headers=h).json()
    assert models["data"][0]["id"] == "serve_model0" and models["data"][0]["max_model_len"] == MAX_LEN
    text = httpx.get(server + "/metrics", headers=h).text
    for name in ("dbrx_requests_running", "dbrx_requests_waiting", "dbrx_kv_slots_in_use",
                 "dbrx_time_to_first_token_seconds_count", "dbrx_inter_token_latency_seconds_count",
                 "dbrx_generation_tokens_total", "dbrx_client_disconnects_total"):
        assert name in text


def test_errors_in_openai_shape(server):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server + "/v1/completions"

    def err(resp, status):
        assert resp.status_code == status, resp.text
        e = resp.json()["error"]
        assert set(e) == {"message", "type", "param", "code"} and e["message"]
        return e

    err(httpx.post(url, content=b"{not json", headers=h), 400)
    err(httpx.get(server + "/v1/nothing", headers=h), 404)
    err(httpx.post(url, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}), 401)
    err(httpx.post(url, json={"prompt": "x"}), 401)
    err(httpx.get(server + "/metrics"), 401)
    err(httpx.post(url, content=b"x" * (5 * 2**20), headers=h), 413)
    e = err(httpx.post(url, json={"prompt": "word " * 400, "max_tokens": 50}, headers=h), 400)
    assert "context length" in e["message"]
    assert err(httpx.post(url, json={"prompt": "x", "n": 9}, headers=h), 400)["param"] == "n"
    assert err(httpx.post(url, json={"prompt": "x", "logprobs": 21}, headers=h), 400)["param"] == "logprobs"
    assert err(httpx.post(url, json={"prompt": "x", "stop": list("abcde")}, headers=h), 400)["param"] == "stop"
    assert err(httpx.post(url, json={"model": "gpt-4", "prompt": "x"}, headers=h), 404)["param"] == "model"
    assert err(httpx.post(url, json={"prompt": [10**7]}, headers=h), 400)["param"] == "prompt"
    err(httpx.post(server + "/v1/chat/completions", json={"messages": "hi"}, headers=h), 400)


def test_disconnect_mid_stream_aborts_the_request(server):
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "a", "max_tokens": 120, "temperature": 0, "stream": True}
    before = httpx.get(server + "/metrics", headers=h).text
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=h) as r:
        next(r.iter_lines())
    metric = "\ndbrx_client_disconnects_total "
    count = lambda text: int(text.split(metric)[1].split()[0])  # noqa: E731
    for _ in range(50):
        text = httpx.get(server + "/metrics", headers=h).text
        if count(text) > count(before) and "\ndbrx_kv_slots_in_use 0\n" in text:
            break
        time.sleep(0.1)
    assert count(text) > count(before) and "\ndbrx_kv_slots_in_use 0\n" in text


def test_full_queue_answers_429_with_retry_after_and_sigterm_drains(model_dir):
    proc, base = start_server(model_dir, "--max-num-seqs", "1", "--max-queue", "1", key=None)
    try:
        body = {"prompt": "a", "max_tokens": 100, "temperature": 0}

        def post(_):
            return httpx.post(base + "/v1/completions", json=body, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(post, range(4)))
        statuses = sorted(r.status_code for r in answers)
        assert 429 in statuses and 200 in statuses, statuses
        busy = next(r for r in answers if r.status_code == 429)
        assert busy.headers["retry-after"] and busy.json()["error"]["code"] == "queue_full"
        # SIGTERM while a stream is in flight: the stream still ends whole, then the server exits
        with httpx.stream("POST", base + "/v1/completions", json={**body, "max_tokens": 60, "stream": True},
                          timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            proc.terminate()
            rest = [line for line in lines if line]
        events = [json.loads(x[6:]) for x in [first, *rest] if x != "data: [DONE]"]
        assert rest[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=15) in (0, -15)  # uvicorn re-raises SIGTERM once it has drained
    finally:
        stop_server(proc)


def test_non_loopback_host_without_key_and_bad_engine_flags_are_refused_before_loading(model_dir):
    env = {k: v for k, v in os.environ.items() if k != "DBRX_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "dbrx", "serve", "--model", str(model_dir), "--host", "0.0.0.0"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "--api-key" in r.stderr and "0.0.0.0" in r.stderr
    for flags, said in ((["--prefill-slowdown", "1"], "--prefill-slowdown 1.0 must be above 1"),
                        (["--max-num-seqs", "16", "--max-num-batched-tokens", "8"], "at least --max-num-seqs 16")):
        r = subprocess.run([sys.executable, "-m", "dbrx", "serve", "--model", str(model_dir), *flags],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and said in r.stderr, r.stderr


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on():
    """EngineLoop without HTTP: an exception in step() ends the requests it was running with that exception;
    the loop keeps serving; an exception in the loop itself marks it dead, and /health then answers 503 (as it does
    while the model loads)."""
    from dbrx.serve.engine import Output, SamplingParams
    from dbrx.serve.server import EngineLoop

    class Flaky:
        slots_in_use, running, waiting = 0, {}, []

        def __init__(self):
            self.requests, self.calls = [], 0

        def add_request(self, rid, prompt, params):
            self.requests.append(rid)

        def has_work(self):
            if self.requests == ["die"]:
                raise RuntimeError("broken loop")
            return bool(self.requests)

        def abort(self, rid):
            return self.requests.remove(rid) is None if rid in self.requests else False

        def step(self):
            rid = self.requests[0]
            if rid == "bad":
                self.running = {rid: None}
                raise RuntimeError("boom")
            self.requests.pop(0)
            return [Output(rid, [1], True, "length")]

    engine = Flaky()
    loop = EngineLoop(engine)
    loop.start()
    got: dict = {}
    done = concurrent.futures.Future()
    loop.submit([("bad", [1], SamplingParams(1))], lambda item: got.setdefault("bad", item))
    loop.submit([("good", [1], SamplingParams(1))], lambda item: (got.setdefault("good", item),
                                                                  done.set_result(True)))
    done.result(timeout=5)
    assert isinstance(got["bad"], RuntimeError) and got["good"].token_ids == [1] and loop.alive
    # /health over HTTP (the app in-process): 503 while the model loads, 200 while the loop runs, 503 once it died
    from starlette.testclient import TestClient

    from dbrx.serve.server import Server, ServerConfig, create_app

    server = Server(ServerConfig("m"), Tokenizer())
    client = TestClient(create_app(server))
    assert client.get("/health").status_code == 503 and client.get("/health").json() == {"status": "loading"}
    server.loop = loop
    assert client.get("/health").status_code == 200
    loop.submit([("die", [1], SamplingParams(1))], lambda item: None)
    loop.thread.join(timeout=5)
    assert not loop.alive and isinstance(loop.error, RuntimeError)
    assert client.get("/health").status_code == 503 and "stopped" in client.get("/health").json()["status"]


def test_streamed_pieces_hold_back_split_utf8_and_stop_strings_spanning_tokens():
    """Token by token, as a stream sees them: no piece holds half a character, a stop string split over tokens
    is never emitted, and the pieces join to the whole answer's text."""
    from dbrx.serve.engine import Output
    from dbrx.serve.server import ChoiceText
    from dbrx.tokenizer import Tokenizer

    tok = Tokenizer()
    ids = tok.encode("Math 𝔘𝔫𝔦 ok. END of it")
    def whole(b: bytes) -> bool:
        try:
            return bool(b.decode("utf-8"))
        except UnicodeDecodeError:
            return False

    assert not all(whole(tok.decode_bytes([t])) for t in ids)  # each 𝔘's 4 bytes come in 3 tokens
    choice = ChoiceText(tok, ["k. EN"])  # a stop string over the tokens " ok", ".", " END"
    pieces = []
    for i, t in enumerate(ids):
        choice.push(Output("r", [t], finished=i == len(ids) - 1, finish_reason="length" if i == len(ids) - 1 else None))
        pieces.append(choice.take())
        if choice.done:
            break
    assert all("\ufffd" not in p for p in pieces) and all("k." not in p for p in pieces)
    assert "".join(pieces) == "Math 𝔘𝔫𝔦 o" and choice.finish_reason == "stop" and pieces.count("") >= 2
