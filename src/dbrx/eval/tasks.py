"""LLM Foundry's ICL tasks: the `icl_tasks` entries of an eval YAML, their JSONL rows, and the prompts Foundry builds
from them (llmfoundry/eval/datasets/in_context_learning_evaluation.py at 8c8dd48f), token for token.

Shape of a prompt (multiple_choice and language_modeling): prompt_string, then each few-shot example as
[example_delimiter] + prelimiter + context + continuation_delimiter + answer, then the test example's
[example_delimiter] + prelimiter + context + continuation_delimiter, right-stripped. The delimiter goes before an
example only when text precedes it. The scored continuation (each choice, or the LM continuation) gets a leading
space unless it has one (cl100k encodes ' a' as one token). Schema tasks put the prelimiter before the delimiter,
and a 0-shot schema context has no delimiter at all. Few-shot examples are drawn by one random.Random(seed) per
task (per category with has_categories), advanced through the rows in order, excluding the test row, and concatenated
in the iteration order of the Python set Foundry collects them in. Contexts too long are cut from the left.
"""

from __future__ import annotations

import difflib
import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASK_TYPES = ("multiple_choice", "schema", "language_modeling", "generation_task_with_answers", "question_answering",
              "code_evaluation")
GENERATION_TYPES = ("generation_task_with_answers", "question_answering")  # the second: Foundry's old alias
SCORED_TYPES = ("multiple_choice", "schema", "language_modeling") + GENERATION_TYPES + ("code_evaluation",)
METRIC = {"multiple_choice": "InContextLearningMultipleChoiceAccuracy",
          "schema": "InContextLearningMultipleChoiceAccuracy",
          "language_modeling": "InContextLearningLMAccuracy",
          "generation_task_with_answers": "InContextLearningGenerationExactMatchAccuracy",
          "question_answering": "InContextLearningGenerationExactMatchAccuracy",
          "code_evaluation": "InContextLearningCodeEvalAccuracy"}  # dbrx.eval.code

# Every key Foundry's build_icl_evaluators accepts on an icl_tasks entry, with its default.
TASK_KEYS: dict[str, Any] = {
    "label": None, "dataset_uri": None, "icl_task_type": None, "num_fewshot": None, "metric_names": None,
    "max_seq_len": None, "batch_size": None, "has_categories": False, "hf_loading_vars": {}, "hf_parsing_map": {},
    "prompt_string": "", "example_delimiter": "\n", "continuation_delimiter": " ", "prelimiter": "",
    "question_prelimiter": None, "fewshot_random_seed": 1234, "strip_dataset": True, "context_key": None,
    "answer_key": None, "choices_key": None, "padding_size": None, "tokenize_labels": None, "generation_kwargs": None,
    "cot_delimiter": "", "early_stopping_criteria": None, "do_normalization": True, "pass_at_k": 1,
    "generations_per_sample": 1,
}
REQUIRED = ("label", "dataset_uri", "icl_task_type", "num_fewshot")
NOT_HONOURED = ("metric_names", "hf_loading_vars", "hf_parsing_map", "context_key", "answer_key", "choices_key",
                "padding_size", "tokenize_labels", "generation_kwargs")


class EvalError(ValueError):
    """A user mistake in an eval config or task file; the message names the file, line or key."""


@dataclass
class TaskSpec:
    label: str
    dataset_uri: str
    icl_task_type: str
    num_fewshot: list[int]
    options: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:  # the other Foundry keys, with Foundry's defaults
        options = self.__dict__.get("options", {})
        if key in TASK_KEYS:
            return options.get(key, TASK_KEYS[key])
        raise AttributeError(key)


def parse_task(entry: Any, where: str) -> TaskSpec:
    if not isinstance(entry, dict):
        raise EvalError(f"{where}: expected a mapping with {', '.join(REQUIRED)}, got {entry!r}")
    for key in entry:
        if key not in TASK_KEYS:
            near = difflib.get_close_matches(str(key), list(TASK_KEYS), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise EvalError(f"{where}: unknown key '{key}'{hint}")
    missing = [k for k in REQUIRED if entry.get(k) is None]
    if missing:
        raise EvalError(f"{where}: missing {', '.join(missing)}")
    kind = entry["icl_task_type"]
    if kind not in TASK_TYPES:
        near = difflib.get_close_matches(str(kind), TASK_TYPES, n=1)
        raise EvalError(f"{where}.icl_task_type: unknown task type {kind!r}"
                        + (f"; did you mean '{near[0]}'?" if near else f" (one of {', '.join(TASK_TYPES)})"))
    shots = entry["num_fewshot"]
    shots = [shots] if isinstance(shots, int) else shots
    if not isinstance(shots, list) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0
                                              for k in shots):
        raise EvalError(f"{where}.num_fewshot: expected a list of non-negative integers, got {entry['num_fewshot']!r}")
    for key in NOT_HONOURED:  # keys that would change what is scored: refused rather than ignored
        if entry.get(key) not in (None, {}, [], TASK_KEYS[key]):
            raise EvalError(f"{where}.{key}: {entry[key]!r} is not supported by dbrx eval yet; remove it")
    options = {k: v for k, v in entry.items() if k not in REQUIRED}
    if options.get("question_prelimiter") is not None:  # Foundry's legacy name
        if options.get("prelimiter"):
            raise EvalError(f"{where}: give prelimiter or question_prelimiter, not both")
        options["prelimiter"] = options.pop("question_prelimiter")
    return TaskSpec(str(entry["label"]), str(entry["dataset_uri"]), kind, shots, options)


