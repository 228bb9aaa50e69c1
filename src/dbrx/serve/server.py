"""`dbrx serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, Server-Sent Events) on `dbrx.serve.Engine`.

One background thread owns the engine and loops `step()` while it has work; the event loop never touches the
engine. Requests reach the thread through a thread-safe command queue, and tokens come back through
`loop.call_soon_threadsafe` into one asyncio.Queue per HTTP request. Anything else that needs the model (the prompt
log-probabilities of `echo`) runs as a command of that same thread, so it is serialized with the engine's steps.

Safe by default: 127.0.0.1; a non-loopback host needs an API key; keys compared in constant time; body size,
prompt length, `n`, `logprobs` and `stop` bounded before anything is queued; a full queue answers 429.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import ipaddress
import json
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dbrx.generate import TextStreamer
from dbrx.serve.engine import Engine, Output, SamplingParams
from dbrx.serve.head import use_blocked_head

MAX_N = 8
MAX_LOGPROBS = 20
MAX_STOP = 4


# ---- errors ----------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class QueueFull(Exception):
    pass


# ---- the engine thread -----------------------------------------------------------------------------------------
class EngineLoop:
    """Owns the engine in one thread. `submit`, `abort` and `call` may be used from any thread; each request's
    outputs (or the exception that ended it) go to the `sink` given with it, from the engine thread."""

    def __init__(self, engine: Engine, max_queue: int = 256):
        self.engine = engine
        self.max_queue = max_queue
        self.commands: queue.Queue = queue.Queue()
        self.sinks: dict[str, Callable[[object], None]] = {}
        self.lock = threading.Lock()
        self.outstanding = 0  # submitted and not yet finished: waiting (in the queue or the engine) or running
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dbrx-engine", daemon=True)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    @property
    def waiting(self) -> int:
        return max(0, self.outstanding - self.engine.slots_in_use)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.commands.put(("noop",))
        self.thread.join(timeout=10)

    def submit(self, items: list[tuple[str, list[int], SamplingParams]], sink: Callable[[object], None]) -> None:
        """Queue several requests at once (the choices of one HTTP request), or none: QueueFull past max_queue."""
        with self.lock:
            if self.waiting + len(items) > self.max_queue:
                raise QueueFull(f"{self.waiting} requests are waiting; the queue holds {self.max_queue}")
            self.outstanding += len(items)
        for rid, prompt, params in items:
            self.commands.put(("add", rid, prompt, params, sink))

    def abort(self, request_id: str) -> None:
        self.commands.put(("abort", request_id))

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run fn in the engine thread between steps (it must not run concurrently with a step: same model)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.commands.put(("call", fn, future))
        return future

    def _finish(self, request_id: str, item: object = None) -> None:
        sink = self.sinks.pop(request_id, None)
        if sink is None:
            return
        with self.lock:
            self.outstanding -= 1
        if item is not None:
            sink(item)

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, rid, prompt, params, sink = command
            self.sinks[rid] = sink
            try:
                self.engine.add_request(rid, prompt, params)
            except Exception as e:  # noqa: BLE001 - the request's own failure, answered to it
                self._finish(rid, e)
        elif kind == "abort":
            if self.engine.abort(command[1]):
                self._finish(command[1])
            else:
                self.sinks.pop(command[1], None)
        elif kind == "call":
            _, fn, future = command
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                block = not self.engine.has_work()
                try:
                    command = self.commands.get(timeout=0.1) if block else self.commands.get_nowait()
                    self._handle(command)
                    while True:
                        self._handle(self.commands.get_nowait())
                except queue.Empty:
                    pass
                if not self.engine.has_work():
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - fail the requests of this step, keep serving
                    traceback.print_exc(file=sys.stderr)
                    for rid in [*self.engine.running, *(r.id for r in self.engine.waiting)]:
                        self.engine.abort(rid)
                        self._finish(rid, e)
                    continue
                for out in outputs:
                    sink = self.sinks.get(out.request_id)
                    if sink is not None:
                        sink(out)
                    if out.finished:
                        self._finish(out.request_id)
        except BaseException as e:  # the loop itself died: /health turns 503, waiting clients get a 500
            self.error = e
            traceback.print_exc(file=sys.stderr)
            for rid in list(self.sinks):
                self._finish(rid, RuntimeError(f"the engine loop died: {e!r}"))


# ---- metrics ---------------------------------------------------------------------------------------------------
class Histogram:
    BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self):
        self.counts = [0] * len(self.BUCKETS)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.BUCKETS):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.BUCKETS, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


@dataclass
class Metrics:
    ttft: Histogram = field(default_factory=Histogram)
    itl: Histogram = field(default_factory=Histogram)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    disconnects: int = 0
    requests: int = 0
    errors: int = 0

    def render(self, loop: EngineLoop | None, num_slots: int) -> str:
        running = loop.engine.slots_in_use if loop else 0
        gauges = [("dbrx_requests_running", "requests holding a KV slot", running),
                  ("dbrx_requests_waiting", "requests queued for a slot", loop.waiting if loop else 0),
                  ("dbrx_kv_slots_in_use", "KV cache slots in use", running),
                  ("dbrx_kv_slots_total", "KV cache slots (--max-num-seqs)", num_slots)]
        counters = [("dbrx_prompt_tokens_total", "prompt tokens processed", self.prompt_tokens),
                    ("dbrx_generation_tokens_total", "tokens generated", self.generation_tokens),
                    ("dbrx_client_disconnects_total", "requests aborted because their client went away",
                     self.disconnects),
                    ("dbrx_requests_total", "completion requests received", self.requests),
                    ("dbrx_request_errors_total", "requests that ended in a 500", self.errors)]
        lines = []
        for name, help_, value in gauges:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value}"]
        for name, help_, value in counters:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {value}"]
        for name, help_, hist in [("dbrx_time_to_first_token_seconds", "time from arrival to first token", self.ttft),
                                  ("dbrx_inter_token_latency_seconds", "time between a request's tokens", self.itl)]:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(lines) + "\n"


# ---- one choice's text -----------------------------------------------------------------------------------------
class ChoiceText:
    """Tokens -> text for one choice, the same for streamed and whole answers: UTF-8 held back until a character
    is whole, text that could be the start of a stop string held back until it is not, and the text cut before
    the first stop string (OpenAI leaves it out)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.streamer = TextStreamer(tokenizer)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.token_ids: list[int] = []
        self.logprobs: list = []
        self.finish_reason: str | None = None
        self.last_token_time: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, out: Output) -> None:
        searched = max(0, len(self.text) - self.hold)
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        self.text += "".join(self.streamer.push(t) for t in out.token_ids)
        if out.finished:
            self.text += self.streamer.flush()
            self.finish_reason = out.finish_reason
        hits = [i for i in (self.text.find(s, searched) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason = "stop"

    def take(self) -> str:
        end = len(self.text) if self.done else max(self.emitted, len(self.text) - self.hold)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece


# ---- the app ---------------------------------------------------------------------------------------------------
@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    cors_origins: tuple[str, ...] = ()
    num_slots: int = 8


def _int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {value!r}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return value


def _float(body: dict, name: str, default, lo: float, hi: float):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{name}' must be a number, got {value!r}", name)
    if not lo <= value <= hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return float(value)


class Server:
    """The HTTP handlers; `loop` is None until the model has loaded (then /health says 200)."""

    def __init__(self, config: ServerConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self.loop: EngineLoop | None = None
        self.metrics = Metrics()
        self.load_error: str | None = None

    # ---- request parsing --------------------------------------------------------------------------------------
    async def read_json(self, request) -> dict:
        """The body as a JSON object, refused (413) past the cap whether or not Content-Length says so."""
        cap = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise APIError(413, f"the request body is {length} bytes; this server accepts at most {cap}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise APIError(413, f"the request body exceeds {cap} bytes", code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def engine_loop(self) -> EngineLoop:
        if self.loop is None:
            raise APIError(503, "the model is still loading", code="loading")
        if not self.loop.alive:
            raise APIError(503, "the engine loop has stopped; this server cannot answer", code="engine_dead")
        return self.loop

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.config.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.config.model_name!r}", "model", "model_not_found")

    def prompts_of(self, prompt) -> list[list[int]]:
        """`prompt` as a string, a list of strings, a list of token ids, or a list of lists of token ids."""
        vocab = self.loop.engine.model.config.vocab_size if self.loop else None
        bad = APIError(400, "'prompt' must be a string, a list of strings, a list of token ids, or a list of "
                            "lists of token ids", "prompt")
        if isinstance(prompt, str):
            prompts = [self.tokenizer.encode(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.tokenizer.encode(p) for p in prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            prompts = [list(prompt)]
        elif isinstance(prompt, list) and prompt and all(
                isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            raise bad
        for p in prompts:
            if not p:
                raise APIError(400, "a prompt holds no tokens", "prompt")
            out = next((t for t in p if not 0 <= t < vocab), None) if vocab else None
            if out is not None:
                raise APIError(400, f"token id {out} is outside the vocabulary (0..{vocab - 1})", "prompt")
        return prompts

    def sampling(self, body: dict, prompts: list[list[int]], max_tokens: int, logprobs: int | None,
                 chat: bool) -> tuple[list[SamplingParams], int, list[str]]:
        """Per-choice SamplingParams (choice j of a seeded request gets seed + j), n, and the stop strings."""
        n = _int(body, "n", 1, 1, MAX_N)
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise APIError(400, "'stop' must be a string or a list of strings", "stop")
        if len(stops) > MAX_STOP:
            raise APIError(400, f"'stop' holds {len(stops)} strings; at most {MAX_STOP}", "stop")
        stops = [s for s in stops if s]
        temperature = _float(body, "temperature", 1.0, 0.0, 2.0)  # OpenAI's default
        top_p = _float(body, "top_p", None, 0.0, 1.0)
        top_k = _int(body, "top_k", None)
        top_k = None if top_k is None or top_k <= 0 else top_k
        seed = _int(body, "seed", None)
        limit = self.loop.engine.max_model_len
        longest = max(map(len, prompts))
        if longest + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; the prompt has {longest} "
                                f"and max_tokens asks for {max_tokens} more ({longest + max_tokens})",
                           "max_tokens" if longest < limit else "prompt", "context_length_exceeded")
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 seed=None if seed is None else seed + j,
                                 stop_token_ids=tuple(self.tokenizer.stop_token_ids), logprobs=logprobs)
                  for j in range(n)]
        return params, n, stops

    # ---- running ----------------------------------------------------------------------------------------------
    def start(self, prompts, params_per_choice, stops, on_item):
        """Queue every (prompt, choice); -> (request ids in choice order, ChoiceText per choice)."""
        loop = self.engine_loop()
        rids, items = [], []
        for p in prompts:
            for params in params_per_choice:
                rid = uuid.uuid4().hex
                rids.append(rid)
                items.append((rid, p, params))
        choices = [ChoiceText(self.tokenizer, stops) for _ in rids]
        if params_per_choice[0].max_tokens == 0:
            for c in choices:
                c.finish_reason = "length"
            return rids, choices
        try:
            loop.submit(items, on_item)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry shortly", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        self.metrics.prompt_tokens += sum(map(len, prompts))
        return rids, choices

    async def results(self, request, rids, choices, events: asyncio.Queue, t0: float):
        """Yield the index of each choice that got new output, until every choice is done; aborts what is left if
        the client goes away (or the caller stops early)."""
        index = {rid: i for i, rid in enumerate(rids)}
        loop = self.loop
        failed = False
        try:
            while not all(c.done for c in choices):
                try:
                    item = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if isinstance(item, BaseException):
                    failed = True
                    self.metrics.errors += 1
                    raise APIError(500, f"the request failed in the engine: {item!r}", code="engine_error")
                i = index[item.request_id]
                now = time.perf_counter()
                c = choices[i]
                if item.token_ids:
                    self.metrics.generation_tokens += len(item.token_ids)
                    if c.last_token_time is None:
                        self.metrics.ttft.observe(now - t0)
                    else:
                        self.metrics.itl.observe(now - c.last_token_time)
                    c.last_token_time = now
                c.push(item)
                if c.done and not item.finished:  # a stop string ended it: free the slot now
                    loop.abort(item.request_id)
                yield i
        finally:  # the client went away (or the stream was closed): free the slots now
            unfinished = [rid for rid, c in zip(rids, choices) if not c.done]
            for rid in unfinished:
                loop.abort(rid)
            if unfinished and not failed:
                self.metrics.disconnects += 1

    def prompt_logprobs(self, prompt: list[int], k: int) -> list[tuple[float | None, list[tuple[int, float]]]]:
        """Each prompt token's log-probability given the tokens before it (None for the first) and the top k
        there, from one forward of the model in the engine thread (between steps)."""
        model = self.loop.engine.model

        def score():
            with torch.inference_mode():
                ids = torch.tensor([prompt], device=self.loop.engine.device)
                logp_TV = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
                chosen = logp_TV[:-1].gather(1, ids[0, 1:, None])[:, 0].tolist()
                tops = logp_TV[:-1].topk(k, dim=-1) if k > 0 else None
                out: list = [(None, [])]
                for t in range(len(prompt) - 1):
                    alt = [] if tops is None else list(zip(tops.indices[t].tolist(), tops.values[t].tolist()))
                    out.append((chosen[t], alt))
                return out

        return self.loop.call(score)

    def token_str(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def completion_logprobs(self, ids: list[int], logprobs: list, offset: int) -> dict:
        tokens = [self.token_str(t) for t in ids]
        offsets, pos = [], offset
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_logprobs": [lp for lp, _ in logprobs],
                "top_logprobs": [None if lp is None else {self.token_str(t): v for t, v in alt}
                                 for lp, alt in logprobs],
                "text_offset": offsets}

    def chat_logprobs(self, ids: list[int], logprobs: list) -> dict:
        def entry(t, v):
            s = self.token_str(t)
            return {"token": s, "logprob": v, "bytes": list(self.tokenizer.decode_bytes([t]))}
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, v) for a, v in alt]}
                            for t, (lp, alt) in zip(ids, logprobs)]}


