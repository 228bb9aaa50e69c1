"""Fine-tuning data as LLM Foundry users have it: prompt/response or chat examples from a hub dataset, local
JSONL/CSV/Parquet files or MDS streams, tokenized into (input_ids, labels) with the prompt masked.

The pipeline is the same for every source, and all of it runs before the first training step:
    rows (with where each came from) -> preprocessing_fn -> one of the two example formats, validated
    -> turns [(prompt ids, response ids), ...] -> input_ids + labels under the target policies -> fits?
Every row ends up either kept or counted under one drop reason, with its first few locations (`file:line`,
`shard:index`, `split[i]`) in the report: kept + dropped = read, and `strict` turns any drop into an error.

Packing is first-fit-decreasing into max_seq_len rows, each token carrying its document's index in the row
(`sequence_id`), which the model turns into per-document attention and restarting positions.
"""

from __future__ import annotations

import difflib
import importlib
import json
import math
import os
import shutil
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dbrx.tokenizer import EOS_ID, PAD_ID, Tokenizer

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
REPORT_EXAMPLES = 3  # locations shown per drop reason


class FinetuningDataError(ValueError):
    """A dataset that cannot be used as configured; the message names the key, file or row."""


# ---- registered preprocessors (by hub dataset name) ------------------------------------------------------------
def alpaca(row: dict) -> dict:
    """tatsu-lab/alpaca: `text` is the whole formatted example; split it after "### Response:" (the marker
    stays in the prompt, the newline after it starts the response, as in LLM Foundry)."""
    marker = "### Response:"
    text = row["text"]
    cut = text.index(marker) + len(marker)
    return {"prompt": text[:cut], "response": text[cut:]}


ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def dolly(row: dict) -> dict:
    """HuggingFaceH4/databricks_dolly_15k: instruction, input, output into the Alpaca-style prompt."""
    context = row.get("input") or ""
    template = ALPACA_WITH_INPUT if context.strip() else ALPACA_NO_INPUT
    return {"prompt": template.format(instruction=row["instruction"], input=context), "response": row["output"]}


def p3(row: dict) -> dict:
    """bigscience/P3 and Muennighoff/P3: `inputs` is the prompt, `targets` the response."""
    return {"prompt": row["inputs"], "response": row["targets"]}


PREPROCESSORS: dict[str, Callable[[dict], dict]] = {
    "tatsu-lab/alpaca": alpaca,
    "HuggingFaceH4/databricks_dolly_15k": dolly,
    "bigscience/P3": p3,
    "Muennighoff/P3": p3,
}


def registered_preprocessor(hf_name: str) -> Callable[[dict], dict] | None:
    """The preprocessor registered for a hub name; a local snapshot directory matches by its last two path
    components (`.../tatsu-lab/alpaca`) or by the hub cache's `datasets--tatsu-lab--alpaca` naming."""
    if hf_name in PREPROCESSORS:
        return PREPROCESSORS[hf_name]
    parts = Path(hf_name).parts
    for name, fn in PREPROCESSORS.items():
        if "/".join(parts[-2:]) == name or f"datasets--{name.replace('/', '--')}" in parts:
            return fn
    return None


def resolve_preprocessor(spec: Any, hf_name: str | None, where: str) -> Callable[[dict], dict] | None:
    """`"pkg.module:function"`, `{prompt: col, response: col}` (or `messages: col`), or None: the one
    registered for hf_name, if any."""
    if spec is None:
        return registered_preprocessor(hf_name) if hf_name else None
    if isinstance(spec, dict):
        unknown = set(spec) - {"prompt", "response", "completion", "messages"}
        if unknown or not spec:
            raise FinetuningDataError(f"{where}: a column mapping takes prompt/response (or messages) keys, got "
                                      f"{sorted(spec)}")
        mapping = dict(spec)
        return lambda row: {key: row[col] for key, col in mapping.items()}
    if isinstance(spec, str) and ":" in spec:
        module_name, fn_name = spec.split(":", 1)
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise FinetuningDataError(f"{where}: cannot import {spec!r}: {e}") from None
        if not callable(fn):
            raise FinetuningDataError(f"{where}: {spec!r} is not callable")
        return fn
    if isinstance(spec, str) and registered_preprocessor(spec):
        return registered_preprocessor(spec)
    raise FinetuningDataError(f"{where}: expected 'module.path:function', a {{prompt: col, response: col}} "
                              f"mapping, or a registered dataset name ({', '.join(PREPROCESSORS)}); got {spec!r}")


