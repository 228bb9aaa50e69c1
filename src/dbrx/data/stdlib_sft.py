"""Small instruction sets built from the Python standard library, for the fine-tuning demo and tests. Two tasks
on the same functions (those with a docstring and a body after it):

- `body`: prompt = a function's signature and docstring, response = its body. This is the code's own order, so
  it is what pretraining on the standard library already teaches.
- `signature`: prompt = an instruction, then the function's docstring and body (dedented), response = its
  signature (decorators and `def` line). Nothing in pretraining puts a function's header after its body: the
  model has to learn the task (name the function from what it does, its parameters from their uses).

    python -m dbrx.data.stdlib_sft --out runs/data/stdlib_sft [--task body|signature] [--stdlib DIR]

writes `train.jsonl` and `val.jsonl` ({"prompt", "response"} rows, held out by module so that no file
straddles the split) and the same rows as a hub-style dataset snapshot, `hub/stdlib-functions/` with
`data/{train,validation}-00000-of-00001.parquet` in the task's own column names (`signature`, `body` for the
body task), which the hub-style config maps with a `preprocessing_fn`.
"""

from __future__ import annotations

import argparse
import ast
import json
import sysconfig
import textwrap
import zlib
from collections.abc import Iterator
from pathlib import Path

from dbrx.fileio import atomic_path, atomic_write_text


SIGNATURE_INSTRUCTION = "Write the signature of the function with this docstring and body."
HUB_COLUMNS = {"body": ("signature", "body"), "signature": ("docstring_and_body", "signature")}
"""Each task's (prompt, response) column names in the hub-style snapshot."""


def functions_with_docstrings(source: str, max_chars: int) -> Iterator[tuple[str, str, str]]:
    """(signature, docstring, body) of every function or method that has a docstring and a body after it, as
    their source lines (the signature with its decorators)."""
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
        signature = "".join(lines[start:doc.lineno - 1])
        docstring = "".join(lines[doc.lineno - 1:doc.end_lineno])
        body = "".join(lines[doc.end_lineno:node.end_lineno])
        if body.strip() and len(signature) + len(docstring) + len(body) <= max_chars:
            yield signature, docstring, body


def example(task: str, signature: str, docstring: str, body: str) -> dict | None:
    """One {prompt, response} row of `task`, or None where the function does not make one."""
    if task == "body":
        return {"prompt": signature + docstring, "response": body}
    if not signature.strip():  # `def f(): """doc"""` on one line: no header of its own to ask for
        return None
    # Dedented as a whole, so that a method reads as a function and the body keeps its indentation.
    lines = textwrap.dedent(signature + docstring + body).splitlines(keepends=True)
    head = len(signature.splitlines())
    rest = "".join(lines[head:]).rstrip("\n")
    return {"prompt": f"{SIGNATURE_INSTRUCTION}\n\n{rest}\n\n", "response": "".join(lines[:head])}


def build(stdlib: Path, val_fraction: float = 0.05, max_chars: int = 1500, seed: int = 0,
          task: str = "body") -> dict[str, list[dict]]:
    if task not in HUB_COLUMNS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(HUB_COLUMNS)}")
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
        for parts in functions_with_docstrings(source, max_chars):
            if (row := example(task, *parts)) is not None:
                splits["val" if held_out else "train"].append(row)
    return splits


def write(out: Path, splits: dict[str, list[dict]], task: str = "body") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        atomic_write_text(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    hub = out / "hub" / "stdlib-functions" / "data"
    hub.mkdir(parents=True, exist_ok=True)
    prompt, response = HUB_COLUMNS[task]
    for split, name in (("train", "train"), ("val", "validation")):
        table = pa.table({prompt: [r["prompt"] for r in splits[split]],
                          response: [r["response"] for r in splits[split]]})
        with atomic_path(hub / f"{name}-00000-of-00001.parquet") as tmp:
            pq.write_table(table, tmp)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--task", choices=sorted(HUB_COLUMNS), default="body",
                   help="body: signature + docstring -> body; signature: docstring + body -> signature")
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--max-chars", type=int, default=1500)
    args = p.parse_args(argv)
    splits = build(args.stdlib, args.val_fraction, args.max_chars, task=args.task)
    write(args.out, splits, args.task)
    print(f"{args.out}: {args.task} task, {len(splits['train'])} train and {len(splits['val'])} held-out functions")


if __name__ == "__main__":
    main()
