"""Continuous batching for `dbrx serve`: requests join and leave the running batch between steps.

`generate`'s cache is shared by a batch that starts together (left padding, one slot position for every row), so a
request that arrives later would have to wait for the whole batch. Here each request owns a slot of a `SlotCache`
with its own length: a decode step feeds every running request its last token at its own position, in one forward
(a 4-D mask tells each row which of its slot's keys are real). A prompt is prefilled in chunks under a token budget
per step (`max_num_batched_tokens`, decode tokens counted first), so a long prompt delays the running streams by at
most one budget's worth of work per step. A request is admitted only when a slot is free, and its prompt plus
`max_tokens` must fit the slot, so nothing runs out of cache halfway. A finished or aborted request frees its slot
at once.

Shapes: B rows in a forward, T new tokens per row, S key positions, G kv heads, hd head dim.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

from dbrx.generate import sample
from dbrx.model import DbrxForCausalLM


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
    """One KV slot per request, [layers, slots, G, max_len, hd]. Before a forward, `bind` says which slots its rows
    are and where each row's new tokens go; `update` (called by every attention layer, as KVCache.update is)
    writes them there and returns those slots' keys and values up to the furthest row's end."""

    def __init__(self, model: DbrxForCausalLM, num_slots: int, max_len: int):
        cfg, param = model.config, next(model.parameters())
        shape = (cfg.n_layers, num_slots, cfg.attn_config.kv_n_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self.v = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self.max_len = max_len

    def bind(self, slots: list[int], starts: list[int]) -> None:
        self.slots, self.starts = slots, starts
        self.slots_B = torch.tensor(slots, device=self.k.device)
        self.starts_B = torch.tensor(starts, device=self.k.device)

    def update(self, layer: int, start: int, k_BGTD: torch.Tensor, v_BGTD: torch.Tensor):
        T = k_BGTD.shape[2]
        end = max(self.starts) + T
        if end > self.max_len:
            raise ValueError(f"slot cache holds {self.max_len} positions; writing up to position {end}")
        if T == 1:  # decode: each row's one new key at its own position, in one indexed write
            self.k[layer, self.slots_B, :, self.starts_B] = k_BGTD[:, :, 0]
            self.v[layer, self.slots_B, :, self.starts_B] = v_BGTD[:, :, 0]
        else:
            for r, (slot, s0) in enumerate(zip(self.slots, self.starts)):
                self.k[layer, slot, :, s0:s0 + T] = k_BGTD[r]
                self.v[layer, slot, :, s0:s0 + T] = v_BGTD[r]
        return self.k[layer, self.slots_B, :, :end], self.v[layer, self.slots_B, :, :end]


class Engine:
    """Requests in, tokens out, one `step()` at a time (the server runs steps in a loop of its own)."""

    def __init__(self, model: DbrxForCausalLM, max_num_seqs: int = 8, max_model_len: int | None = None,
                 max_num_batched_tokens: int = 512):
        if max_num_seqs < 1 or max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_seqs ({max_num_seqs}) must be >= 1 and max_num_batched_tokens "
                             f"({max_num_batched_tokens}) at least max_num_seqs, so that every decode fits a step")
        self.model = model.eval()
        self.max_model_len = min(max_model_len or model.config.max_seq_len, model.config.max_seq_len)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.cache = SlotCache(model, max_num_seqs, self.max_model_len)
        self.free = list(range(max_num_seqs))
        self.waiting: collections.deque[_Request] = collections.deque()
        self.running: dict[str, _Request] = {}  # in arrival order
        self.device = next(model.parameters()).device

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
        """Admit what fits, decode one token for every running request that has one pending, then prefill prompt
        chunks (oldest first) with what is left of the token budget."""
        while self.waiting and self.free:
            request = self.waiting.popleft()
            request.slot = self.free.pop(0)
            self.running[request.id] = request
        outputs: dict[str, Output] = {}
        budget = self.max_num_batched_tokens
        decoding = [r for r in self.running.values() if r.pending is not None]
        if decoding:
            logits_BV = self._forward(decoding, [[r.pending] for r in decoding])
            for r, logits_V in zip(decoding, logits_BV):
                r.cached += 1
                self._sample(r, logits_V, outputs)
            budget -= len(decoding)
        for r in [r for r in self.running.values() if r.cached < len(r.prompt)]:
            if budget <= 0:
                break
            chunk = r.prompt[r.cached:r.cached + budget]
            logits_BV = self._forward([r], [chunk])
            r.cached += len(chunk)
            budget -= len(chunk)
            if r.cached == len(r.prompt):
                self._sample(r, logits_BV[0], outputs)
        return list(outputs.values())

    def _forward(self, requests: list[_Request], tokens: list[list[int]]) -> torch.Tensor:
        """Each row's tokens at its slot's next positions; the logits after each row's last token [B, V]."""
        T = len(tokens[0])
        assert all(len(t) == T for t in tokens), "rows of one forward have the same length (decode: 1)"
        starts = [r.cached for r in requests]
        S = max(starts) + T
        ids_BT = torch.tensor(tokens, device=self.device)
        positions_BT = torch.tensor(starts, device=self.device)[:, None] + torch.arange(T, device=self.device)
        # row r's query t sees its slot's keys 0 .. starts[r] + t: its own history, never stale or padding slots
        mask_BTS = torch.arange(S, device=self.device)[None, None, :] <= positions_BT[:, :, None]
        self.cache.bind([r.slot for r in requests], starts)
        out = self.model(ids_BT, attention_mask=mask_BTS[:, None], position_ids=positions_BT, cache=self.cache,
                         last_only=True)
        return out.logits[:, -1].float()

    def _sample(self, r: _Request, logits_V: torch.Tensor, outputs: dict[str, Output]) -> None:
        p = r.params
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
