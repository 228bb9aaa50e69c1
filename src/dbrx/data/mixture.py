"""Pretraining batches from a mix of MDS streams whose proportions may change during training (curriculum).

Everything is a pure function of (seed, state): which stream fills each sample slot, and which sample of that
stream comes next. The state is a small JSON-able dict saved in every checkpoint, so a resumed run sees exactly
the batches it would have seen.

Within a phase, sample slot j goes to the stream whose share is furthest behind its proportion (largest
deficit proportion*(j+1) - served), so every prefix of the phase matches the proportions to within one sample.
Each stream walks a fresh permutation of its samples every epoch.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dbrx.data.mds import MDSReader
from dbrx.train.config import ConfigError, Time

IGNORE_INDEX = -100


@dataclass
class Stream:
    name: str
    reader: MDSReader
    proportion: float


@dataclass
class Phase:
    streams: list[Stream]
    duration: Time | None  # None: the last phase runs until the end of training

    def samples(self) -> int:
        return sum(len(s.reader) for s in self.streams)


def stream_specs(dataset: dict) -> dict[str, dict]:
    """`dataset.streams`, or the dataset's own local/remote as one stream named "default"."""
    return dataset.get("streams") or {"default": {k: dataset.get(k) for k in ("local", "remote")}}


def open_reader(spec: dict, split: str | None, where: str, name: str) -> MDSReader:
    """One stream's MDS reader: `local` (a directory) and/or `remote` (a directory or fsspec URL); a stream's own
    `split` wins over the dataset's."""
    local, remote = spec.get("local"), spec.get("remote")
    if local is None and remote is None:
        raise ConfigError(f"{where}: needs 'local' (a directory) or 'remote'")
    if local is None:  # a local remote needs no cache; a real remote gets one beside the run
        local = remote if "://" not in str(remote) else str(Path(".cache") / "mds" / name)
    try:
        return MDSReader(local, remote=remote if remote != local else None, split=spec.get("split", split))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def open_streams(dataset: dict, where: str) -> list[Stream]:
    """`dataset: {local, remote, split}` (one stream) or `dataset: {streams: {name: {local, remote, split,
    proportion}}}`; proportions are normalised to sum to 1."""
    streams = []
    for name, spec in stream_specs(dataset).items():
        proportion = spec.get("proportion", 1.0)
        if proportion <= 0:
            raise ConfigError(f"{where}.streams.{name}.proportion must be > 0, got {proportion}")
        reader = open_reader(spec, dataset.get("split"), f"{where}.streams.{name}", name)
        if len(reader) == 0:
            raise ConfigError(f"{where}.streams.{name}: the dataset at {reader.local} has no samples")
        streams.append(Stream(name, reader, float(proportion)))
    total = sum(s.proportion for s in streams)
    for s in streams:
        s.proportion /= total
    return streams


