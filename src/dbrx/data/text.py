"""`dbrx convert text`: documents -> cl100k tokens -> windows of N tokens joined by <|endoftext|> -> MDS.

Inputs may be directories of text files (matched by --glob, recursively), JSONL files with a `text` field, or
a hub / local dataset (`datasets.load_dataset`) with --text-column. Documents are tokenized in worker processes;
a held-out split is drawn by document (never by window), so no document straddles train and val.
"""

from __future__ import annotations

import fnmatch
import json
import multiprocessing as mp
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dbrx.data.mds import MDSWriter

DEFAULT_GLOB = "*.txt,*.md,*.py"


@dataclass
class ConvertStats:
    documents: dict
    tokens: dict
    windows: dict
    skipped: list


def iter_documents(inputs: list[str], glob: str = DEFAULT_GLOB, text_column: str | None = None,
                   split: str = "train", skipped: list | None = None,
                   exclude: str = "") -> Iterator[tuple[str, str]]:
    """(source, text) for every document of every input, in a stable order. `exclude` drops files with any path
    component (below the input directory) matching one of its comma-separated patterns."""
    patterns = [p.strip() for p in glob.split(",") if p.strip()]
    excluded = [p.strip() for p in exclude.split(",") if p.strip()]
    for item in inputs:
        path = Path(item)
        if path.is_dir() and text_column is None:
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                parts = file.relative_to(path).parts
                if any(fnmatch.fnmatch(part, pat) for part in parts for pat in excluded):
                    continue
                if any(fnmatch.fnmatch(file.name, pat) for pat in patterns):
                    try:
                        yield str(file), file.read_text(encoding="utf-8")
                    except (UnicodeDecodeError, OSError) as e:
                        if skipped is not None:
                            skipped.append(f"{file}: {e.__class__.__name__}")
        elif path.is_file() and path.suffix in (".jsonl", ".json") and text_column is None:
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        text = row["text"]
                        if not isinstance(text, str):
                            raise TypeError(f"'text' is {type(text).__name__}, expected a string")
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        if skipped is not None:
                            skipped.append(f"{path}:{lineno}: {e.__class__.__name__}: {e}")
                        continue
                    yield f"{path}:{lineno}", text
        elif path.is_file() and text_column is None:
            yield str(path), path.read_text(encoding="utf-8")
        else:
            from datasets import load_dataset

            column = text_column or "text"
            ds = load_dataset(item, split=split)
            if column not in ds.column_names:
                raise ValueError(f"{item}: no column {column!r} (columns: {', '.join(ds.column_names)}); "
                                 "choose one with --text-column")
            for i, text in enumerate(ds[column]):
                if isinstance(text, str):
                    yield f"{item}[{i}]", text


_TOKENIZER = None


def _encode(text: str) -> list[int]:
    global _TOKENIZER
    if _TOKENIZER is None:
        from dbrx.tokenizer import Tokenizer

        _TOKENIZER = Tokenizer()
    # Special-token text inside a document is data, not a control token.
    return _TOKENIZER.encode(text, allow_special=False)


def is_validation(source: str, val_fraction: float, seed: int) -> bool:
    """A stable per-document draw: the same document lands in the same split on every run."""
    return val_fraction > 0 and (zlib.crc32(f"{seed}:{source}".encode()) % 1_000_000) < val_fraction * 1_000_000


def convert_text(inputs: list[str], out: str | Path, concat_tokens: int, *, glob: str = DEFAULT_GLOB,
                 text_column: str | None = None, split: str = "train", exclude: str = "", val_fraction: float = 0.0,
                 compression: str | None = None, overwrite: bool = False, workers: int | None = None,
                 seed: int = 0, eos_id: int = 100257, progress: bool = True) -> ConvertStats:
    out = Path(out)
    if concat_tokens < 2:
        raise ValueError(f"--concat-tokens must be at least 2, got {concat_tokens}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    for item in inputs:
        looks_local = item.startswith(("/", ".", "~")) or item.count("/") != 1  # hub names are "org/name"
        if not Path(item).exists() and looks_local:
            raise FileNotFoundError(f"{item}: no such file or directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)

    from tqdm import tqdm

    skipped: list[str] = []
    docs = iter_documents(inputs, glob, text_column, split, skipped, exclude)
    splits = ["train", "val"] if val_fraction > 0 else ["train"]
    writers = {s: MDSWriter(out / s, {"tokens": "ndarray:int32"}, compression=compression) for s in splits}
    buffers = {s: [] for s in splits}
    stats = ConvertStats({s: 0 for s in splits}, {s: 0 for s in splits}, {s: 0 for s in splits}, skipped)

    def flush(s: str) -> None:
        buf = buffers[s]
        while len(buf) >= concat_tokens:
            writers[s].write({"tokens": np.asarray(buf[:concat_tokens], dtype=np.int32)})
            del buf[:concat_tokens]
            stats.windows[s] += 1

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    n_workers = workers or max(1, min(4, mp.cpu_count()))
    sources: list[str] = []

    def texts():
        for source, text in docs:
            sources.append(source)
            yield text

    for s in splits:
        writers[s].__enter__()
    try:
        with ctx.Pool(n_workers) as pool:
            bar = tqdm(desc="tokenizing", unit="doc", disable=not progress)
            for i, ids in enumerate(pool.imap(_encode, texts(), chunksize=16)):
                s = "val" if is_validation(sources[i], val_fraction, seed) else "train"
                buffers[s].extend(ids)
                buffers[s].append(eos_id)
                stats.documents[s] += 1
                stats.tokens[s] += len(ids) + 1
                flush(s)
                bar.update(1)
            bar.close()
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # never leave a half-converted dataset behind
        raise
    for s in splits:
        writers[s].__exit__(None, None, None)
    if sum(stats.windows.values()) == 0:
        shutil.rmtree(out, ignore_errors=True)
        raise ValueError(f"no {concat_tokens}-token window could be made from {sum(stats.documents.values())} "
                         "document(s); check the inputs and --glob, or lower --concat-tokens")
    return stats