# ---- examples -> turns ----------------------------------------------------------------------------------------
class Drop(Exception):
    """A row that cannot be used: `reason` is its report bucket."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def example_turns(example: Any) -> list[tuple[str, str]]:
    """A validated example as text turns [(prompt, response), ...], following LLM Foundry's rules: either
    exactly {prompt, response|completion} (strings), or exactly {messages}: at least 2 {role, content}
    messages, roles alternating, the last from the assistant; one turn per assistant message, rendered with the
    DBRX chat template."""
    if not isinstance(example, dict):
        raise Drop("not_a_mapping", f"expected a mapping, got {type(example).__name__}")
    keys = set(example)
    if "messages" in keys:
        if keys != {"messages"}:
            raise Drop("unexpected_keys", f"a chat example has only 'messages'; also found {sorted(keys - {'messages'})} "
                                          "(use a preprocessing_fn)")
        return chat_turns(example["messages"])
    response_key = "response" if "response" in keys else "completion"
    missing = [k for k in ("prompt", response_key) if k not in keys]
    if missing:
        raise Drop("missing_key", f"missing {', '.join(map(repr, missing))} (found {sorted(keys)})")
    if keys != {"prompt", response_key}:
        raise Drop("unexpected_keys", f"unexpected keys {sorted(keys - {'prompt', response_key})} (use a "
                                      "preprocessing_fn)")
    prompt, response = example["prompt"], example[response_key]
    for key, value in (("prompt", prompt), (response_key, response)):
        if not isinstance(value, str):
            raise Drop("wrong_type", f"{key!r} must be a string, got {type(value).__name__}")
    if not response.strip():
        raise Drop("empty", f"{response_key!r} is empty")
    return [(prompt, response)]


def chat_turns(messages: Any) -> list[tuple[str, str]]:
    if not isinstance(messages, list):
        raise Drop("wrong_type", f"'messages' must be a list, got {type(messages).__name__}")
    if len(messages) < 2:
        raise Drop("bad_messages", f"a chat needs at least 2 messages, got {len(messages)}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise Drop("bad_messages", f"messages[{i}] must be exactly {{role, content}}, got {m!r:.80}")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise Drop("wrong_type", f"messages[{i}]: role and content must be strings")
        if m["role"] not in ROLES:
            raise Drop("bad_messages", f"messages[{i}]: role {m['role']!r} is not one of {', '.join(ROLES)}")
        if i and m["role"] == messages[i - 1]["role"]:
            raise Drop("bad_messages", f"messages[{i - 1}] and [{i}] are both from {m['role']!r}")
    if messages[-1]["role"] != "assistant":
        raise Drop("bad_messages", f"the last message must be from the assistant, got {messages[-1]['role']!r}")
    if not messages[-1]["content"].strip():
        raise Drop("empty", "the last assistant message is empty")
    turns, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = Tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        turns.append((prefix[len(done):], m["content"] + "<|im_end|>"))
        done = prefix + m["content"] + "<|im_end|>"
    return turns


@dataclass
class LabelPolicy:
    """LLM Foundry's `target_responses` (last | all) and `target_prompts` (none | all | length>=N)."""
    responses: str = "last"
    prompts: str = "none"
    min_prompt_len: int = 0

    @classmethod
    def from_config(cls, target_responses: str = "last", target_prompts: str = "none",
                    where: str = "dataset") -> LabelPolicy:
        responses, prompts = str(target_responses).lower(), str(target_prompts).lower()
        if responses not in ("last", "all"):
            raise FinetuningDataError(f"{where}.target_responses: expected 'last' or 'all', got {target_responses!r}")
        if prompts in ("none", "all"):
            return cls(responses, prompts)
        if prompts.startswith("length>="):
            try:
                n = int(prompts[len("length>="):])
            except ValueError:
                n = -1
            if n > 0:
                return cls(responses, "length", n)
        raise FinetuningDataError(f"{where}.target_prompts: expected 'none', 'all' or 'length>=N' (N > 0), "
                                  f"got {target_prompts!r}")

    def trains_prompt(self, length: int) -> bool:
        return self.prompts == "all" or (self.prompts == "length" and length >= self.min_prompt_len)


