"""`dbrx eval`: LLM Foundry's eval YAML (icl_tasks, eval_gauntlet, max_seq_len, device_eval_batch_size,
icl_subset_num_batches, ...) run on one model; results under Foundry's metric names."""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from dbrx.eval.code import CODE_TYPES, build_code_examples, check_code_task, score_code, subset_code_examples
from dbrx.eval.gauntlet import gauntlet_scores
from dbrx.eval.scoring import generate_texts, score_groups
from dbrx.eval.tasks import (GENERATION_TYPES, METRIC, REQUIRED_FIELDS, SCORED_TYPES, EvalError, Example,
                             GenerationExample, TaskSpec, answer_is_correct, build_examples,
                             build_generation_examples, chat_examples, chat_generation_examples,
                             flexible_number, numeric_answers, parse_task, read_rows, resolve_uri, strict_number)
from dbrx.fileio import atomic_path, atomic_write_text

# Foundry's top-level eval keys (llmfoundry EvalConfig); `dataset_root` is ours: where relative dataset_uris live.
TOP_KEYS = ("icl_tasks", "eval_gauntlet", "max_seq_len", "device_eval_batch_size", "icl_subset_num_batches", "seed",
            "precision", "model", "models", "tokenizer", "load_path", "model_name", "dataset_root", "run_name",
            "loggers", "callbacks", "fsdp_config", "metadata", "python_log_level", "console_log_interval",
            "log_config", "dist_timeout", "code_paths", "variables", "eval_loader", "eval_loaders",
            "eval_subset_num_batches")


def check_config(cfg: dict) -> None:
    for key in cfg:
        if key not in TOP_KEYS:
            near = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            raise EvalError(f"unknown key '{key}'" + (f"; did you mean '{near[0]}'?" if near else ""))
    for key in ("max_seq_len", "device_eval_batch_size"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise EvalError(f"{key}: expected a positive integer, got {value!r}")


def _section(value: Any, key: str, base: Path | None) -> Any:
    """An inline section, or a path to a YAML holding it under the same key (Foundry's tasks_v0.3.yaml)."""
    if not isinstance(value, str):
        return value
    path = Path(value)
    if not path.exists() and base is not None and (base / value).exists():
        path = base / value
    if not path.exists():
        raise EvalError(f"{key}: {value}: no such file")
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict) or key not in loaded:
        raise EvalError(f"{path}: expected a YAML mapping with an '{key}' key")
    return loaded[key]


def check_tasks(cfg: dict, config_dir: Path | None = None, log: Callable[[str], None] = print,
                allow_code_execution: bool = False, chat: bool = False) -> list[tuple[TaskSpec, Path | None]]:
    """Every task parsed and its file looked for, before any model is loaded: (spec, local path) in order. A task
    whose file is absent gets None and is reported (a Gauntlet category missing it is then incomplete); an error
    only if no task's file is found. code_evaluation tasks are refused without `allow_code_execution`, and with
    `chat` (their prompts are code to complete)."""
    check_config(cfg)
    tasks_cfg = _section(cfg.get("icl_tasks") or [], "icl_tasks", config_dir)
    if not isinstance(tasks_cfg, list) or not tasks_cfg:
        raise EvalError("icl_tasks: expected a non-empty list of tasks (or a path to a YAML with one)")
    out = []
    for i, entry in enumerate(tasks_cfg):
        spec = parse_task(entry, f"icl_tasks[{i}]")
        if spec.icl_task_type not in SCORED_TYPES:
            raise EvalError(f"icl_tasks[{i}] ({spec.label}): task type {spec.icl_task_type!r} is not built yet "
                            f"(built: {', '.join(SCORED_TYPES)})")
        path = resolve_uri(spec.dataset_uri, cfg.get("dataset_root"), f"icl_tasks[{i}] ({spec.label})")
        if spec.icl_task_type in CODE_TYPES and chat:
            raise EvalError(f"icl_tasks[{i}] ({spec.label}): code_evaluation prompts are code to complete; --chat "
                            "does not apply to them")
        if spec.icl_task_type in CODE_TYPES:  # refused, or its rows and their compilers checked, now
            check_code_task(spec, path if path.exists() else None, f"icl_tasks[{i}]", allow_code_execution)
        hint = "" if cfg.get("dataset_root") else " (a relative path from Foundry's YAMLs? give dataset_root=DIR)"
        if not path.exists():
            log(f"warning: icl_tasks[{i}] ({spec.label}).dataset_uri: {path}: no such file{hint}; skipped")
        else:  # every row read now: a malformed line stops the run before any task is scored
            rows = read_rows(path, _required(spec))
            if max(spec.num_fewshot) >= len(rows) and max(spec.num_fewshot) > 0:
                raise EvalError(f"{path}: {spec.label} asks for {max(spec.num_fewshot)} few-shot examples but "
                                f"the file has only {len(rows)} rows (each example needs that many others)")
        out.append((spec, path if path.exists() else None))
    if cfg.get("eval_gauntlet") is not None:  # its structure checked now, not after the scoring
        gauntlet_scores(_section(cfg["eval_gauntlet"], "eval_gauntlet", config_dir), {}, {})
    if all(path is None for _, path in out):
        raise EvalError(f"icl_tasks: none of the {len(out)} tasks' files exists (first: "
                        f"{resolve_uri(out[0][0].dataset_uri, cfg.get('dataset_root'), '')}){hint}")
    return out


