"""A small instruction set built from the Python standard library, for the fine-tuning demo and tests:
prompt = a function's signature and docstring, response = its body.

    python -m dbrx.data.stdlib_sft --out runs/data/stdlib_sft [--stdlib DIR] [--val-fraction 0.05]

writes `train.jsonl` and `val.jsonl` ({"prompt", "response"} rows, held out by module so that no file
straddles the split) and the same rows as a hub-style dataset snapshot, `hub/stdlib-functions/` with
`data/{train,validation}-00000-of-00001.parquet` in other column names (`signature`, `body`), which the
hub-style config maps with a `preprocessing_fn`.
"""

from __future__ import annotations

import argparse
import ast
import json
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

from dbrx.fileio import atomic_path, atomic_write_text


def functions_with_docstrings(source: str, max_chars: int) -> Iterator[tuple[str, str]]:
    """(signature + docstring, body) of every function or method that has a docstring and a body after it."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc = node.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        prompt = "".join(lines[start:doc.end_lineno])
        body = "".join(lines[doc.end_lineno:node.end_lineno])
        if body.strip() and len(prompt) + len(body) <= max_chars:
            yield prompt, body


def build(stdlib: Path, val_fraction: float = 0.05, max_chars: int = 1500, seed: int = 0) -> dict[str, list[dict]]:
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if "site-packages" in rel or "/test" in f"/{rel}":  # the library itself, not its test suite
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        held_out = zlib.crc32(f"{seed}:{rel}".encode()) % 1_000_000 < val_fraction * 1_000_000
        for prompt, body in functions_with_docstrings(source, max_chars):
            splits["val" if held_out else "train"].append({"prompt": prompt, "response": body})
    return splits


def write(out: Path, splits: dict[str, list[dict]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        atomic_write_text(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    hub = out / "hub" / "stdlib-functions" / "data"
    hub.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train"), ("val", "validation")):
        table = pa.table({"signature": [r["prompt"] for r in splits[split]],
                          "body": [r["response"] for r in splits[split]]})
        with atomic_path(hub / f"{name}-00000-of-00001.parquet") as tmp:
            pq.write_table(table, tmp)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--max-chars", type=int, default=1500)
    args = p.parse_args(argv)
    splits = build(args.stdlib, args.val_fraction, args.max_chars)
    write(args.out, splits)
    print(f"{args.out}: {len(splits['train'])} train and {len(splits['val'])} held-out functions")


if __name__ == "__main__":
    main()