def resolve_uri(uri: str, dataset_root: str | Path | None, where: str) -> Path:
    """A local path. Foundry's YAMLs name files relative to its scripts folder (eval/local_data/...):
    with dataset_root, the path is tried under it, then without its leading folders (eval/ ...)."""
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise EvalError(f"{where}.dataset_uri: {uri} needs the network ({scheme}://), which dbrx eval never uses; "
                        "download the file and give its local path")
    path = Path(uri)
    if dataset_root is not None and not path.is_absolute():
        candidates = [Path(dataset_root, *path.parts[i:]) for i in range(len(path.parts))]
        for candidate in candidates:
            if candidate.exists():
                return candidate
        # absent: name it where its folder is (for the message)
        return next((c for c in candidates if c.parent.is_dir()), candidates[0])
    return path


def read_rows(path: Path, required: tuple[str, ...]) -> list[dict]:
    """A JSONL file's rows; a malformed line or a missing field is an error naming the file and line."""
    if not path.exists():
        raise EvalError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise EvalError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            absent = [k for k in required if k not in row]
            if absent:
                raise EvalError(f"{path}:{n}: missing field(s) {', '.join(absent)}")
            row["_line"] = n
            rows.append(row)
    if not rows:
        raise EvalError(f"{path}: no rows")
    return rows


def fewshot_indices(n: int, k: int, idx: int, rng: random.Random) -> list[int]:
    """Foundry's get_fewshot_sample_idxs, including its order: the indices as a Python set iterates them."""
    k = min(n - 1, k)
    chosen = set(rng.sample(range(0, n), k))
    if idx in chosen:
        chosen.remove(idx)
        if len(chosen) < n - 1:  # Foundry's refill when the test row was drawn
            r = rng.choice(range(0, n))
            while r in chosen or r == idx:
                r = rng.choice(range(0, n))
            chosen.add(r)
    return list(chosen)


@dataclass
class Example:
    """One scored row: the context ids and, per choice, the continuation ids (one for language_modeling); for
    schema, one context per option and a shared continuation."""
    row: dict
    contexts: list[list[int]]
    continuations: list[list[int]]
    gold: int | None
    context_text: list[str]
    continuation_text: list[str]
    category: str | None = None


def _with_space(text: str) -> str:
    return text if text.startswith(" ") else " " + text


def build_examples(spec: TaskSpec, rows: list[dict], num_fewshot: int, tokenizer, max_seq_len: int,
                   path: Path) -> list[Example]:
    """Foundry's prompts for one (task, num_fewshot[, category]) dataset of `rows` (already one category's)."""
    kind = spec.icl_task_type
    strip = bool(spec.strip_dataset)
    pre, ex_delim, cont_delim = spec.prelimiter or "", spec.example_delimiter, spec.continuation_delimiter

    def shot(fs: dict, preamble: str) -> str:
        if kind == "schema":
            return pre + (ex_delim if preamble else "") + fs["context_options"][fs["gold"]] + cont_delim \
                + fs["continuation"]
        answer = fs["choices"][fs["gold"]] if kind == "multiple_choice" else fs["continuation"]
        return (ex_delim if preamble else "") + pre + fs[_context_key(kind)] + cont_delim + answer

    out = []
    for row, preamble in _with_fewshot(spec, rows, num_fewshot, path, shot):
        pre_ids = tokenizer.encode(preamble) if preamble else []
        if kind == "schema":
            cd = cont_delim.rstrip() if strip else cont_delim
            ctx_texts = [pre + ex_delim + opt + cd if preamble else pre + opt for opt in row["context_options"]]
            contexts = [pre_ids + tokenizer.encode(t) for t in ctx_texts]
            cont_text = _with_space(row["continuation"])
            cont_ids = tokenizer.encode(cont_text)
            conts, cont_texts = [cont_ids] * len(contexts), [cont_text] * len(contexts)
            ctx_texts = [preamble + t for t in ctx_texts]
        else:
            text = (ex_delim if preamble else "") + pre + row[_context_key(kind)] + cont_delim
            if strip:
                text = text.rstrip()
            ctx = pre_ids + tokenizer.encode(text)
            cont_texts = [_with_space(c) for c in row["choices"]] if kind == "multiple_choice" \
                else [_with_space(row["continuation"])]
            conts = [tokenizer.encode(t) for t in cont_texts]
            contexts, ctx_texts = [ctx] * len(conts), [preamble + text] * len(conts)
        gold = None
        if kind in ("multiple_choice", "schema"):
            gold = row["gold"]
            n = len(contexts)
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < n:
                raise EvalError(f"{path}:{row['_line']}: gold {gold!r} is not an index into its {n} "
                                f"{'choices' if kind == 'multiple_choice' else 'context_options'}")
        contexts = [_trim(c, k, max_seq_len, path, row) for c, k in zip(contexts, conts)]
        out.append(Example(row, contexts, conts, gold, ctx_texts, cont_texts, row.get("category")))
    return out