def build_example(turns: list[tuple[list[int], list[int]]], policy: LabelPolicy, max_seq_len: int,
                  eos_id: int = EOS_ID) -> tuple[np.ndarray, np.ndarray, bool]:
    """Token turns -> (input_ids, labels, truncated). labels are input_ids with IGNORE_INDEX wherever no loss
    is wanted (unshifted, as the loss shifts them). EOS ends the last response when it does not already.
    Too long: the oldest tokens (prompt first) are cut from the left, as long as the whole last response
    stays; otherwise the example is dropped, since its target could not be trained on."""
    ids: list[int] = []
    labels: list[int] = []
    last = len(turns) - 1
    for t, (prompt, response) in enumerate(turns):
        if t == last and (not response or response[-1] != eos_id):
            response = [*response, eos_id]
        ids += prompt
        labels += prompt if policy.trains_prompt(len(prompt)) else [IGNORE_INDEX] * len(prompt)
        ids += response
        labels += response if (t == last or policy.responses == "all") else [IGNORE_INDEX] * len(response)
    response_len = len(turns[-1][1]) + (0 if turns[-1][1] and turns[-1][1][-1] == eos_id else 1)
    if response_len > max_seq_len:
        raise Drop("too_long", f"the response is {response_len} tokens; max_seq_len is {max_seq_len}")
    truncated = len(ids) > max_seq_len
    if truncated:
        ids, labels = ids[-max_seq_len:], labels[-max_seq_len:]
    # Nothing of the example precedes its first token, so that token is never a target: in a packed row it
    # would otherwise be predicted from the end of the previous example.
    labels[0] = IGNORE_INDEX
    return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32), truncated


# ---- sources ----------------------------------------------------------------------------------------------------
Row = tuple[str, Any]  # (location, row); a row that could not even be parsed is a Drop instance


def _data_files(dataset: dict, where: str) -> list[Path] | dict[str, list[Path]]:
    kwargs = dataset.get("hf_kwargs") or {}
    files = kwargs.get("data_files", dataset.get("data_files"))
    data_dir = kwargs.get("data_dir", dataset.get("data_dir"))
    if files is None and data_dir is None:
        raise FinetuningDataError(f"{where}: hf_name {dataset['hf_name']!r} reads local files: give "
                                  "hf_kwargs.data_dir or hf_kwargs.data_files")
    if isinstance(files, dict):
        return {split: [Path(f) for f in ([v] if isinstance(v, str) else v)] for split, v in files.items()}
    if files is not None:
        return [Path(f) for f in ([files] if isinstance(files, str) else files)]
    return [Path(data_dir)]


def _expand(paths: list[Path], suffixes: tuple[str, ...], split: str, where: str) -> list[Path]:
    """Files under the given paths; in a directory, those whose name mentions the split (datasets'
    convention: train.jsonl, data/train-00000.jsonl), or all of them when none does."""
    out: list[Path] = []
    for p in paths:
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
            named = [f for f in found if split in f.name]
            out += named or found
        else:
            raise FinetuningDataError(f"{where}: {p} does not exist")
    if not out:
        raise FinetuningDataError(f"{where}: no {'/'.join(suffixes)} files in {', '.join(map(str, paths))}")
    return out


def read_json_rows(files: list[Path]) -> Iterator[Row]:
    """JSONL (one object per line) or a JSON array per file. A line that is not JSON is a row dropped as
    `not_json` at its file:line, not an error that stops everything (datasets' JSON builder would)."""
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if path.suffix == ".json" and text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                yield f"{path}", Drop("not_json", f"not valid JSON: {e}")
                continue
            for i, item in enumerate(items):
                yield f"{path}[{i}]", item
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", Drop("not_json", f"not valid JSON ({e.msg} at column {e.colno})")