class MixtureLoader:
    """Global batches of [batch_size, seq_len] token windows (input_ids and labels, unshifted)."""

    def __init__(self, phases: list[Phase], batch_size: int, seq_len: int, seed: int, shuffle: bool = True,
                 pad_id: int = 0):
        self.phases, self.batch_size, self.seq_len = phases, batch_size, seq_len
        self.seed, self.shuffle, self.pad_id = seed, shuffle, pad_id
        self._perms: dict[tuple[str, int], np.ndarray] = {}
        self.state = {"phase": 0, "phase_start_tokens": 0, "tokens": 0, "samples": 0,
                      "served": {}, "cursor": {}}

    # ---- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        self.state = {k: (dict(v) if isinstance(v, dict) else v) for k, v in state.items()}

    @property
    def phase(self) -> Phase:
        return self.phases[self.state["phase"]]

    def phase_end_tokens(self, index: int) -> float | None:
        phase = self.phases[index]
        if phase.duration is None:
            return None
        if phase.duration.unit == "tok":
            return phase.duration.value
        if phase.duration.unit == "ep":
            return phase.duration.value * phase.samples() * self.seq_len
        if phase.duration.unit == "sp":
            return phase.duration.value * self.seq_len
        return phase.duration.value * self.batch_size * self.seq_len  # "ba"

    # ---- sampling -------------------------------------------------------------------------------------------
    def _permutation(self, stream: Stream, epoch: int) -> np.ndarray:
        key = (stream.name, epoch)
        if key not in self._perms:
            n = len(stream.reader)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, zlib.crc32(stream.name.encode()), epoch])
                self._perms = {k: v for k, v in self._perms.items() if k[0] != stream.name}  # keep one epoch
                self._perms[key] = rng.permutation(n)
            else:
                self._perms[key] = np.arange(n)
        return self._perms[key]

    def _next_stream(self) -> Stream:
        served = self.state["served"]
        j = sum(served.get(s.name, 0) for s in self.phase.streams)
        best = max(self.phase.streams, key=lambda s: s.proportion * (j + 1) - served.get(s.name, 0))
        served[best.name] = served.get(best.name, 0) + 1
        return best

    def _next_sample(self, stream: Stream) -> np.ndarray:
        epoch, pos = self.state["cursor"].get(stream.name, (0, 0))
        perm = self._permutation(stream, epoch)
        sample = stream.reader[int(perm[pos])]
        pos += 1
        if pos == len(perm):
            epoch, pos = epoch + 1, 0
        self.state["cursor"][stream.name] = (epoch, pos)
        if "tokens" in sample:
            return np.asarray(sample["tokens"])
        raise ConfigError(f"stream {stream.name!r}: samples need a 'tokens' column (convert text with "
                          f"`dbrx convert text`), found {sorted(sample)}")

    def next_batch(self) -> dict:
        end = self.phase_end_tokens(self.state["phase"])
        if end is not None and self.state["tokens"] - self.state["phase_start_tokens"] >= end:
            if self.state["phase"] + 1 < len(self.phases):
                self.state.update(phase=self.state["phase"] + 1, phase_start_tokens=self.state["tokens"], served={})
        rows, names = [], []
        for _ in range(self.batch_size):
            stream = self._next_stream()
            rows.append(self._next_sample(stream))
            names.append(stream.name)
        self.state["tokens"] += self.batch_size * self.seq_len
        self.state["samples"] += self.batch_size
        return {**pack_rows(rows, self.seq_len, self.pad_id), "streams": names, "phase": self.state["phase"]}


def pack_rows(rows: list[np.ndarray], seq_len: int, pad_id: int = 0) -> dict:
    """Token windows -> input_ids and (unshifted) labels [len(rows), seq_len]; short rows are padded, and the
    padding is ignored by the loss."""
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    for b, row in enumerate(rows):
        tokens = torch.from_numpy(np.asarray(row)[:seq_len].astype(np.int64))
        ids[b, : len(tokens)] = tokens
        labels[b, : len(tokens)] = tokens
    return {"input_ids": ids, "labels": labels}


def batches_per_epoch(phases: list[Phase], batch_size: int) -> int:
    return max(1, phases[0].samples() // batch_size)


def eval_batches(reader: MDSReader, batch_size: int, seq_len: int, limit: int | None = None, pad_id: int = 0):
    """Fixed eval batches (the last one may be smaller). With a `limit` of batches, the windows are spread
    evenly over the whole set rather than taken from its start, where a few documents would dominate."""
    n = len(reader)
    indices = np.arange(n)
    if limit is not None and limit * batch_size < n:
        indices = np.linspace(0, n - 1, limit * batch_size).round().astype(int)
    for start in range(0, len(indices), batch_size):
        yield pack_rows([reader[int(i)]["tokens"] for i in indices[start:start + batch_size]], seq_len, pad_id)


def unigram_entropy(readers: list[MDSReader], max_tokens: int = 50_000_000) -> float:
    """Entropy in nats/token of the token frequencies in these windows: the cross-entropy of a model that knows
    how often each token occurs and nothing of context, the baseline a language model's loss is judged against.
    Over every window, or over windows spread evenly when there are more than `max_tokens`."""
    counts = np.zeros(0, dtype=np.int64)
    windows = [(r, i) for r in readers for i in range(len(r))]
    if not windows:
        raise ValueError("no windows to count tokens in")
    per_window = len(np.asarray(windows[0][0][windows[0][1]]["tokens"]))
    if len(windows) * per_window > max_tokens:
        keep = np.linspace(0, len(windows) - 1, max(1, max_tokens // max(1, per_window))).round().astype(int)
        windows = [windows[i] for i in keep]
    for start in range(0, len(windows), 4096):  # bincount over chunks of windows, not window by window
        tokens = np.concatenate([np.asarray(r[i]["tokens"], dtype=np.int64) for r, i in windows[start:start + 4096]])
        c = np.bincount(tokens, minlength=len(counts))
        c[: len(counts)] += counts
        counts = c
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