def _with_fewshot(spec: TaskSpec, rows: list[dict], num_fewshot: int, path: Path, shot):
    """(row, preamble) for each row, as Foundry prepares them: top-level strings stripped (strip_dataset), then
    prompt_string and the few-shot examples (shot(example, text so far) formats one), drawn by one
    random.Random(fewshot_random_seed) advanced through the rows in order."""
    if spec.strip_dataset:
        rows = [{k: (v.strip() if isinstance(v, str) else v) for k, v in r.items()} for r in rows]
    if num_fewshot >= len(rows) and num_fewshot > 0:
        raise EvalError(f"{path}: {spec.label} asks for {num_fewshot} few-shot examples but the file has only "
                        f"{len(rows)} rows (each example needs {num_fewshot} others)")
    rng = random.Random(spec.fewshot_random_seed)
    for idx, row in enumerate(rows):
        preamble = spec.prompt_string or ""
        for j in fewshot_indices(len(rows), num_fewshot, idx, rng) if num_fewshot > 0 else []:
            preamble += shot(rows[j], preamble)
        yield row, preamble


def _context_key(kind: str) -> str:
    return "query" if kind == "multiple_choice" else "context"


def _trim(ctx: list[int], cont: list[int], max_seq_len: int, path: Path, row: dict) -> list[int]:
    """Foundry's trim_context: cut the context from the left so that context + continuation fit."""
    if len(cont) > max_seq_len:
        raise EvalError(f"{path}:{row['_line']}: the continuation alone has {len(cont)} tokens, more than "
                        f"max_seq_len {max_seq_len}")
    if len(ctx) + len(cont) > max_seq_len:
        ctx = ctx[-(max_seq_len - len(cont)):]
    return ctx


REQUIRED_FIELDS = {"multiple_choice": ("query", "choices", "gold"),
                   "schema": ("context_options", "continuation", "gold"),
                   "language_modeling": ("context", "continuation"),
                   "generation_task_with_answers": ("context", "answer"),
                   "question_answering": ("context", "answer"),
                   "code_evaluation": ("prompt", "canonical_solution", "entry_point")}  # and tests: dbrx.eval.code


# ---- generation tasks -------------------------------------------------------------------------------------------
@dataclass
class GenerationExample:
    row: dict
    context: list[int]
    context_text: str
    aliases: list[str]  # the answer and its aliases, as given (unstripped)
    category: str | None = None


def build_generation_examples(spec: TaskSpec, rows: list[dict], num_fewshot: int, tokenizer, max_seq_len: int,
                              path: Path) -> tuple[list[GenerationExample], int]:
    """Foundry's generation_task_with_answers prompts, and max_new_tokens: the longest answer (or chain of thought,
    delimiter and answer) in tokens, plus 10 when there is a cot_delimiter. Contexts are cut from the left to
    leave room for that many new tokens."""
    cot = spec.cot_delimiter or ""
    has_cot = any("chain_of_thought" in r for r in rows)
    for r in rows:
        if "aliases" in r and not (isinstance(r["aliases"], list) and all(isinstance(a, str) for a in r["aliases"])):
            raise EvalError(f"{path}:{r['_line']}: aliases must be a list of strings")
    aliases = [list(dict.fromkeys([r["answer"]] + list(r.get("aliases", [])))) for r in rows]

    def response(r: dict, answer: str) -> str:
        return f"{r.get('chain_of_thought', '')}{cot}{answer}" if has_cot else answer

    longest = max(len(tokenizer.encode(response(r, a))) for r, al in zip(rows, aliases) for a in al)
    max_new = max(1, longest + (10 if cot else 0))
    if max_seq_len <= max_new:
        raise EvalError(f"{path}: max_seq_len {max_seq_len} leaves no room for a prompt before {max_new} new tokens")
    strip = bool(spec.strip_dataset)
    pre, ex_delim, cont_delim = spec.prelimiter or "", spec.example_delimiter, spec.continuation_delimiter

    def shot(fs: dict, preamble: str) -> str:
        return (ex_delim if preamble else "") + pre + fs["context"] + cont_delim + response(fs, fs["answer"])

    out = []
    for idx, (row, preamble) in enumerate(_with_fewshot(spec, rows, num_fewshot, path, shot)):
        text = (ex_delim if preamble else "") + pre + row["context"] + cont_delim
        if strip:
            text = text.rstrip()
        ids = (tokenizer.encode(preamble) if preamble else []) + tokenizer.encode(text)
        ids = ids[-(max_seq_len - max_new):]
        out.append(GenerationExample(row, ids, preamble + text, aliases[idx], row.get("category")))
    return out, max_new