def read_hf_rows(dataset: dict, split: str, where: str) -> Iterator[Row]:
    """`datasets.load_dataset(hf_name, split=..., **hf_kwargs)`: a hub name (or a local directory laid out like
    a hub snapshot), or `csv`/`parquet` over local files."""
    try:
        import datasets
    except ImportError:
        raise FinetuningDataError(f"{where}: hf_name needs the datasets package: pip install datasets") from None
    name, kwargs = dataset["hf_name"], dict(dataset.get("hf_kwargs") or {})
    kwargs.pop("trust_remote_code", None)  # no remote code, ever
    try:
        ds = datasets.load_dataset(name, split=split, **kwargs)
    except Exception as e:  # datasets raises many types; the message is what the user needs
        raise FinetuningDataError(f"{where}: datasets.load_dataset({name!r}, split={split!r}) failed: "
                                  f"{type(e).__name__}: {e}") from None
    for i, row in enumerate(ds):
        yield f"{name}:{split}[{i}]", row


def read_mds_rows(dataset: dict, split: str | None, where: str) -> Iterator[Row]:
    """`remote`/`local` (one MDS dataset) or `streams: {name: {remote, local, split}}`, read in order. Rows
    come as LLM Foundry writes them: prompt/response (str), messages (json) or pre-tokenized turns (json)."""
    from dbrx.data.mds import MDSError
    from dbrx.data.mixture import open_reader, stream_specs

    for name, spec in stream_specs(dataset).items():
        if spec.get("proportion") is not None:
            raise FinetuningDataError(f"{where}.streams.{name}.proportion: fine-tuning streams are read whole "
                                      "(one epoch of each); mixing by proportion is for pretraining")
        reader = open_reader(spec, split, f"{where}.streams.{name}", name)
        paths = reader.shard_paths
        for i in range(len(reader)):
            shard, offset = reader.shard_of(i)
            location = f"{paths[shard]}:{offset}"
            try:
                yield location, reader[i]
            except (MDSError, ValueError, UnicodeDecodeError) as e:
                yield location, Drop("not_decodable", str(e))


def iter_rows(dataset: dict, where: str) -> Iterator[Row]:
    split = dataset.get("split", "train")
    if dataset.get("hf_name") and (dataset.get("remote") or dataset.get("local") or dataset.get("streams")):
        raise FinetuningDataError(f"{where}: give either hf_name (a hub or local dataset) or remote/local/streams "
                                  "(MDS), not both")
    name = dataset.get("hf_name")
    if name is None:
        if not (dataset.get("remote") or dataset.get("local") or dataset.get("streams")):
            raise FinetuningDataError(f"{where}: needs hf_name, or remote/local (MDS), or streams")
        yield from read_mds_rows(dataset, split, where)
    elif name == "json":
        files = _data_files(dataset, where)
        if isinstance(files, dict):
            if split not in files:
                raise FinetuningDataError(f"{where}.hf_kwargs.data_files has no split {split!r} "
                                          f"(has {', '.join(files)})")
            files = files[split]
        yield from read_json_rows(_expand(files, (".jsonl", ".json"), split, where))
    else:
        yield from read_hf_rows(dataset, split, where)


# ---- validation ---------------------------------------------------------------------------------------------
@dataclass
class DataReport:
    """What became of every row read."""
    source: str
    read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, location: str, detail: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < REPORT_EXAMPLES:
            shown.append(f"{location}: {detail}")

    def summary(self) -> str:
        lines = [f"{self.source}: {self.read} rows read, {self.kept} kept"
                 + (f" ({self.truncated} left-truncated to fit)" if self.truncated else "")
                 + (f", {sum(self.dropped.values())} dropped" if self.dropped else "")]
        for reason, count in sorted(self.dropped.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason}: {count}")
            lines += [f"    {e}" for e in self.examples[reason]]
        return "\n".join(lines)


@dataclass
class Example:
    input_ids: np.ndarray  # int32 [L]
    labels: np.ndarray  # int32 [L], IGNORE_INDEX where no loss

    def __len__(self) -> int:
        return len(self.input_ids)


def token_turns(row: Any, tokenizer: Tokenizer) -> list[tuple[list[int], list[int]]]:
    """A row's turns as token ids: pre-tokenized `turns` ([{input_ids, labels}], as written by `dbrx convert
    finetuning --tokenizer`) are taken as they are; text examples are validated and tokenized."""
    if isinstance(row, dict) and set(row) == {"turns"}:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns:
            raise Drop("wrong_type", "'turns' must be a non-empty list of {input_ids, labels}")
        out = []
        for i, t in enumerate(turns):
            if not (isinstance(t, dict) and isinstance(t.get("input_ids"), list) and isinstance(t.get("labels"), list)
                    and all(isinstance(x, int) for x in t["input_ids"] + t["labels"])):
                raise Drop("wrong_type", f"turns[{i}] must be {{input_ids: [int], labels: [int]}}")
            out.append((t["input_ids"], t["labels"]))
        if not out[-1][1]:
            raise Drop("empty", "the last turn has no labels")
        return out
    return [(tokenizer.encode(p, allow_special=True), tokenizer.encode(r, allow_special=True))
            for p, r in example_turns(row)]


