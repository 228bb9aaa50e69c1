"""Log-likelihood of continuations, as the ICL metrics need it: per (context, continuation) pair, the sum of the
continuation tokens' log-probabilities, their count, and whether each was the greedy token.

Unlike Foundry (which pads every row to max_seq_len) and lm-eval (which computes the vocabulary head at every
position), the pairs are sorted by length, batched with right padding to the batch's longest row only, and the head
is applied only at the positions that predict a continuation token. Right padding needs no attention mask: causal
attention never lets a real token see the padding after it, so a row's scores do not depend on its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Score:
    logprob: float  # sum over the continuation's tokens (natural log)
    tokens: int
    greedy: bool  # every continuation token was the argmax


@torch.no_grad()
def score_pairs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int,
                progress=None) -> list[Score]:
    """Scores in the order of `pairs`. `progress(n)` is called with the number of pairs done after each batch."""
    device = model.lm_head.weight.device
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[Score | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        seqs = [pairs[i][0] + pairs[i][1] for i in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        h_BTD, _ = model.hidden_states(ids.to(device))
        # positions whose next token is a continuation token: context_len - 1 .. len - 2
        rows, cols, targets = [], [], []
        for r, i in enumerate(chunk):
            ctx, cont = pairs[i]
            first = len(ctx) - 1
            rows += [r] * len(cont)
            cols += range(first, first + len(cont))
            targets += cont
        rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
        if (cols_t < 0).any():
            raise ValueError("a pair has an empty context: the first continuation token has nothing to follow")
        logits = model.lm_head(h_BTD[rows_t, cols_t]).float()
        logp = torch.log_softmax(logits, dim=-1)
        target_t = torch.tensor(targets, device=device)
        token_lp = logp.gather(1, target_t[:, None])[:, 0]
        hit = logits.argmax(-1) == target_t
        at = 0
        for i in chunk:
            n = len(pairs[i][1])
            out[i] = Score(token_lp[at:at + n].sum().item(), n, bool(hit[at:at + n].all()))
            at += n
        if progress is not None:
            progress(len(chunk))
    return out  # type: ignore[return-value]


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                   stop_strings: list[str] | None, stop_token_ids: list[int], progress=None) -> list[str]:
    """Greedy continuations (KV cache, left-padded batches sorted by length), each ended at a stop token, or once
    its text holds a stop string (the batch ends when every row has), or after max_new_tokens; decoded without
    special tokens."""
    from dbrx.generate import stream_generate

    stops = [s for s in stop_strings or [] if s]
    look = max((len(tokenizer.encode(s)) for s in stops), default=0) + 1  # tokens a stop string can span
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        for step in stream_generate(model, [prompts[i] for i in chunk], max_new_tokens, stop_token_ids=stop_token_ids):
            for r, token in enumerate(step):
                if token is None:
                    done[r] = True
                elif not done[r]:
                    ids[r].append(token)
                    if token in stop_token_ids or (stops and any(s in tokenizer.decode(ids[r][-look:]) for s in stops)):
                        done[r] = True
            if all(done):
                break
        for r, i in enumerate(chunk):
            out[i] = tokenizer.decode(ids[r], skip_special=True)
        if progress is not None:
            progress(len(chunk))
    return out