class RequireKey:
    """Every HTTP route but /health (and CORS preflights) needs `Authorization: Bearer KEY`, compared in constant
    time; else 401 in OpenAI's shape. Plain ASGI: Starlette's BaseHTTPMiddleware would pass every streamed chunk
    through a memory stream, work the event loop does between the engine's steps."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health" and scope["method"] != "OPTIONS":
            header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            given = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                err = APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                               code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="dbrx serve", docs_url=None, redoc_url=None, openapi_url=None)
    cfg = server.config

    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(APIError(e.status_code, msg, code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, e):
        traceback.print_exception(e, file=sys.stderr)
        return JSONResponse(APIError(500, f"internal error: {e!r}").body(), status_code=500)

    if cfg.api_key is not None:
        app.add_middleware(RequireKey, key=cfg.api_key)

    @app.get("/health")
    async def health():
        if server.loop is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not server.loop.alive:
            return JSONResponse({"status": "engine loop stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.loop, cfg.num_slots),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        loop = server.engine_loop()
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "dbrx", "max_model_len": loop.engine.max_model_len}]}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def run(request: Request, chat: bool):
        body = await server.read_json(request)
        server.check_model(body)
        loop = server.engine_loop()
        server.metrics.requests += 1
        t0 = time.perf_counter()
        limit = loop.engine.max_model_len
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise APIError(400, "'messages' must be a non-empty list", "messages")
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                        m.get("role") not in ("system", "user", "assistant"):
                    raise APIError(400, f"messages[{i}] needs a 'role' (system, user or assistant) and text "
                                        "'content'", f"messages[{i}]")
            prompts = [server.tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]}
                                                             for m in messages])]
            echo = False
            want_lp = body.get("logprobs") or False
            if not isinstance(want_lp, bool):
                raise APIError(400, "'logprobs' must be true or false", "logprobs")
            top = _int(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
            logprobs = top if want_lp else None
            default_max = max(1, limit - len(prompts[0]))
            max_tokens = _int(body, "max_completion_tokens", None, 1)
            max_tokens = _int(body, "max_tokens", default_max, 1) if max_tokens is None else max_tokens
        else:
            if "prompt" not in body:
                raise APIError(400, "'prompt' is required", "prompt")
            prompts = server.prompts_of(body["prompt"])
            echo = body.get("echo") or False
            if not isinstance(echo, bool):
                raise APIError(400, "'echo' must be true or false", "echo")
            logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
            max_tokens = _int(body, "max_tokens", 16, 0 if echo else 1)
        params, n, stops = server.sampling(body, prompts, max_tokens, logprobs, chat)
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise APIError(400, "'stream' must be true or false", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "'stream_options' must be an object", "stream_options")
        include_usage = bool(options.get("include_usage"))

        # the prompt's own log-probabilities (echo with logprobs), before any generation is queued
        prompt_lps = None
        if echo and logprobs is not None:
            prompt_lps = [await asyncio.wrap_future(server.prompt_logprobs(p, logprobs)) for p in prompts]

        aloop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        rids, choices = server.start(prompts, params, stops, lambda item: aloop.call_soon_threadsafe(
            events.put_nowait, item))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        prompt_of = [i // n for i in range(len(choices))]
        prompt_texts = [server.tokenizer.decode(p) for p in prompts] if echo else None

        def usage():
            done = sum(len(c.token_ids) for c in choices)
            tokens = sum(map(len, prompts))
            return {"prompt_tokens": tokens, "completion_tokens": done, "total_tokens": tokens + done}

        def logprobs_of(i: int, c: ChoiceText, start: int, offset: int):
            if logprobs is None:
                return None
            ids, lps = c.token_ids[start:], c.logprobs[start:]
            if chat:
                return server.chat_logprobs(ids, lps)
            if echo and start == 0:
                p = prompts[prompt_of[i]]
                ids, lps = p + ids, prompt_lps[prompt_of[i]] + lps
            return server.completion_logprobs(ids, lps, offset)

        if not stream:
            async for _ in server.results(request, rids, choices, events, t0):
                pass
            out_choices = []
            for i, c in enumerate(choices):
                text = c.take()
                if chat:
                    out_choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                        "logprobs": logprobs_of(i, c, 0, 0), "finish_reason": c.finish_reason})
                else:
                    prefix = prompt_texts[prompt_of[i]] if echo else ""
                    out_choices.append({"index": i, "text": prefix + text, "logprobs": logprobs_of(i, c, 0, 0),
                                        "finish_reason": c.finish_reason})
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": cfg.model_name, "choices": out_choices, "usage": usage()}

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i, text, finish, lp):
            if chat:
                choice = {"index": i, "delta": {"content": text} if text or finish is None else {},
                          "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
            out = {"id": rid, "object": obj, "created": created, "model": cfg.model_name, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return out

        async def events_stream():
            sent_tokens = [0] * len(choices)
            offsets = [0] * len(choices)
            if chat:
                for i in range(len(choices)):
                    first = chunk(i, "", None, None)
                    first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                    yield sse(first)
            elif echo:
                for i in range(len(choices)):
                    prefix = prompt_texts[prompt_of[i]]
                    lp = logprobs_of(i, choices[i], 0, 0) if logprobs is not None else None
                    if lp is not None:
                        lp = {k: v[:len(prompts[prompt_of[i]])] for k, v in lp.items()}
                    offsets[i] = len(prefix)
                    yield sse(chunk(i, prefix, None, lp))
            try:
                async for i in server.results(request, rids, choices, events, t0):
                    c = choices[i]
                    text = c.take()
                    lp = None
                    if logprobs is not None and len(c.token_ids) > sent_tokens[i]:
                        if chat:
                            lp = server.chat_logprobs(c.token_ids[sent_tokens[i]:], c.logprobs[sent_tokens[i]:])
                        else:
                            lp = server.completion_logprobs(c.token_ids[sent_tokens[i]:],
                                                            c.logprobs[sent_tokens[i]:], offsets[i])
                    sent_tokens[i] = len(c.token_ids)
                    offsets[i] += len(text)
                    if text or lp or c.done:
                        yield sse(chunk(i, text, c.finish_reason if c.done else None, lp))
                for i, c in enumerate(choices):
                    if max_tokens == 0:
                        yield sse(chunk(i, "", c.finish_reason, None))
            except APIError as e:
                yield sse(e.body())
                yield "data: [DONE]\n\n"
                return
            if include_usage:
                yield sse({"id": rid, "object": obj, "created": created, "model": cfg.model_name, "choices": [],
                           "usage": usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events_stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    return app


# ---- the command -----------------------------------------------------------------------------------------------
def wait_until_healthy(proc, base_url: str, timeout_s: float) -> None:
    """Wait for a `dbrx serve` subprocess to answer /health with 200 (tests, benches, launch scripts). Raises
    RuntimeError with the server's output if it exits first, and kills it if it is not ready in time."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else (proc.stderr.read() if proc.stderr else "")
            raise RuntimeError(f"server exited with status {proc.returncode}: {output}")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):  # not listening yet, or 503 while the model loads
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not become healthy in {timeout_s:g} s")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(args, load_model: Callable, user_error: type[Exception]) -> None:
    """`dbrx serve`: check the safety rules before anything loads, answer /health 503 while the model loads (in
    a thread), then serve until SIGTERM/SIGINT (uvicorn drains in-flight requests first)."""
    import uvicorn

    from dbrx.config import DbrxConfig
    from dbrx.tokenizer import Tokenizer

    api_key = args.api_key or os.environ.get("DBRX_API_KEY") or None
    if not is_loopback(args.host) and api_key is None:
        raise user_error(f"--host {args.host} is reachable from other machines; give --api-key KEY (or set "
                         "DBRX_API_KEY) to serve there, or bind 127.0.0.1")
    if args.max_num_seqs < 1 or args.max_queue < 1:
        raise user_error("--max-num-seqs and --max-queue must be at least 1")
    if args.max_num_batched_tokens < args.max_num_seqs:
        raise user_error(f"--max-num-batched-tokens {args.max_num_batched_tokens} must be at least --max-num-seqs "
                         f"{args.max_num_seqs}, so that every decode fits a step")
    if args.prefill_slowdown and args.prefill_slowdown <= 1:
        raise user_error(f"--prefill-slowdown {args.prefill_slowdown} must be above 1 (a step with a prompt chunk "
                         "is always slower than one without), or 0 to let chunks fill --max-num-batched-tokens")
    config = DbrxConfig.from_pretrained(args.model)  # a missing or broken checkpoint fails here, not in a thread
    if args.max_model_len is not None and not 1 <= args.max_model_len <= config.max_seq_len:
        raise user_error(f"--max-model-len {args.max_model_len} must be between 1 and the model's max_seq_len "
                         f"{config.max_seq_len}")
    name = args.served_model_name or args.model.resolve().name
    server = Server(ServerConfig(name, api_key, args.max_body_bytes, tuple(args.cors_origin or ()),
                                 args.max_num_seqs), Tokenizer())
    app = create_app(server)
    uv = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                       timeout_graceful_shutdown=args.graceful_timeout))
    failure: list[BaseException] = []

    def load():
        try:
            model = load_model(args)
            chosen = use_blocked_head(model, args.max_num_seqs)
            if chosen:
                print(f"dbrx serve: {chosen}", file=sys.stderr, flush=True)
            engine = Engine(model, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                            max_num_batched_tokens=args.max_num_batched_tokens,
                            prefill_slowdown=args.prefill_slowdown)
            loop = EngineLoop(engine, args.max_queue)
            loop.start()
            server.loop = loop
            print(f"dbrx serve: {name} ready on http://{args.host}:{args.port} (max model length "
                  f"{engine.max_model_len}, {args.max_num_seqs} slots)", file=sys.stderr, flush=True)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failure.append(e)
            uv.should_exit = True

    threading.Thread(target=load, name="dbrx-load", daemon=True).start()
    try:
        uv.run()
    finally:
        if server.loop is not None:
            server.loop.stop()
    if failure:
        raise failure[0]
