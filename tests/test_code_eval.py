"""dbrx eval's code_evaluation: Foundry's prompts, cut and pass@k, real rows' canonical solutions passing in the
sandbox, wrong ones failing, the whole task through `evaluate`, and the refusal without --allow-code-execution.

tests/data/code_eval_rows.jsonl holds five rows of Foundry's programming files (HumanEval/0 and /4 from
human_eval.jsonl, CPP/0 from processed_human_eval_cpp.jsonl, JavaScript/0 from processed_human_eval_js.jsonl) and
HumanEval/7 in HumanEval's own format (no test_inputs: checked with its `test` and check(entry_point))."""

import json
from pathlib import Path

import pytest
import yaml

from dbrx.eval import EvalError, evaluate
from dbrx.eval.code import (CodeExample, build_code_examples, check_code_task, check_completion, cut_completion,
                            pass_at_k)
from dbrx.eval.sandbox import Limits, missing_runtime
from dbrx.eval.tasks import REQUIRED_FIELDS, parse_task, read_rows
from dbrx.tokenizer import Tokenizer
from test_eval import model, tok  # noqa: F401 (fixtures: a tiny DBRX with the full vocabulary, the tokenizer)

ROWS = Path(__file__).parent / "data" / "code_eval_rows.jsonl"
PROGRAMMING = Path(__file__).resolve().parents[2] / "shared" / "foundry_eval" / "local_data" / "programming"
pytestmark = pytest.mark.skipif(any(missing_runtime(lang) for lang in ("python", "c++", "javascript")),
                                reason="needs POSIX, g++ and node")


def spec_for(path: Path, **options):
    return parse_task({"label": "code", "dataset_uri": str(path), "icl_task_type": "code_evaluation",
                       "num_fewshot": [0], **options}, "t")


def examples_of(path: Path, tok, **options) -> list[CodeExample]:
    rows = read_rows(path, REQUIRED_FIELDS["code_evaluation"])
    return build_code_examples(spec_for(path, **options), rows, 0, tok, 2048, path)[0]


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # k = 1: the fraction that passed
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3, 2) / C(5, 2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7, 5) / C(10, 5)
    assert pass_at_k(20, 1, 10) == pytest.approx(0.5)  # 1 - C(19, 10) / C(20, 10)
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k: every draw of 2 holds a pass
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_completions_are_cut_where_foundry_cuts_them():
    text = "    return x + 1\n\n\ndef other():\n    pass\n"
    assert cut_completion(text) == "    return x + 1\n\n"  # at the next top-level statement
    assert cut_completion("    a = 1\n    return a\n# done") == "    a = 1\n    return a"
    assert cut_completion("  return 1;\n}\n```\nmore") == "  return 1;\n}"  # a brace stays; a fence goes
    assert cut_completion("    return 2\n") == "    return 2\n"


def test_foundry_prompts_are_not_stripped_and_end_with_the_delimiter(tok, tmp_path):
    rows = read_rows(ROWS, REQUIRED_FIELDS["code_evaluation"])
    spec = spec_for(ROWS)
    zero, max_new = build_code_examples(spec, rows, 0, tok, 2048, ROWS)
    assert zero[0].context_text == rows[0]["prompt"] + " "  # continuation_delimiter ' ', nothing stripped
    assert zero[0].context == tok.encode(rows[0]["prompt"] + " ")
    assert max_new == max(len(tok.encode(r["canonical_solution"])) for r in rows) + 10
    one, _ = build_code_examples(spec, rows, 1, tok, 2048, ROWS)
    for ex, row in zip(one, rows):  # one other row's prompt and canonical solution first, then "\n" and this prompt
        shot = next(r for r in rows if r is not row and ex.context_text.startswith(r["prompt"] + " "
                                                                                  + r["canonical_solution"]))
        assert ex.context_text == shot["prompt"] + " " + shot["canonical_solution"] + "\n" + row["prompt"] + " "
    short, max_new = build_code_examples(spec, rows, 0, tok, 100, ROWS)  # little room: cut from the left
    assert max_new >= 1 and all(len(ex.context) <= 100 - max_new for ex in short)
    assert [(ex.language, ex.tests is None) for ex in zero] == [
        ("python", False), ("python", False), ("c++", False), ("javascript", False), ("python", True)]


def test_canonical_solutions_pass_and_wrong_completions_fail(tok):
    examples = examples_of(ROWS, tok)
    for ex in examples:  # python (Foundry's rows and HumanEval's own), c++ and javascript
        check = check_completion(ex, ex.row["canonical_solution"])
        assert check.passed and check.tests_passed == check.tests == (len(ex.tests) if ex.tests else 1), \
            (ex.row["task_id"], check.failure)
    python, _, cpp, js, humaneval = examples
    wrong = check_completion(python, "    return not True\n")
    assert not wrong.passed and wrong.tests_passed == 0 and "wrong answer" in wrong.failure
    assert "SyntaxError" in check_completion(python, "    return (\n").failure
    loop = check_completion(python, "    while True:\n        pass\n", Limits(timeout_s=1.0))
    assert not loop.passed and "timed out" in loop.failure
    assert "compile error" in check_completion(cpp, "    return undefined_thing;\n}\n").failure
    assert "wrong answer" in check_completion(cpp, "    return false;\n}\n").failure
    assert "wrong answer" in check_completion(js, "  return false;\n}\n").failure
    failed = check_completion(humaneval, "    return strings\n")  # HumanEval's check() asserts
    assert not failed.passed and "AssertionError" in failed.failure


