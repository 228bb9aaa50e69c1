"""Continuous batching for `dbrx serve`: requests join and leave the running batch between steps.

`generate`'s cache is shared by a batch that starts together (left padding, one slot position for every row), so a
request that arrives later would have to wait for the whole batch. Here each request owns a slot of a `SlotCache`
with its own length. A step is one forward over one packed row: every decoding request's last token at its own
position, then prompt chunks; the linear layers and experts see all of them at once (the weights are read once
per step), and the cache attends each request against its own slot. Prompts are prefilled in chunks under a token
budget per step (`max_num_batched_tokens`, decode tokens counted first); while requests decode, the chunk is sized
by measured step times so that a long prompt slows the running streams by a bounded factor. A request is admitted
only when a slot is free, and its prompt plus `max_tokens` must fit the slot, so nothing runs out of cache
halfway. A finished or aborted request frees its slot at once.

Shapes: N tokens in a step's row, D of them decoding, R rows of logits, S key positions, G kv heads, H query
heads, hd head dim.
"""

from __future__ import annotations

import collections
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dbrx.generate import greedy, sample
from dbrx.model import DbrxForCausalLM, causal_mask
from dbrx.placement import layer_devices


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # a request's own generator: the same tokens whatever shares its batch
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the top k


@dataclass
class Output:
    """What one step produced for one request. A stop token ends the request and is not in `token_ids`."""
    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    slot: int = -1
    cached: int = 0  # tokens of prompt + output already in the slot's cache
    pending: int | None = None  # the last sampled token, fed at the next decode step
    produced: int = 0


class SlotCache:
    """One KV slot per request, per layer [slots, G, max_len, hd] on that layer's device. A step's forward takes one
    row that packs the decoding requests' tokens (one each, first) and then the prompt chunks; `bind` says whose
    they are. Each attention layer then calls `attend`, which writes the new keys and values into their slots and
    attends the decoding tokens as a batch (each row against its own slot, a mask per row) and each chunk against
    its own slot (causal from its offset). No row attends another request's keys, so no work grows with the
    product of slots and lengths."""

    def __init__(self, model: DbrxForCausalLM, num_slots: int, max_len: int):
        cfg, param = model.config, next(model.parameters())
        shape = (num_slots, cfg.attn_config.kv_n_heads, max_len, cfg.head_dim)
        devices = layer_devices(model)  # each layer's slots live with its block
        self.k = [torch.zeros(shape, dtype=param.dtype, device=d) for d in devices]
        self.v = [torch.zeros(shape, dtype=param.dtype, device=d) for d in devices]
        self.devices = list(dict.fromkeys(devices))
        self.max_len = max_len

    def bind(self, decode: list[tuple[int, int]], chunks: list[tuple[int, int, int]]) -> None:
        """decode: (slot, position) of each decoding token, the row's first len(decode) tokens; chunks: (slot,
        start, length) of each prompt chunk that follows, in order."""
        for slot, start, n in [(s, p, 1) for s, p in decode] + chunks:
            if start + n > self.max_len:
                raise ValueError(f"slot cache holds {self.max_len} positions; writing up to position {start + n}")
        self.decode, self.chunks = decode, chunks
        self.index: dict[torch.device, tuple] = {}  # per device: (slots_D, positions_D, mask_D11S, chunk masks)
        self.decode_end = max((p for _, p in decode), default=-1) + 1
        for device in self.devices:
            # chunk c's query t sees its slot's keys 0 .. start + t (causal from its offset; plain causal from 0)
            chunk_masks = [None if start == 0 else causal_mask(None, start, n, device) for _, start, n in chunks]
            slots_D = torch.tensor([s for s, _ in decode], device=device)
            positions_D = torch.tensor([p for _, p in decode], device=device)
            # decoding row d sees its slot's keys 0 .. positions[d]: its own history, never stale positions
            mask_D11S = (torch.arange(self.decode_end, device=device) <= positions_D[:, None])[:, None, None]
            self.index[device] = slots_D, positions_D, mask_D11S, chunk_masks

    def attend(self, layer: int, q_1HNd, k_1GNd, v_1GNd, sdpa) -> torch.Tensor:
        """Store the row's new keys/values in their slots and return the attention output [1, H, N, hd];
        `sdpa(q, k, v, mask, causal)` is the layer's attention (its dtype and grouped heads)."""
        o_1HNd = torch.empty_like(q_1HNd)
        k_cache, v_cache = self.k[layer], self.v[layer]
        slots_D, positions_D, mask_D11S, chunk_masks = self.index[k_cache.device]
        D = len(self.decode)
        if D:
            k_cache[slots_D, :, positions_D] = k_1GNd[0, :, :D].transpose(0, 1)
            v_cache[slots_D, :, positions_D] = v_1GNd[0, :, :D].transpose(0, 1)
            keys_DGSd, values_DGSd = k_cache[slots_D, :, :self.decode_end], v_cache[slots_D, :, :self.decode_end]
            q_DH1d = q_1HNd[0, :, :D].transpose(0, 1)[:, :, None]
            o_1HNd[0, :, :D] = sdpa(q_DH1d, keys_DGSd, values_DGSd, mask_D11S, False)[:, :, 0].transpose(0, 1)
        offset = D
        for (slot, start, n), mask in zip(self.chunks, chunk_masks):
            end = start + n
            k_cache[slot, :, start:end] = k_1GNd[0, :, offset:offset + n]
            v_cache[slot, :, start:end] = v_1GNd[0, :, offset:offset + n]
            o_1HNd[:, :, offset:offset + n] = sdpa(q_1HNd[:, :, offset:offset + n], k_cache[slot, :, :end][None],
                                                   v_cache[slot, :, :end][None], mask, start == 0 and n > 1)
            offset += n
        return o_1HNd


