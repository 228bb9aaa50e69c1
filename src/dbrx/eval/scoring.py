"""Log-likelihood of continuations, as the ICL metrics need it: per (context, continuation) pair, the sum of the
continuation tokens' log-probabilities, their count, and whether each was the greedy token.

Unlike Foundry (which pads every row to max_seq_len) and lm-eval (which computes the vocabulary head at every
position, and runs a shared context once per choice), the pairs of one question go in one row: their common prefix
(the context, few-shot examples included) once, then each choice's remaining tokens, each attending to the prefix
and to itself only, with positions continuing from the prefix (a tree mask). Rows are sorted by length and
batched with right padding to the batch's longest row only, and the vocabulary head is applied only at the
positions that predict a continuation token. A row never sees another row or the padding after it, so its scores
do not depend on its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


@dataclass
class Score:
    logprob: float  # sum over the continuation's tokens (natural log)
    tokens: int
    greedy: bool  # every continuation token was the argmax


@dataclass
class _Packed:
    """One row: the group's common prefix, then each sequence's rest (a branch)."""
    ids: list[int]
    positions: list[int]
    branch: list[int]  # -1 for the shared prefix, else the sequence the token belongs to
    prefix: int
    offsets: list[int]  # where each sequence's rest starts in the row

    def index(self, seq: int, position: int) -> int:
        """Where the token at `position` of sequence `seq` sits in the row."""
        return position if position < self.prefix else self.offsets[seq] + position - self.prefix


def _pack(group: list[Pair]) -> _Packed:
    seqs = [ctx + cont[:-1] for ctx, cont in group]  # a continuation's last token is only predicted, never read
    prefix = min(len(s) for s in seqs)
    for s in seqs[1:]:
        prefix = next((i for i in range(prefix) if s[i] != seqs[0][i]), prefix)
    ids, positions, branch = list(seqs[0][:prefix]), list(range(prefix)), [-1] * prefix
    offsets = []
    for i, s in enumerate(seqs):
        offsets.append(len(ids))
        ids += s[prefix:]
        positions += range(prefix, len(s))
        branch += [i] * (len(s) - prefix)
    return _Packed(ids, positions, branch, prefix, offsets)


def _rows(groups: list[list[Pair]]) -> list[tuple[int, list[int], _Packed]]:
    """(group, its pairs in the row, the row): a group in one row when its pairs share at least half of the
    shortest one (a question's context); otherwise (contexts cut from the left to different lengths, say)
    each pair alone, since a long row of unshared branches would cost more attention than separate rows."""
    rows = []
    for g, group in enumerate(groups):
        packed = _pack(group)
        if len(group) == 1 or 2 * packed.prefix >= min(len(c) + len(t) - 1 for c, t in group):
            rows.append((g, list(range(len(group))), packed))
        else:
            rows += [(g, [j], _pack([pair])) for j, pair in enumerate(group)]
    return rows


@torch.no_grad()
def score_groups(model, groups: list[list[Pair]], batch_size: int, progress=None) -> list[list[Score]]:
    """Scores per group, in the order of `groups` (a group: the pairs of one question, sharing a context or
    part of one). `batch_size` counts rows (about one per group); `progress(n)` is called with the number of
    rows done after each batch."""
    device = model.transformer.wte.weight.device
    for group in groups:
        if any(len(ctx) == 0 for ctx, _ in group):
            raise ValueError("a pair has an empty context: the first continuation token has nothing to follow")
    rows = sorted(_rows(groups), key=lambda row: -len(row[2].ids))
    out: list[list[Score | None]] = [[None] * len(group) for group in groups]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(packed.ids) for _, _, packed in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        positions = torch.zeros(len(chunk), width, dtype=torch.long)
        branch = torch.full((len(chunk), width), -2, dtype=torch.long)  # -2: padding
        for r, (_, _, packed) in enumerate(chunk):
            n = len(packed.ids)
            ids[r, :n] = torch.tensor(packed.ids)
            positions[r, :n] = torch.tensor(packed.positions)
            positions[r, n:] = packed.positions[-1]
            branch[r, :n] = torch.tensor(packed.branch)
        mask = None
        if any(len(seqs) > 1 for _, seqs, _ in chunk):
            # query q sees key k <= q in the shared prefix or in its own branch; padding sees itself only
            causal_TT = torch.ones(width, width, dtype=torch.bool).tril()
            same_BTT = (branch[:, None, :] == -1) | (branch[:, None, :] == branch[:, :, None])
            mask = (causal_TT & same_BTT | torch.eye(width, dtype=torch.bool))[:, None].to(device)
        h_BTD, _ = model.hidden_states(ids.to(device), attention_mask=mask,
                                       position_ids=positions.to(device) if mask is not None else None)
        # for each continuation token, the row and column of the position that predicts it
        rows_i, cols, targets = [], [], []
        for r, (g, seqs, packed) in enumerate(chunk):
            for b, j in enumerate(seqs):
                ctx, cont = groups[g][j]
                rows_i += [r] * len(cont)
                cols += [packed.index(b, p) for p in range(len(ctx) - 1, len(ctx) + len(cont) - 1)]
                targets += cont
        logits = model.lm_head(h_BTD[torch.tensor(rows_i, device=device), torch.tensor(cols, device=device)]).float()
        target_t = torch.tensor(targets, device=device)
        token_lp = torch.log_softmax(logits, dim=-1).gather(1, target_t[:, None])[:, 0]
        hit = logits.argmax(-1) == target_t
        at = 0
        for g, seqs, _ in chunk:
            for j in seqs:
                n = len(groups[g][j][1])
                out[g][j] = Score(token_lp[at:at + n].sum().item(), n, bool(hit[at:at + n].all()))
                at += n
        if progress is not None:
            progress(len(chunk))
    return out  # type: ignore[return-value]


def score_pairs(model, pairs: list[Pair], batch_size: int, progress=None) -> list[Score]:
    """Each pair on its own (no sharing): scores in the order of `pairs`."""
    return [g[0] for g in score_groups(model, [[p] for p in pairs], batch_size, progress)]


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