def evaluate(model, tokenizer, cfg: dict, out_dir: Path | None = None, log: Callable[[str], None] = print,
             config_dir: Path | None = None, tasks: list | None = None, chat: bool = False,
             allow_code_execution: bool = False) -> dict[str, Any]:
    """Run every task of `cfg` on `model`; returns {"metrics": {...}, "gauntlet": {...} | None, ...} and, with
    `out_dir`, writes results.json and examples.jsonl there (each under a temporary name, then renamed).
    `tasks`: check_tasks(cfg)'s result, when the caller has it already. `chat`: for instruct models, each prompt
    is the user's turn of DBRX's chat template and generation stops at DBRX's stop ids. `allow_code_execution`:
    run the programs of code_evaluation tasks in dbrx.eval.sandbox; without it such a task is an error."""
    if tasks is None:
        tasks = check_tasks(cfg, config_dir, log=log, allow_code_execution=allow_code_execution, chat=chat)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise EvalError(f"the model's vocabulary has {model.config.vocab_size} ids, fewer than the tokenizer's "
                        f"{tokenizer.vocab_size}: the prompts are DBRX-tokenizer text")
    model.eval()
    metrics: dict[str, float] = {}
    sizes: dict[str, int] = {}
    example_rows: list[dict] = []
    t_all = time.perf_counter()
    missing = {spec.label: spec.dataset_uri for spec, path in tasks if path is None}
    for spec, path in tasks:
        if path is None:
            continue
        rows = read_rows(path, _required(spec))
        groups = {None: rows}
        if spec.has_categories:
            groups = {c: [r for r in rows if r["category"] == c] for c in sorted({r["category"] for r in rows})}
        # the model cannot read past its own max_seq_len, whatever the YAML asks
        max_len = min(spec.max_seq_len or cfg["max_seq_len"], model.config.max_seq_len)
        batch = spec.batch_size or cfg["device_eval_batch_size"]
        for k in spec.num_fewshot:
            for category, group in groups.items():
                t0 = time.perf_counter()
                if spec.icl_task_type in CODE_TYPES:  # dbrx.eval.code: sampled programs, run in the sandbox
                    examples, max_new = build_code_examples(spec, group, k, tokenizer, max_len, path)
                    if category is None:
                        examples = subset_code_examples(examples, cfg.get("icl_subset_num_batches"), batch,
                                                        spec.generations_per_sample)
                    accs, code_rows = score_code(model, tokenizer, spec, examples, max_new, batch, k,
                                                 allow_execution=allow_code_execution, seed=cfg.get("seed"))
                    example_rows.extend(code_rows)
                elif spec.icl_task_type in GENERATION_TYPES:
                    examples, max_new = build_generation_examples(spec, group, k, tokenizer, max_len, path)
                    examples = _subset(examples, cfg.get("icl_subset_num_batches"), batch, category is not None)
                    if chat:
                        examples = chat_generation_examples(examples, tokenizer, max_len, max_new)
                    accs = _generate(model, tokenizer, spec, examples, max_new, batch, example_rows, k, chat)
                else:
                    examples = build_examples(spec, group, k, tokenizer, max_len, path)
                    examples = _subset(examples, cfg.get("icl_subset_num_batches"), batch, category is not None)
                    if chat:
                        examples = chat_examples(examples, tokenizer, max_len)
                    accs = _score(model, spec, examples, batch, example_rows, k)
                name = f"{spec.label}/{k}-shot" + (f"/{category}" if category is not None else "")
                for metric, value in accs.items():
                    metrics[f"metrics/{name}/{metric}"] = value
                sizes[name] = len(examples)
                log(f"{name:<48} {next(iter(accs.values())):7.4f}  ({len(examples)} examples, "
                    f"{time.perf_counter() - t0:.1f} s)")
    result: dict[str, Any] = {"metrics": metrics, "examples": sizes, "missing_tasks": missing, "chat": chat,
                              "seconds": time.perf_counter() - t_all}
    if cfg.get("eval_gauntlet") is not None:
        result["gauntlet"] = gauntlet_scores(_section(cfg["eval_gauntlet"], "eval_gauntlet", config_dir), metrics,
                                             sizes)
    if result.get("gauntlet"):
        for key, value in result["gauntlet"].items():
            if key.startswith("icl/"):
                log(f"{key:<48} {value:7.4f}")
        for name, absent in result["gauntlet"]["incomplete"].items():
            log(f"gauntlet: {name} is incomplete (missing {', '.join(absent)})")
    for label, uri in missing.items():
        log(f"not run: {label} ({uri}: no such file)")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "results.json", json.dumps(result, indent=2) + "\n")
        with atomic_path(out_dir / "examples.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in example_rows))
    return result


def _required(spec: TaskSpec) -> tuple[str, ...]:
    return REQUIRED_FIELDS[spec.icl_task_type] + (("category",) if spec.has_categories else ())


def _subset(examples: list, num_batches, batch: int, is_category: bool) -> list[Example]:
    """icl_subset_num_batches (not applied to category datasets, as in Foundry); a multiple-choice batch holds
    max(N, batch) // N questions of N choices."""
    if num_batches is None or is_category or not examples:
        return examples
    choices = len(getattr(examples[0], "continuations", [None]))
    per = max(1, max(choices, batch) // choices)
    return examples[:int(num_batches) * per]


def _score(model, spec: TaskSpec, examples: list[Example], batch: int, sink: list[dict], k: int) -> dict[str, float]:
    # one row per question: its shared context once, then each choice
    groups = [list(zip(ex.contexts, ex.continuations)) for ex in examples]
    correct = acc = acc_norm = 0
    for ex, s in zip(examples, score_groups(model, groups, batch)):
        row = {"task": spec.label, "num_fewshot": k, "line": ex.row["_line"], "prompt": ex.context_text[0],
               "continuations": ex.continuation_text, "logprobs": [x.logprob for x in s],
               "tokens": [x.tokens for x in s]}
        if spec.icl_task_type == "language_modeling":
            row["greedy_match"] = s[0].greedy
            correct += s[0].greedy
        else:
            means = [x.logprob / x.tokens for x in s]  # Foundry: lowest mean per-token loss, first one on ties
            pred = max(range(len(s)), key=lambda i: (means[i], -i))
            by_sum = max(range(len(s)), key=lambda i: (s[i].logprob, -i))  # lm-eval acc
            # lm-eval's acc_norm: by the choice's length in characters, without the space that joins it
            chars = [len(t[1:] if t.startswith(" ") else t) for t in ex.continuation_text]
            by_chars = max(range(len(s)), key=lambda i: (s[i].logprob / max(1, chars[i]), -i))
            row.update(prediction=pred, gold=ex.gold)
            correct += pred == ex.gold
            acc += by_sum == ex.gold
            acc_norm += by_chars == ex.gold
        if ex.category is not None:
            row["category"] = ex.category
        sink.append(row)
    n = max(1, len(examples))
    out = {METRIC[spec.icl_task_type]: correct / n}
    if spec.icl_task_type != "language_modeling":
        out["lm_eval_acc"], out["lm_eval_acc_norm"] = acc / n, acc_norm / n
    return out


def _generate(model, tokenizer, spec: TaskSpec, examples: list[GenerationExample], max_new: int, batch: int,
              sink: list[dict], k: int, chat: bool = False) -> dict[str, float]:
    """Foundry's exact-match accuracy; where every answer is a number (GSM8K, SVAMP), also the number extracted
    strictly (right after the answer marker the prompt teaches) and flexibly (the last number in the output)."""
    stops = spec.early_stopping_criteria or []
    stop_ids = tokenizer.stop_token_ids if chat else [tokenizer.eos_token_id]
    outputs = generate_texts(model, tokenizer, [ex.context for ex in examples], max_new, batch, stops, stop_ids)
    numeric = all(numeric_answers(ex.aliases) for ex in examples)
    marker = spec.cot_delimiter or "#### "
    correct = strict = flexible = 0
    for ex, output in zip(examples, outputs):
        ok = answer_is_correct(output, ex.aliases, stops, spec.cot_delimiter or "", bool(spec.do_normalization))
        correct += ok
        row = {"task": spec.label, "num_fewshot": k, "line": ex.row["_line"], "prompt": ex.context_text,
               "generation": output, "answers": ex.aliases, "correct": ok}
        if numeric:
            golds = numeric_answers(ex.aliases)
            row["strict_match"] = strict_number(output, stops, marker) in golds
            row["flexible_extract"] = flexible_number(output, stops) in golds
            strict, flexible = strict + row["strict_match"], flexible + row["flexible_extract"]
        if ex.category is not None:
            row["category"] = ex.category
        sink.append(row)
    n = max(1, len(examples))
    out = {METRIC[spec.icl_task_type]: correct / n}
    if numeric:
        out["strict_match"], out["flexible_extract"] = strict / n, flexible / n
    return out
