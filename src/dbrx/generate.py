"""Generation: a preallocated KV cache, one prefill, then one-token decode steps; greedy or sampled.

A batch of prompts of different lengths is left-padded: every row's last prompt token sits at the same slot,
so one decode step serves the whole batch; the attention mask hides the padding and positions restart at each
row's first real token (as transformers does), so each row generates what it would alone.
"""

from __future__ import annotations

import codecs
import warnings
from collections.abc import Iterator, Sequence

import torch

from dbrx.model import DbrxForCausalLM, KVCache
from dbrx.placement import layer_devices


def prefill(model: DbrxForCausalLM, ids_BT: torch.Tensor, cache: KVCache, mask_BT: torch.Tensor | None):
    """Run the whole prompt, fill the cache, return the logits of the last position [B, V]."""
    return model(ids_BT, attention_mask=mask_BT, cache=cache, start_pos=0, last_only=True).logits[:, -1]


def decode_one_token(model: DbrxForCausalLM, ids_B: torch.Tensor, cache: KVCache, pos: int,
                     mask_BS: torch.Tensor | None):
    """One new token per row at slot `pos`; returns its logits [B, V]. A compiled step (dbrx.kernels.compile_decode)
    runs it where it takes it."""
    step = getattr(model, "decode_step", None)
    if step is not None and step.takes(ids_B, cache, pos, mask_BS):
        return step(ids_B, cache, pos)
    return model(ids_B[:, None], attention_mask=mask_BS, cache=cache, start_pos=pos).logits[:, -1]


GREEDY_CHUNK = 1024


def greedy(logits_BV: torch.Tensor) -> torch.Tensor:
    """logits_BV.argmax(-1), the first of equal maxima (and the first NaN, as argmax). On the CPU, torch's argmax
    runs on one thread without vectors: 0.2 ms over DBRX's 100k logits in fp32 and 0.45 ms in bf16 on the Xeon
    measured, 1-2.5% of a decode step. Here the maxima of 1024-wide chunks (a vectorised reduction) pick the first
    chunk that holds the maximum, and argmax runs within it: 4-7x less time there."""
    if logits_BV.ndim != 2 or logits_BV.device.type != "cpu" or logits_BV.shape[-1] < 8 * GREEDY_CHUNK or \
            logits_BV.shape[0] == 0:  # no rows: a serve step that only prefilled
        return logits_BV.argmax(dim=-1)
    B, V = logits_BV.shape
    full = V - V % GREEDY_CHUNK
    max_BC = logits_BV[:, :full].reshape(B, -1, GREEDY_CHUNK).amax(-1)
    if full < V:
        max_BC = torch.cat([max_BC, logits_BV[:, full:].amax(-1, keepdim=True)], dim=-1)
    start_B = max_BC.argmax(dim=-1) * GREEDY_CHUNK
    # the chunk's window; the last chunk's is clamped to the vocabulary, repeating its last logit after itself
    # (a repeat never comes first)
    window_BW = (start_B[:, None] + torch.arange(GREEDY_CHUNK, device=logits_BV.device)).clamp_(max=V - 1)
    return start_B + logits_BV.gather(-1, window_BW).argmax(dim=-1)


def sample(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy when temperature == 0; otherwise softmax(logits / temperature) restricted to the top_k tokens
    and to the smallest set whose probability reaches top_p."""
    if temperature <= 0:
        return greedy(logits_BV)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits_BV.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # keep tokens until the mass before them reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _as_prompts(input_ids) -> tuple[list[list[int]], bool]:
    """-> (prompts, single): accepts a list of ids, a list of lists, or a tensor [T] / [B, T]."""
    if isinstance(input_ids, torch.Tensor):
        single = input_ids.ndim == 1
        rows = input_ids[None] if single else input_ids
        return [r.tolist() for r in rows], single
    input_ids = list(input_ids)
    if input_ids and all(isinstance(i, int) for i in input_ids):
        return [input_ids], True
    return [list(map(int, r)) for r in input_ids], False


def stream_generate(model: DbrxForCausalLM, input_ids, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop_token_ids: Sequence[int] | None = None) -> Iterator[list[int | None]]:
    """Yield, after each step, the new token of every row (None for rows that have already stopped)."""
    prompts, _ = _as_prompts(input_ids)
    cfg = model.config
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    lens = [len(p) for p in prompts]
    T = max(lens)
    if T + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt of {T} tokens + max_new_tokens {max_new_tokens} = {T + max_new_tokens} tokens exceeds the "
            f"model's max_seq_len of {cfg.max_seq_len}; shorten the prompt or ask for fewer new tokens"
        )
    bad = [i for p in prompts for i in p if not 0 <= i < cfg.vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the model's vocabulary (0..{cfg.vocab_size - 1})")
    if max_new_tokens == 0:
        return

    param = next(model.parameters())
    device, B = param.device, len(prompts)
    ids_BT = torch.zeros(B, T, dtype=torch.long, device=device)
    mask_BS = torch.zeros(B, T + max_new_tokens, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids_BT[b, T - len(p):] = torch.tensor(p, device=device)
        mask_BS[b, T - len(p):] = 1
    padded = min(lens) < T
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stops = torch.tensor(sorted(set(stop_token_ids or ())), dtype=torch.long, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache(cfg, B, T + max_new_tokens, model.compute_dtype or param.dtype,
                    layer_devices(model))  # each block's own device
    if getattr(model, "decode_step", None) is not None and not model.decode_step.current(model):
        warnings.warn("the model changed after dbrx.kernels.compile_decode (modules or weights replaced); its "
                      "compiled decode step is dropped and decoding runs eagerly: call compile_decode again",
                      stacklevel=2)
        model.decode_step = None

    with torch.inference_mode():
        logits_BV = prefill(model, ids_BT, cache, mask_BS[:, :T] if padded else None)
        for step in range(max_new_tokens):
            next_B = sample(logits_BV, temperature, top_k, top_p, generator)
            yield [None if d else t for t, d in zip(next_B.tolist(), done_B.tolist())]
            done_B |= torch.isin(next_B, stops)
            if step + 1 == max_new_tokens or bool(done_B.all()):
                return
            pos = T + step
            logits_BV = decode_one_token(model, next_B, cache, pos, mask_BS[:, : pos + 1] if padded else None)


def generate(model: DbrxForCausalLM, input_ids, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_token_ids: Sequence[int] | None = None):
    """Generated ids (without the prompt), ending with the stop token when one was produced.

    `input_ids`: one prompt (list of ids or 1-D tensor) -> list[int]; several (list of lists, or [B, T]) ->
    list[list[int]]."""
    prompts, single = _as_prompts(input_ids)
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream_generate(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids):
        for row, tok in zip(out, step):
            if tok is not None:
                row.append(tok)
    return out[0] if single else out


class TextStreamer:
    """Turns a stream of token ids into text pieces, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.decoder.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