def normalize_answer(text: str) -> str:
    """Foundry's (SQuAD's) normalisation: underscores to spaces, lower case, punctuation to spaces, articles
    dropped, whitespace collapsed."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in _PUNCTUATION else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split()).strip()


_PUNCTUATION = set(string.punctuation + "\u2018\u2019\u00b4`")


def cut_at_stops(output: str, stops: list[str] | None) -> str:
    """The output up to its first stop string (the strings joined as one regular expression, as Foundry does)."""
    return re.split("|".join(stops), output)[0] if stops else output


def answer_is_correct(output: str, aliases: list[str], stops: list[str] | None, cot_delimiter: str,
                      normalize: bool) -> bool:
    """Foundry's InContextLearningGenerationExactMatchAccuracy for one output: cut at the first stop string (the
    strings joined as a regular expression, as Foundry does), keep what follows the last cot_delimiter, then a
    prefix match against any alias."""
    output = cut_at_stops(output, stops)
    if cot_delimiter:
        output = output.split(cot_delimiter)[-1]
    clean = normalize_answer if normalize else str.strip
    out = clean(output)
    return any(out.startswith(clean(a)) for a in aliases)


# ---- instruct models (--chat) ---------------------------------------------------------------------------------
def chat_prompt(tokenizer, text: str, budget: int) -> list[int]:
    """`text` as one user turn of DBRX's chat template (default system prompt), ending with the assistant's
    header; a prompt over `budget` tokens loses the start of the user's text, never the template."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    while len(ids) > budget:
        user = tokenizer.encode(text)
        if len(ids) - budget >= len(user):
            raise EvalError(f"the chat template alone ({len(ids) - len(user)} tokens) leaves no room in "
                            f"{budget} tokens")
        text = tokenizer.decode(user[len(ids) - budget:])
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return ids


def chat_examples(examples: list[Example], tokenizer, max_seq_len: int) -> list[Example]:
    """Log-likelihood examples for an instruct model: each context (few-shot examples included) as the user's
    turn, each continuation as the start of the assistant's reply (without Foundry's leading space)."""
    out = []
    for ex in examples:
        texts = [t.lstrip(" ") for t in ex.continuation_text]
        conts = [tokenizer.encode(t) for t in texts]
        contexts = [chat_prompt(tokenizer, c, max_seq_len - len(t)) for c, t in zip(ex.context_text, conts)]
        out.append(Example(ex.row, contexts, conts, ex.gold, ex.context_text, texts, ex.category))
    return out


def chat_generation_examples(examples: list[GenerationExample], tokenizer, max_seq_len: int,
                             max_new: int) -> list[GenerationExample]:
    return [GenerationExample(ex.row, chat_prompt(tokenizer, ex.context_text, max_seq_len - max_new),
                              ex.context_text, ex.aliases, ex.category) for ex in examples]


# ---- numeric answers (GSM8K-style), strict and flexible -----------------------------------------------------
_NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")  # lm-eval's flexible-extract pattern


def _as_number(text: str):
    from decimal import Decimal, InvalidOperation

    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def numeric_answers(aliases: list[str]) -> list:
    """The answers as numbers, or [] when one of them is not a number."""
    numbers = [_as_number(a) for a in aliases]
    return [] if any(n is None for n in numbers) else numbers


def strict_number(output: str, stops: list[str] | None, marker: str):
    """The number right after the answer marker the prompt teaches (Foundry's cot_delimiter, 'The answer is ';
    lm-eval's '#### ' when there is none), first occurrence; None when the output does not follow the format."""
    m = re.search(re.escape(marker) + r"\s*(-?[$0-9.,]+)", cut_at_stops(output, stops))
    return _as_number(m.group(1)) if m else None


def flexible_number(output: str, stops: list[str] | None):
    """The last number anywhere in the output (lm-eval's flexible-extract)."""
    found = _NUMBER.findall(cut_at_stops(output, stops))
    return _as_number(found[-1]) if found else None