def preprocessed(row: Any, preprocess: Callable[[dict], Any] | None) -> Any:
    """The row after the preprocessing function; a row that could not be read, or that the user's function
    fails on, is a Drop."""
    if isinstance(row, Drop):
        raise row
    if preprocess is None:
        return row
    try:
        return preprocess(dict(row))
    except Exception as e:  # the user's function: any failure is this row's
        raise Drop("preprocessing_error", f"{type(e).__name__}: {e}") from None


def load_examples(rows: Iterator[Row], tokenizer: Tokenizer, policy: LabelPolicy, max_seq_len: int,
                  preprocess: Callable[[dict], Any] | None, source: str) -> tuple[list[Example], DataReport]:
    report = DataReport(source)
    examples = []
    for location, row in rows:
        report.read += 1
        try:
            row = preprocessed(row, preprocess)
            ids, labels, truncated = build_example(token_turns(row, tokenizer), policy, max_seq_len)
        except Drop as d:
            report.drop(d.reason, location, str(d))
            continue
        report.kept += 1
        report.truncated += truncated
        examples.append(Example(ids, labels))
    return examples, report


DATASET_KEYS = ("hf_name", "hf_kwargs", "preprocessing_fn", "split", "max_seq_len", "decoder_only_format",
                "target_responses", "target_prompts", "shuffle", "shuffle_seed", "packing_ratio", "remote", "local",
                "streams", "strict", "data_files", "data_dir", "allow_pad_trimming", "safe_load")


def check_dataset_keys(dataset: dict, where: str) -> None:
    for key in dataset:
        if key not in DATASET_KEYS:
            near = difflib.get_close_matches(key, DATASET_KEYS, n=1)
            raise FinetuningDataError(f"{where}.{key}: unknown key" + (f"; did you mean {near[0]!r}?" if near else ""))
    if dataset.get("decoder_only_format", True) is not True:
        raise FinetuningDataError(f"{where}.decoder_only_format: DBRX is decoder-only; it must be true")


def prepare(dataset: dict, tokenizer: Tokenizer, max_seq_len: int, where: str,
            log: Callable[[str], None] = print) -> list[Example]:
    """Read, validate and tokenize a whole dataset before training; report what was dropped, refuse the run
    under `strict: true` if anything was, and refuse an empty result."""
    check_dataset_keys(dataset, where)
    max_seq_len = int(dataset.get("max_seq_len") or max_seq_len)
    policy = LabelPolicy.from_config(dataset.get("target_responses", "last"), dataset.get("target_prompts", "none"),
                                     where)
    preprocess = resolve_preprocessor(dataset.get("preprocessing_fn"), dataset.get("hf_name"),
                                      f"{where}.preprocessing_fn")
    source = dataset.get("hf_name") or dataset.get("remote") or dataset.get("local") or "streams"
    examples, report = load_examples(iter_rows(dataset, where), tokenizer, policy, max_seq_len, preprocess,
                                     f"{where} ({source}, split {dataset.get('split', 'train')})")
    log(report.summary())
    if report.dropped and dataset.get("strict"):
        raise FinetuningDataError(f"{where}.strict is true and {sum(report.dropped.values())} rows were dropped:\n"
                                  + report.summary())
    if not examples:
        raise FinetuningDataError(f"{where}: no usable example is left:\n{report.summary()}")
    return examples