MIN_CHUNK = 16
"""The smallest prompt chunk a step prefills while requests decode: a prompt always moves forward."""


class Engine:
    """Requests in, tokens out, one `step()` at a time (the server runs steps in a loop of its own).

    While requests decode, the prompt chunk of a step is sized by measurement so that the step takes about
    `prefill_slowdown` times a decode-only step with the same number of decoding requests: the streams' inter-token
    latency stays bounded while a long prompt is prefilled. With nobody decoding, chunks fill the token budget.
    `prefill_slowdown=0` turns the sizing off (chunks always fill the budget)."""

    def __init__(self, model: DbrxForCausalLM, max_num_seqs: int = 8, max_model_len: int | None = None,
                 max_num_batched_tokens: int = 512, prefill_slowdown: float = 2.5,
                 clock: Callable[[], float] = time.perf_counter):
        if max_num_seqs < 1 or max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_seqs ({max_num_seqs}) must be >= 1 and max_num_batched_tokens "
                             f"({max_num_batched_tokens}) at least max_num_seqs, so that every decode fits a step")
        if prefill_slowdown and prefill_slowdown <= 1:
            raise ValueError(f"prefill_slowdown must be above 1 (or 0: off), got {prefill_slowdown}")
        self.model = model.eval()
        self.max_model_len = min(max_model_len or model.config.max_seq_len, model.config.max_seq_len)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.cache = SlotCache(model, max_num_seqs, self.max_model_len)
        self.free = list(range(max_num_seqs))
        self.waiting: collections.deque[_Request] = collections.deque()
        self.running: dict[str, _Request] = {}  # in arrival order
        self.device = next(model.parameters()).device
        self.prefill_slowdown = prefill_slowdown
        self.clock = clock
        # the prompt chunk while requests decode, by their number (what a step may add depends on what it reads)
        self.chunk_tokens: dict[int, int] = {}
        # the last decode-only step times by the number of decoding requests; their median is the reference (a
        # step that met a first-time kernel or a busy machine does not skew it)
        self.decode_seconds: dict[int, collections.deque[float]] = {}

    # ---- requests ---------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.running or any(r.id == request_id for r in self.waiting):
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise ValueError("the prompt holds no tokens")
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {params.max_tokens}")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"the prompt's {len(prompt_ids)} tokens + max_tokens {params.max_tokens} = "
                             f"{len(prompt_ids) + params.max_tokens} exceed the model length {self.max_model_len}")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        self.waiting.append(_Request(request_id, list(prompt_ids), params, generator))

    def abort(self, request_id: str) -> bool:
        """Drop a request (a client that went away); its slot is free at once. False if it is unknown."""
        for r in self.waiting:
            if r.id == request_id:
                self.waiting.remove(r)
                return True
        request = self.running.pop(request_id, None)
        if request is None:
            return False
        self.free.append(request.slot)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def slots_in_use(self) -> int:
        return len(self.running)

    # ---- one step ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Output]:
        """Admit what fits, then one forward: a token for every running request that has one pending, and prompt
        chunks (oldest first) with what is left of the token budget."""
        while self.waiting and self.free:
            request = self.waiting.popleft()
            request.slot = self.free.pop(0)
            self.running[request.id] = request
        decoding = [r for r in self.running.values() if r.pending is not None]
        budget = self.max_num_batched_tokens - len(decoding)
        if decoding and self.prefill_slowdown:
            budget = min(budget, self._learned(self.chunk_tokens, len(decoding), MIN_CHUNK))
        chunks: list[tuple[_Request, list[int]]] = []
        for r in self.running.values():
            if budget <= 0:
                break
            if r.cached < len(r.prompt):
                chunks.append((r, r.prompt[r.cached:r.cached + budget]))
                budget -= len(chunks[-1][1])
        if not decoding and not chunks:
            return []
        started = self.clock()
        logits_RV = self._forward(decoding, chunks)
        outputs: dict[str, Output] = {}
        for r in decoding:
            r.cached += 1
        for r, chunk in chunks:
            r.cached += len(chunk)
        sampled = decoding + [r for r, _ in chunks if r.cached == len(r.prompt)]
        tokens = greedy(logits_RV).tolist()  # every greedy row's token in one call
        for r, logits_V, token in zip(sampled, logits_RV, tokens):
            self._sample(r, logits_V, outputs, token if r.params.temperature <= 0 else None)
        self._size_chunk(len(decoding), sum(len(c) for _, c in chunks), self.clock() - started)
        return list(outputs.values())

    def _forward(self, decoding: list[_Request], chunks: list[tuple[_Request, list[int]]]) -> torch.Tensor:
        """One row: each decoding request's pending token at its position, then each chunk at its positions.
        Returns the logits [R, V] after each decoding token and after each chunk that ends its prompt."""
        ids, positions, rows = [r.pending for r in decoding], [r.cached for r in decoding], list(range(len(decoding)))
        for r, chunk in chunks:
            ids += chunk
            positions += range(r.cached, r.cached + len(chunk))
            if r.cached + len(chunk) == len(r.prompt):
                rows.append(len(ids) - 1)
        self.cache.bind([(r.slot, r.cached) for r in decoding], [(r.slot, r.cached, len(c)) for r, c in chunks])
        h_1ND, _ = self.model.hidden_states(torch.tensor([ids], device=self.device), cache=self.cache,
                                            position_ids=torch.tensor([positions], device=self.device))
        return self.model.lm_head(h_1ND[0, rows]).float()

    @staticmethod
    def _learned(table: dict, decoding: int, default):
        """What was learned for this many decoding requests, else for the nearest smaller number (a smaller
        batch's decode step is shorter, so its chunk is the cautious guess), else `default`."""
        known = [b for b in table if b <= decoding]
        return table[max(known)] if known else default

    def _size_chunk(self, decoding: int, prefilled: int, seconds: float) -> None:
        """Learn from a step's time, per number of decoding requests: recent decode-only step times, and from a
        step that also prefilled a full chunk, the chunk that would make such a step take `prefill_slowdown` times
        the decode-only one (moving at most 2x per step; never below MIN_CHUNK). A number not seen yet borrows
        from the nearest smaller one."""
        if not decoding or not self.prefill_slowdown:
            return
        if not prefilled:
            self.decode_seconds.setdefault(decoding, collections.deque(maxlen=15)).append(seconds)
            return
        recent = self._learned(self.decode_seconds, decoding, None)
        chunk = self._learned(self.chunk_tokens, decoding, MIN_CHUNK)
        if not recent or prefilled < chunk:  # no reference yet, or a prompt's short last chunk
            return
        base = statistics.median(recent)
        want, extra = (self.prefill_slowdown - 1) * base, seconds - base
        scale = 2.0 if extra <= 0 else min(2.0, max(0.5, want / extra))
        cap = self.max_num_batched_tokens - decoding
        self.chunk_tokens[decoding] = max(min(MIN_CHUNK, cap), min(cap, round(chunk * scale)))

    def _sample(self, r: _Request, logits_V: torch.Tensor, outputs: dict[str, Output], token: int | None) -> None:
        """Take the request's next token (`token` when already chosen greedily, else sampled with its own
        generator) into its output; finish it on a stop id or at max_tokens."""
        p = r.params
        if token is None:
            token = int(sample(logits_V[None], p.temperature, p.top_k, p.top_p, r.generator)[0])
        out = outputs.setdefault(r.id, Output(r.id, []))
        r.produced += 1
        if token in p.stop_token_ids:
            out.finished, out.finish_reason = True, "stop"
        else:
            out.token_ids.append(token)
            if p.logprobs is not None:
                logp_V = torch.log_softmax(logits_V, dim=-1)
                top = logp_V.topk(p.logprobs) if p.logprobs > 0 else None
                alternatives = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))
                out.logprobs.append((float(logp_V[token]), alternatives))
            if r.produced >= p.max_tokens:
                out.finished, out.finish_reason = True, "length"
        if out.finished:
            del self.running[r.id]
            self.free.append(r.slot)
        else:
            r.pending = token