def test_code_task_runs_end_to_end_through_evaluate(model, tok, tmp_path, monkeypatch):
    # max_seq_len 140: the longest prompt has 119 tokens, so max_new_tokens = min(80 + 10, 140 - 119) = 21
    task = {"label": "code", "dataset_uri": str(ROWS), "icl_task_type": "code_evaluation", "num_fewshot": [0],
            "generations_per_sample": 2, "pass_at_k": [1, 2], "max_seq_len": 140, "batch_size": 10}
    cfg = {"max_seq_len": 256, "device_eval_batch_size": 4, "icl_tasks": [task]}
    result = evaluate(model, tok, cfg, out_dir=tmp_path / "out", log=lambda *_: None, allow_code_execution=True)
    m = result["metrics"]
    assert m == {"metrics/code/0-shot/InContextLearningCodeEvalAccuracy/pass@1": 0.0,  # a random model's code fails
                 "metrics/code/0-shot/InContextLearningCodeEvalAccuracy/pass@2": 0.0}
    rows = [json.loads(line) for line in (tmp_path / "out" / "examples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["generations"]) == 2 for r in rows)
    first = rows[0]
    assert first["task_id"] == "HumanEval/0"
    assert first["completions"] == [cut_completion(g) for g in first["generations"]]
    assert first["passed"] == [False, False] and all(first["failures"]) and first["pass_at_k"] == {"1": 0.0, "2": 0.0}

    # a model that writes the canonical solution in the first of each row's two generations: pass@1 1/2, pass@2 1;
    # with one k, the metric has Foundry's plain name
    import sys

    source = read_rows(ROWS, REQUIRED_FIELDS["code_evaluation"])
    done = []

    def fake_generate(model, prompts, max_new, **kwargs):
        assert kwargs["temperature"] == 0.2 and kwargs["top_k"] == 50  # Foundry's sampling
        out = []
        for _ in prompts:
            j = len(done)
            done.append(j)
            text = source[j // 2]["canonical_solution"] if j % 2 == 0 else "    return None\n"
            out.append(tok.encode(text) + [tok.eos_token_id])
        return out

    monkeypatch.setattr(sys.modules["dbrx.generate"], "generate", fake_generate)
    good = evaluate(model, tok, cfg, log=lambda *_: None, allow_code_execution=True)["metrics"]
    assert good["metrics/code/0-shot/InContextLearningCodeEvalAccuracy/pass@1"] == pytest.approx(0.5)
    assert good["metrics/code/0-shot/InContextLearningCodeEvalAccuracy/pass@2"] == pytest.approx(1.0)
    done.clear()
    one = {**task, "pass_at_k": 1}
    assert evaluate(model, tok, {**cfg, "icl_tasks": [one]}, log=lambda *_: None, allow_code_execution=True)[
        "metrics"] == {"metrics/code/0-shot/InContextLearningCodeEvalAccuracy": pytest.approx(0.5)}


def test_code_tasks_are_refused_without_allow_code_execution(model, tmp_path, capsys):
    cfg = {"max_seq_len": 256, "device_eval_batch_size": 2, "icl_tasks": [
        {"label": "human_eval", "dataset_uri": str(ROWS), "icl_task_type": "code_evaluation", "num_fewshot": [0]}]}
    with pytest.raises(EvalError, match=r"icl_tasks\[0\] \(human_eval\): code_evaluation runs the programs the "
                                        r"model writes; pass --allow-code-execution"):
        evaluate(None, Tokenizer(), cfg, log=lambda *_: None)  # refused before any model is needed
    from dbrx.cli import main

    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(tmp_path / "eval.yaml"), "--model", str(tmp_path / "no-model")]) == 2
    assert "pass --allow-code-execution" in capsys.readouterr().err


def test_bad_code_tasks_and_rows_are_named(tmp_path, monkeypatch):
    with pytest.raises(EvalError, match=r"generations_per_sample \(1\) must be at least pass_at_k \(\[5\]\)"):
        check_code_task(spec_for(ROWS, pass_at_k=5), ROWS, "icl_tasks[0]", True)
    with pytest.raises(EvalError, match=r"icl_tasks\[0\].pass_at_k: expected a positive integer"):
        check_code_task(spec_for(ROWS, pass_at_k=[0]), ROWS, "icl_tasks[0]", True)
    row = {"task_id": "x", "prompt": "p", "canonical_solution": "c", "entry_point": "f"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**row, "test": "assert True"}) + "\n" + json.dumps({**row, "language": "c"}) + "\n")
    with pytest.raises(EvalError, match=r"bad.jsonl:2: language 'c' is not supported"):
        check_code_task(spec_for(bad), bad, "icl_tasks[0]", True)
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(EvalError, match=r"bad.jsonl:1: no tests: give test_inputs and test_outputs"):
        check_code_task(spec_for(bad), bad, "icl_tasks[0]", True)
    monkeypatch.setattr("dbrx.eval.sandbox.shutil.which", lambda name: None)
    with pytest.raises(EvalError, match=r"code_eval_rows.jsonl: c\+\+ programs need g\+\+, which is not on PATH"):
        check_code_task(spec_for(ROWS), ROWS, "icl_tasks[0]", True)


@pytest.mark.skipif(not PROGRAMMING.exists(), reason="../shared/foundry_eval (Foundry's task files) is not present")
def test_every_foundry_programming_file_loads_and_its_first_canonical_solution_passes(tok):
    files = sorted(PROGRAMMING.glob("*.jsonl"))
    assert len(files) == 8
    for path in files:
        check_code_task(spec_for(path), path, path.name, True)
        examples = examples_of(path, tok)
        check = check_completion(examples[0], examples[0].row["canonical_solution"])
        assert check.passed, (path.name, check.failure)