# ---- packing ----------------------------------------------------------------------------------------------------
def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= capacity, by first-fit-decreasing."""
    bins: list[list[int]] = []
    space: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(space):
            if lengths[i] <= free:
                bins[b].append(i)
                space[b] -= lengths[i]
                break
        else:
            bins.append([i])
            space.append(capacity - lengths[i])
    return bins


def pack_window(examples: list[Example], packed: bool, seq_len: int) -> list[list[Example]]:
    if not packed:
        return [[e] for e in examples]
    return [[examples[i] for i in b] for b in first_fit_decreasing([len(e) for e in examples], seq_len)]


def auto_packing_ratio(lengths: list[int], batch_size: int, seq_len: int, seed: int = 0) -> float:
    """The largest ratio r (in steps of 0.5) at which first-fit-decreasing packs windows of r * batch_size
    examples into at most batch_size rows on average, profiled on the data itself: more would leave
    examples waiting, less would leave rows emptier than they need be."""
    rng = np.random.default_rng(seed)
    sample = [lengths[i] for i in rng.permutation(len(lengths))[: max(batch_size * 64, 1)]]
    best = 1.0
    for r in np.arange(1.5, seq_len / max(1, min(lengths)) + 0.5, 0.5):
        window = math.ceil(r * batch_size)
        windows = [sample[s:s + window] for s in range(0, len(sample) - window + 1, window)] or [sample]
        rows = np.mean([len(first_fit_decreasing(w, seq_len)) * window / len(w) for w in windows])
        if rows > batch_size:
            break
        best = float(r)
    return best


def collate(rows: list[list[Example]], seq_len: int, pad_id: int = PAD_ID) -> dict:
    """Packed rows -> input_ids, labels (unshifted; IGNORE_INDEX on padding) and sequence_id (-1 on padding)."""
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    seq = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        pos = 0
        for d, ex in enumerate(row):
            n = len(ex)
            ids[b, pos:pos + n] = torch.from_numpy(ex.input_ids.astype(np.int64))
            labels[b, pos:pos + n] = torch.from_numpy(ex.labels.astype(np.int64))
            seq[b, pos:pos + n] = d
            pos += n
    return {"input_ids": ids, "labels": labels, "sequence_id": seq}


class FinetuningLoader:
    """Global batches of packed rows, a pure function of (seed, state) like the pretraining loader: each epoch
    shuffles the examples, cuts them into windows of ceil(packing_ratio * batch_size), packs each window by
    first-fit-decreasing, and serves the rows batch_size at a time. The state is JSON-able and checkpointed."""

    def __init__(self, examples: list[Example], batch_size: int, seq_len: int, seed: int, shuffle: bool = True,
                 packing_ratio: float = 1.0):
        self.examples, self.batch_size, self.seq_len = examples, batch_size, seq_len
        self.seed, self.shuffle, self.packing_ratio = seed, shuffle, packing_ratio
        self.state = {"epoch": 0, "window": 0, "row": 0, "tokens": 0, "samples": 0}
        self._cache: tuple[tuple[int, int], list[list[Example]]] | None = None
        self.real_tokens = self.padded_tokens = 0

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)

    @property
    def window_size(self) -> int:
        return max(1, math.ceil(self.packing_ratio * self.batch_size))

    def windows_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.window_size)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.examples))
        return np.random.default_rng([self.seed, zlib.crc32(b"finetuning"), epoch]).permutation(len(self.examples))

    def _window_rows(self, epoch: int, window: int) -> list[list[Example]]:
        if self._cache is None or self._cache[0] != (epoch, window):
            order = self._order(epoch)[window * self.window_size:(window + 1) * self.window_size]
            rows = pack_window([self.examples[i] for i in order], self.packing_ratio > 1, self.seq_len)
            self._cache = ((epoch, window), rows)
        return self._cache[1]

    def next_batch(self) -> dict:
        rows: list[list[Example]] = []
        while len(rows) < self.batch_size:
            s = self.state
            window_rows = self._window_rows(s["epoch"], s["window"])
            take = window_rows[s["row"]:s["row"] + self.batch_size - len(rows)]
            rows += take
            s["row"] += len(take)
            if s["row"] >= len(window_rows):
                s.update(window=s["window"] + 1, row=0)
                if s["window"] >= self.windows_per_epoch():
                    s.update(epoch=s["epoch"] + 1, window=0)
        batch = collate(rows, self.seq_len)
        real = int((batch["sequence_id"] >= 0).sum())
        self.real_tokens += real
        self.padded_tokens += batch["input_ids"].numel()
        self.state["tokens"] += real
        self.state["samples"] += sum(len(r) for r in rows)
        return {**batch, "phase": 0}

    def batches_per_epoch(self) -> int:
        rows = sum(len(self._window_rows(0, w)) for w in range(self.windows_per_epoch()))
        self._cache = None
        return max(1, rows // self.batch_size)

    def packing_efficiency(self) -> float:
        """Share of the served row slots that hold real tokens."""
        return self.real_tokens / max(1, self.padded_tokens)


def eval_batches(examples: list[Example], batch_size: int, seq_len: int, packing_ratio: float = 1.0,
                 limit: int | None = None) -> Iterator[dict]:
    """Every held-out example once, in order, packed as in training (packing does not change the loss)."""
    window = max(1, math.ceil(packing_ratio * batch_size))
    rows: list[list[Example]] = []
    for start in range(0, len(examples), window):
        rows += pack_window(examples[start:start + window], packing_ratio > 1, seq_len)
    n_batches = math.ceil(len(rows) / batch_size)
    for b in range(n_batches if limit is None else min(limit, n_batches)):
        yield collate(rows[b * batch_size:(b + 1) * batch_size], seq_len)


# ---- conversion to MDS (LLM Foundry's convert_finetuning_dataset) ---------------------------------------------
def convert(dataset: dict, out_root: str | Path, splits: list[str], tokenizer: Tokenizer | None = None,
            max_seq_len: int | None = None, compression: str | None = None, overwrite: bool = False,
            log: Callable[[str], None] = print) -> dict[str, DataReport]:
    """Each split of `dataset` (the loader's keys: hf_name, hf_kwargs, preprocessing_fn) -> MDS at
    `out_root/<split>`, validated exactly as the loader validates. Text examples are stored as `prompt`/`response`
    (str) or `messages` (json), as LLM Foundry stores them; with a tokenizer and max_seq_len, as pre-tokenized
    `turns` (json [{input_ids, labels}]), keeping only examples whose response fits. Each split is written
    to a temporary directory and renamed when complete."""
    from dbrx.data.mds import MDSWriter

    out_root = Path(out_root)
    if (tokenizer is None) != (max_seq_len is None):
        raise FinetuningDataError("--tokenizer and --max-seq-len go together: both pre-tokenize into 'turns'")
    check_dataset_keys(dataset, "dataset")
    for split in splits:
        if (out_root / split).exists() and not overwrite:
            raise FinetuningDataError(f"{out_root / split} already exists; pass --overwrite to replace it")
    preprocess = resolve_preprocessor(dataset.get("preprocessing_fn"), dataset.get("hf_name"), "--preprocessor")
    reports = {}
    for split in splits:
        report = DataReport(f"{dataset.get('hf_name')} split {split}")
        tmp = out_root / f".{split}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        writer, kind = None, None
        try:
            for location, row in iter_rows({**dataset, "split": split}, "dataset"):
                report.read += 1
                try:
                    row = preprocessed(row, preprocess)
                    turns = example_turns(row)
                    sample: dict[str, Any]
                    if tokenizer is not None:
                        token = [(tokenizer.encode(p), tokenizer.encode(r)) for p, r in turns]
                        build_example(token, LabelPolicy(), max_seq_len)  # drops what cannot fit
                        sample, this_kind = {"turns": [{"input_ids": p, "labels": r} for p, r in token]}, "turns"
                    elif "messages" in row:
                        sample, this_kind = {"messages": row["messages"]}, "messages"
                    else:
                        response = row.get("response", row.get("completion"))
                        sample, this_kind = {"prompt": row["prompt"], "response": response}, "prompt_response"
                    if kind is None:
                        kind = this_kind
                        columns = {"turns": {"turns": "json"}, "messages": {"messages": "json"},
                                   "prompt_response": {"prompt": "str", "response": "str"}}[kind]
                        writer = MDSWriter(tmp, columns, compression=compression)
                    elif this_kind != kind:
                        raise Drop("mixed_formats", f"a {this_kind} example in a dataset of {kind} examples "
                                                    "(one MDS dataset has one set of columns)")
                except Drop as d:
                    report.drop(d.reason, location, str(d))
                    continue
                writer.write(sample)
                report.kept += 1
            if writer is None:
                raise FinetuningDataError(f"split {split}: no usable example:\n{report.summary()}")
            writer.finish()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = out_root / split
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        log(report.summary() + f"\n  -> {final} ({kind} columns{', ' + compression if compression else ''})")
        reports[split] = report
    return reports
