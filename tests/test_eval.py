"""dbrx eval: LLM Foundry's prompts and scores for the log-likelihood task types, the Gauntlet's arithmetic, errors
that name the file and line, and Foundry's own task files (read from ../shared/foundry_eval where present)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from dbrx import DbrxForCausalLM
from dbrx.config import DbrxConfig
from dbrx.eval import (EvalError, build_examples, evaluate, gauntlet_scores, parse_task, score_groups,
                       score_pairs)
from dbrx.eval.scoring import _pack, _rows
from dbrx.eval.tasks import GENERATION_TYPES, REQUIRED_FIELDS, build_generation_examples, read_rows
from dbrx.tokenizer import Tokenizer

FOUNDRY = Path(__file__).resolve().parents[2] / "shared" / "foundry_eval"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = DbrxConfig(d_model=32, n_heads=2, n_layers=2, max_seq_len=256, vocab_size=100352,
                        attn_config={"kv_n_heads": 1}, ffn_config={"ffn_hidden_size": 24})
    return DbrxForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


MC_ROWS = [{"query": f"Question {i}: which word comes after {w}?", "choices": ["alpha", "beta", "gamma"], "gold": i % 3}
           for i, w in enumerate(["one", "two", "three", "four", "five", "six"])]


def test_scores_are_the_log_probabilities_of_a_plain_forward_and_do_not_depend_on_the_batch(model, tok):
    pairs = [(tok.encode("The cat sat on the"), tok.encode(" mat")),
             (tok.encode("Once upon a time there was a"), tok.encode(" king who ruled")),
             (tok.encode("x"), tok.encode(" = 1 + 2"))]
    scores = score_pairs(model, pairs, batch_size=8)
    for (ctx, cont), s in zip(pairs, scores):  # by hand: the full logits of the pair alone
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
        positions = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
        expected = sum(logp[p, t].item() for p, t in zip(positions, cont))
        greedy = all(logp[p].argmax().item() == t for p, t in zip(positions, cont))
        assert abs(s.logprob - expected) < 1e-4 and s.tokens == len(cont) and s.greedy == greedy
    one = score_pairs(model, pairs, batch_size=1)
    assert all(abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(one, scores))


def test_a_shared_context_runs_once_for_all_choices_with_the_scores_of_each_pair_alone(model, tok):
    ctx = tok.encode("Question: which animal says moo? Answer:")
    groups = [[(ctx, tok.encode(" cow")), (ctx, tok.encode(" a large cat")), (ctx, tok.encode(" cow bells"))],
              [(tok.encode("x = 1"), tok.encode("\ny = 2"))],  # one pair: a plain causal row
              # schema: contexts differ after a shared start, the continuation is shared
              [(tok.encode("The trophy did not fit because the trophy"), tok.encode(" was too big")),
               (tok.encode("The trophy did not fit because the suitcase"), tok.encode(" was too big"))],
              [(ctx, tok.encode(" cow")), (ctx, tok.encode(" cow"))],  # identical choices
              # contexts cut from the left to different lengths (max_seq_len): nothing shared, each pair alone
              [(ctx[1:], tok.encode(" cow")), (ctx[3:], tok.encode(" a large cat"))]]
    alone = score_pairs(model, [p for g in groups for p in g], batch_size=1)
    for batch in (1, 8):
        got = [s for g in score_groups(model, groups, batch_size=batch) for s in g]
        assert [s.tokens for s in got] == [s.tokens for s in alone]
        assert all(a.greedy == b.greedy for a, b in zip(got, alone))
        assert max(abs(a.logprob - b.logprob) for a, b in zip(got, alone)) < 1e-5
    assert [len(seqs) for g, seqs, _ in _rows(groups) if g == len(groups) - 1] == [1, 1]
    row = _pack(groups[0])  # the context once, then each choice's tokens
    # (a continuation's last token is only a target: never fed)
    assert row.ids == ctx + [t for _, cont in groups[0] for t in cont[:-1]] and row.prefix == len(ctx)
    assert row.positions[len(ctx):] == [len(ctx) + i for _, c in groups[0] for i in range(len(c) - 1)]


def test_foundry_prompts_fewshot_and_spaces(tok, tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    spec = parse_task({"label": "mc", "dataset_uri": str(path), "icl_task_type": "multiple_choice", "num_fewshot": [2],
                       "continuation_delimiter": "\nAnswer: "}, "t")
    rows = read_rows(path, REQUIRED_FIELDS["multiple_choice"])
    zero = build_examples(spec, rows, 0, tok, 256, path)
    # 0-shot: the query and the delimiter, right-stripped; each choice with a leading space
    assert zero[0].context_text[0] == "Question 0: which word comes after one?\nAnswer:"
    assert zero[0].continuation_text == [" alpha", " beta", " gamma"]
    assert zero[0].contexts[0] == tok.encode(zero[0].context_text[0])
    two = build_examples(spec, rows, 2, tok, 256, path)
    for i, ex in enumerate(two):  # two other rows, each with its gold answer (no added space), then the test row
        lines = ex.context_text[0].split("\n")
        assert len(lines) == 6 and lines[-2:] == [MC_ROWS[i]["query"], "Answer:"]
        for query, answer in (lines[0:2], lines[2:4]):
            j = int(query.split()[1].rstrip(":"))
            assert j != i and query == MC_ROWS[j]["query"]
            assert answer == "Answer: " + MC_ROWS[j]["choices"][MC_ROWS[j]["gold"]]
    schema = write_jsonl(tmp_path / "schema.jsonl", [
        {"context_options": [f"Anna{i} thanked Bo", f"Bo thanked Anna{i}"], "continuation": "because she helped.",
         "gold": i % 2} for i in range(4)])
    spec = parse_task({"label": "s", "dataset_uri": str(schema), "icl_task_type": "schema", "num_fewshot": [0, 1]}, "t")
    rows = read_rows(schema, REQUIRED_FIELDS["schema"])
    ex0 = build_examples(spec, rows, 0, tok, 256, schema)[0]
    assert ex0.context_text == ["Anna0 thanked Bo", "Bo thanked Anna0"]  # 0-shot schema: no delimiter at all
    assert ex0.continuation_text == [" because she helped."] * 2
    ex1 = build_examples(spec, rows, 1, tok, 256, schema)[0]
    shot, test = ex1.context_text[0].split("\n")
    assert shot.endswith(" because she helped.") and test == "Anna0 thanked Bo"


def test_left_truncation_keeps_the_continuation(tok, tmp_path):
    path = write_jsonl(tmp_path / "lm.jsonl", [{"context": "word " * 200, "continuation": "end"}] * 2)
    spec = parse_task({"label": "lm", "dataset_uri": str(path), "icl_task_type": "language_modeling",
                       "num_fewshot": [0]}, "t")
    ex = build_examples(spec, read_rows(path, ("context", "continuation")), 0, tok, 32, path)[0]
    assert len(ex.contexts[0]) + len(ex.continuations[0]) == 32
    assert ex.contexts[0] == tok.encode(("word " * 200).strip())[-(32 - len(ex.continuations[0])):]


def test_evaluate_writes_foundry_names_and_per_example_rows(model, tok, tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    lm = write_jsonl(tmp_path / "lm.jsonl", [{"context": f"Count: {i} {i + 1}", "continuation": f"{i + 2}",
                                              "category": "easy" if i % 2 else "hard"} for i in range(6)])
    cfg = {"max_seq_len": 128, "device_eval_batch_size": 4, "icl_tasks": [
        {"label": "mc", "dataset_uri": str(mc), "icl_task_type": "multiple_choice", "num_fewshot": [0, 1]},
        {"label": "count", "dataset_uri": str(lm), "icl_task_type": "language_modeling", "num_fewshot": [1],
         "has_categories": True}],
        "eval_gauntlet": {"categories": [{"name": "reasoning", "benchmarks": [
            {"name": "mc", "num_fewshot": 0, "random_baseline": 1 / 3}]}]}}
    result = evaluate(model, tok, cfg, out_dir=tmp_path / "out", log=lambda *_: None)
    m = result["metrics"]
    assert set(m) >= {"metrics/mc/0-shot/InContextLearningMultipleChoiceAccuracy",
                      "metrics/mc/1-shot/lm_eval_acc", "metrics/mc/1-shot/lm_eval_acc_norm",
                      "metrics/count/1-shot/easy/InContextLearningLMAccuracy",
                      "metrics/count/1-shot/hard/InContextLearningLMAccuracy"}
    acc = m["metrics/mc/0-shot/InContextLearningMultipleChoiceAccuracy"]
    assert result["gauntlet"]["icl/metrics/eval_gauntlet/reasoning"] == pytest.approx((acc - 1 / 3) / (2 / 3))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["metrics"] == m
    rows = [json.loads(line) for line in (tmp_path / "out" / "examples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * 2 + 6
    first = rows[0]
    # the prediction is the lowest mean per-token loss (Foundry), from the logged log-probabilities
    means = [lp / n for lp, n in zip(first["logprobs"], first["tokens"])]
    assert first["prediction"] == means.index(max(means))
    # batch size does not change a score (fp32)
    again = evaluate(model, tok, {**cfg, "device_eval_batch_size": 1}, log=lambda *_: None)
    assert all(abs(again["metrics"][k] - v) < 1e-9 for k, v in m.items())


def test_gauntlet_reports_a_category_with_a_missing_benchmark():
    cfg = {"categories": [
        {"name": "a", "benchmarks": [{"name": "x", "num_fewshot": 0, "random_baseline": 0.25},
                                     {"name": "y", "num_fewshot": 3, "random_baseline": 0.5}]},
        {"name": "b", "benchmarks": [{"name": "z", "num_fewshot": 0, "random_baseline": 0.0}]}]}
    metrics = {"metrics/x/0-shot/InContextLearningMultipleChoiceAccuracy": 0.625,
               "metrics/z/0-shot/c1/InContextLearningLMAccuracy": 0.2,
               "metrics/z/0-shot/c2/InContextLearningLMAccuracy": 0.4}
    out = gauntlet_scores(cfg, metrics, {"x/0-shot": 8, "z/0-shot/c1": 5, "z/0-shot/c2": 5})
    assert out["incomplete"]["a"] == ["y/3-shot"] and "icl/metrics/eval_gauntlet/a" not in out
    assert out["benchmarks"]["x/0-shot"] == pytest.approx(0.5)
    assert out["icl/metrics/eval_gauntlet/b"] == pytest.approx(0.3)  # the categories' plain mean
    assert out["icl/metrics/eval_gauntlet/default_average"] == pytest.approx(0.3)
    assert out["incomplete"]["default_average"] == ["category a"]


def test_bad_input_names_the_file_line_or_key(tok, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [MC_ROWS[0], "{not json"])
    with pytest.raises(EvalError, match=r"bad.jsonl:2: not valid JSON"):
        read_rows(bad, REQUIRED_FIELDS["multiple_choice"])
    gold = write_jsonl(tmp_path / "gold.jsonl", [MC_ROWS[0], {**MC_ROWS[1], "gold": 3}])
    spec = parse_task({"label": "g", "dataset_uri": str(gold), "icl_task_type": "multiple_choice", "num_fewshot": [0]},
                      "t")
    with pytest.raises(EvalError, match=r"gold.jsonl:2: gold 3 is not an index into its 3 choices"):
        build_examples(spec, read_rows(gold, REQUIRED_FIELDS["multiple_choice"]), 0, tok, 64, gold)
    with pytest.raises(EvalError, match=r"asks for 5 few-shot examples but the file has only 2 rows"):
        build_examples(spec, read_rows(gold, REQUIRED_FIELDS["multiple_choice"])[:2], 5, tok, 64, gold)
    with pytest.raises(EvalError, match=r"unknown key 'continuation_delimeter'; did you mean 'continuation_delimiter'"):
        parse_task({"label": "g", "dataset_uri": "x", "icl_task_type": "schema", "num_fewshot": [0],
                    "continuation_delimeter": " "}, "icl_tasks[0]")
    with pytest.raises(EvalError, match=r"icl_tasks\[0\].context_key: 'question' is not supported"):
        parse_task({"label": "g", "dataset_uri": "x", "icl_task_type": "schema", "num_fewshot": [0],
                    "context_key": "question"}, "icl_tasks[0]")
    with pytest.raises(EvalError, match=r"unknown task type 'multiple_choise'; did you mean 'multiple_choice'"):
        parse_task({"label": "g", "dataset_uri": "x", "icl_task_type": "multiple_choise", "num_fewshot": [0]}, "t")
    cfg = {"max_seq_len": 64, "device_eval_batch_size": 2,
           "icl_tasks": [{"label": "h", "dataset_uri": "hf://datasets/x/y", "icl_task_type": "schema",
                          "num_fewshot": [0]}]}
    with pytest.raises(EvalError, match=r"needs the network"):
        evaluate(None, tok, cfg, log=lambda *_: None)
    good = write_jsonl(tmp_path / "good.jsonl", MC_ROWS)
    bad_gauntlet = {**cfg, "icl_tasks": [{"label": "m", "dataset_uri": str(good), "icl_task_type": "multiple_choice",
                                          "num_fewshot": [0]}],
                    "eval_gauntlet": {"categories": [{"name": "c", "benchmarks": [{"name": "m"}]}]}}
    with pytest.raises(EvalError, match=r"eval_gauntlet.categories\[0\].benchmarks\[0\]: expected name, num_fewshot"):
        evaluate(None, tok, bad_gauntlet, log=lambda *_: None)  # before any scoring: no model needed
    cfg["icl_tasks"][0]["dataset_uri"] = "eval/local_data/absent.jsonl"
    with pytest.raises(EvalError, match=r"none of the 1 tasks' files exists .*absent.jsonl.*give dataset_root"):
        evaluate(None, tok, cfg, log=lambda *_: None)


@pytest.mark.skipif(not FOUNDRY.exists(), reason="../shared/foundry_eval (Foundry's task files) is not present")
def test_foundry_task_files_of_the_scored_types_all_build(tok):
    tasks = yaml.safe_load((FOUNDRY / "yamls" / "tasks_v0.3.yaml").read_text())["icl_tasks"]
    built = 0
    for i, entry in enumerate(tasks):
        spec = parse_task(entry, f"icl_tasks[{i}]")
        if spec.icl_task_type not in REQUIRED_FIELDS:
            continue
        from dbrx.eval.tasks import resolve_uri

        path = resolve_uri(spec.dataset_uri, FOUNDRY, spec.label)
        if not path.exists():  # absent from the stored copy (mmlu, hellaswag, ...; its README)
            continue
        rows = read_rows(path, REQUIRED_FIELDS[spec.icl_task_type])[:40]
        groups = [[r for r in rows if r.get("category") == c] for c in {r.get("category") for r in rows}] \
            if spec.has_categories else [rows]
        for k in spec.num_fewshot:
            for group in groups:
                if len(group) <= k:
                    continue
                if spec.icl_task_type in GENERATION_TYPES:
                    examples, max_new = build_generation_examples(spec, group, k, tok, 2048, path)
                    assert all(0 < len(ex.context) <= 2048 - max_new and ex.aliases for ex in examples)
                else:
                    examples = build_examples(spec, group, k, tok, 2048, path)
                    assert all(len(c) + len(t) <= 2048 and t for ex in examples
                               for c, t in zip(ex.contexts, ex.continuations))
        built += 1
    assert built == 27  # of tasks_v0.3's 32 (every type but code): five files are absent from the stored copy


def test_generation_answers_are_matched_as_foundry_matches_them():
    from dbrx.eval.tasks import answer_is_correct, normalize_answer

    assert normalize_answer("The  Onion_skins, a (red)!") == "onion skins red"
    assert answer_is_correct(" onions, surely", ["Onion"], None, "", True)  # a prefix match after normalisation
    assert not answer_is_correct(" an onion", ["Onion"], None, "", False)  # without normalisation: stripped only
    # the cut at the first stop string, then what follows the last cot_delimiter
    assert answer_is_correct(" 3 + 4 = 7. The answer is 7\n\nQuestion: 9", ["7"], ["\n\n", "Question:"],
                             "The answer is ", False)
    assert not answer_is_correct(" 3 + 4 = 7.\n\nThe answer is 7", ["7"], ["\n\n"], "The answer is ", False)


def test_generation_tasks_generate_greedily_with_the_cache_and_stop_at_stop_strings(model, tok, tmp_path):
    from dbrx.generate import generate

    path = write_jsonl(tmp_path / "qa.jsonl", [{"context": f"Question: what is {i} plus {i}?", "answer": str(2 * i),
                                                "aliases": [f"{2 * i}.0"]} for i in range(5)])
    cfg = {"max_seq_len": 128, "device_eval_batch_size": 3, "icl_tasks": [
        {"label": "qa", "dataset_uri": str(path), "icl_task_type": "generation_task_with_answers", "num_fewshot": [1],
         "continuation_delimiter": "\nAnswer:", "early_stopping_criteria": ["\n"]}]}
    result = evaluate(model, tok, cfg, out_dir=tmp_path / "out", log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "out" / "examples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(r["prompt"].endswith("\nAnswer:") for r in rows)
    max_new = max(len(tok.encode(a)) for i in range(5) for a in (str(2 * i), f"{2 * i}.0"))
    for r in rows:  # the same greedy tokens as dbrx generate, up to the first stop string
        alone = tok.decode(generate(model, tok.encode(r["prompt"]), max_new))
        assert alone.startswith(r["generation"]) and ("\n" in alone[len(r["generation"]) - 1:] or alone == r["generation"])
    metric = "metrics/qa/1-shot/InContextLearningGenerationExactMatchAccuracy"
    assert result["metrics"][metric] == sum(r["correct"] for r in rows) / 5


def test_dbrx_eval_command_reads_a_foundry_yaml_and_writes_results(model, tmp_path, capsys):
    from dbrx.cli import main

    model.save_pretrained(tmp_path / "ckpt")
    data = tmp_path / "eval" / "local_data"
    data.mkdir(parents=True)
    write_jsonl(data / "mc.jsonl", MC_ROWS)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"icl_tasks": [
        {"label": "mc", "dataset_uri": "eval/local_data/mc.jsonl", "icl_task_type": "multiple_choice",
         "num_fewshot": [0]},
        {"label": "gone", "dataset_uri": "eval/local_data/gone.jsonl", "icl_task_type": "schema",
         "num_fewshot": [0]}]}))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"max_seq_len": 64, "device_eval_batch_size": 2, "icl_tasks": str(tasks),
                                   "eval_gauntlet": {"categories": [{"name": "c", "benchmarks": [
                                       {"name": "gone", "num_fewshot": 0, "random_baseline": 0.5}]}]}}))
    out = tmp_path / "out"
    assert main(["eval", str(cfg), f"dataset_root={tmp_path}", "--model", str(tmp_path / "ckpt"), "--out", str(out),
                 "--dtype", "float32"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert "metrics/mc/0-shot/InContextLearningMultipleChoiceAccuracy" in result["metrics"]
    assert result["missing_tasks"] == {"gone": "eval/local_data/gone.jsonl"}
    assert result["gauntlet"]["incomplete"] == {"c": ["gone/0-shot"], "default_average": ["category c"]}
    printed = capsys.readouterr()
    assert "gone.jsonl: no such file; skipped" in printed.out + printed.err
    assert main(["eval", str(cfg), "max_seq_len=0", "--model", str(tmp_path / "ckpt")]) == 2
    assert "max_seq_len: expected a positive integer" in capsys.readouterr().err


def test_numeric_answers_are_extracted_strictly_and_flexibly():
    from dbrx.eval.tasks import flexible_number, numeric_answers, strict_number

    gold = numeric_answers(["18"])
    marker, stops = "The answer is ", ["\n\n", "Question:"]
    follows = "She sells 16 - 3 - 4 = 9 eggs and makes 9 * 2 = $18. The answer is 18."
    assert strict_number(follows, stops, marker) in gold and flexible_number(follows, stops) in gold
    loose = "9 * 2 = 18 dollars a day"  # right number, not in the taught format: flexible only
    assert strict_number(loose, stops, marker) is None and flexible_number(loose, stops) in gold
    assert flexible_number("It is $1,018.", stops) in numeric_answers(["1018"])
    assert strict_number("#### 18", None, "#### ") in gold  # lm-eval's marker when the task has no cot_delimiter
    assert flexible_number("18 apples\n\nQuestion: 7 more", stops) in gold  # cut at the first stop string
    assert numeric_answers(["18", "eighteen"]) == []


def test_chat_prompts_keep_the_template_and_stop_at_dbrx_stop_ids(model, tok, tmp_path, monkeypatch):
    import dbrx.eval.runner as runner

    rows = [{"context": f"Q: {i} + {i} =", "answer": str(2 * i)} for i in range(1, 5)]
    gen = write_jsonl(tmp_path / "arith.jsonl", rows)
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new, batch, stops, stop_ids):
        seen.update(prompts=prompts, stop_ids=stop_ids)
        return [f"Let me see. {2 * i} is it" for i in range(1, 5)]

    monkeypatch.setattr(runner, "generate_texts", fake_generate)
    cfg = {"icl_tasks": [{"label": "arith", "dataset_uri": str(gen), "icl_task_type": "generation_task_with_answers",
                          "num_fewshot": [1]},
                         {"label": "mc", "dataset_uri": str(mc), "icl_task_type": "multiple_choice",
                          "num_fewshot": [0]}],
           "max_seq_len": 256, "device_eval_batch_size": 2}
    result = evaluate(model, tok, cfg, out_dir=tmp_path / "out", log=lambda *_: None, chat=True)
    assert seen["stop_ids"] == tok.stop_token_ids
    text = tok.decode(seen["prompts"][0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    m = result["metrics"]
    assert m["metrics/arith/1-shot/InContextLearningGenerationExactMatchAccuracy"] == 0  # Foundry: a prefix match
    assert m["metrics/arith/1-shot/flexible_extract"] == 1 and m["metrics/arith/1-shot/strict_match"] == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "examples.jsonl").read_text().splitlines()]
    mc_row = next(r for r in rows if r["task"] == "mc")
    assert mc_row["continuations"] == ["alpha", "beta", "gamma"]  # the assistant's reply: no leading space
    assert "metrics/mc/0-shot/strict_match" not in m
    # a prompt too long for max_seq_len loses the start of the user's text, never the template
    from dbrx.eval.tasks import chat_prompt

    ids = chat_prompt(tok, "word " * 800, 400)  # the default system prompt alone is over 200 tokens
    assert len(ids) <= 400 and tok.decode(ids).startswith("<|im_start|>system\n")
    assert tok.decode(ids).endswith("word word <|im_end|>\n<|im_start|>assistant\n")  # the end of the text kept


def test_chat_refuses_code_tasks_before_anything_is_scored(tmp_path):
    from dbrx.eval import check_tasks

    rows = Path(__file__).parent / "data" / "code_eval_rows.jsonl"
    cfg = {"icl_tasks": [{"label": "code", "dataset_uri": str(rows), "icl_task_type": "code_evaluation",
                          "num_fewshot": [0]}], "max_seq_len": 256, "device_eval_batch_size": 2}
    with pytest.raises(EvalError, match="--chat does not apply"):
        check_tasks(cfg, log=lambda *_: None, allow_code_execution=True, chat=True)


TYPE_BY_FIELDS = {("choices", "gold", "query"): "multiple_choice", ("context_options", "continuation", "gold"): "schema",
                  ("context", "continuation"): "language_modeling", ("answer", "context"): "generation_task_with_answers"}


@pytest.mark.skipif(not FOUNDRY.exists(), reason="../shared/foundry_eval (Foundry's task files) is absent")
def test_every_foundry_task_file_loads_and_scores(tmp_path):
    """Every JSONL of Foundry's local_data but the programming files (tests/test_code_eval.py runs those): all of
    its rows read, and its first rows scored end to end, 0- and 1-shot, by a tiny model with room for the longest
    chain-of-thought answers; the type is read off the fields, as a task YAML would give it."""
    torch.manual_seed(0)
    model = DbrxForCausalLM(DbrxConfig(d_model=32, n_heads=2, n_layers=1, max_seq_len=2048, vocab_size=100352,
                                       attn_config={"kv_n_heads": 1}, ffn_config={"ffn_hidden_size": 24})).eval()
    tasks = []
    for path in sorted((FOUNDRY / "local_data").glob("*/*.jsonl")):
        if path.parent.name == "programming":
            continue
        lines = path.read_text(encoding="utf-8").split("\n")  # (JSON strings may hold U+2028)
        first = json.loads(lines[0])
        kind = next(t for fields, t in TYPE_BY_FIELDS.items() if set(fields) <= set(first))
        rows = read_rows(path, REQUIRED_FIELDS[kind])  # the whole file
        assert len(rows) == sum(1 for x in lines if x.strip())
        sample = tmp_path / f"{path.parent.name}__{path.name}"
        sample.write_text("\n".join(lines[:6]) + "\n", encoding="utf-8")
        tasks.append({"label": sample.stem, "dataset_uri": str(sample), "icl_task_type": kind, "num_fewshot": [0, 1],
                      "has_categories": "category" in first and kind != "generation_task_with_answers",
                      "cot_delimiter": "The answer is " if "chain_of_thought" in first else ""})
    assert len(tasks) == 52
    cfg = {"icl_tasks": tasks, "max_seq_len": 2048, "device_eval_batch_size": 6}
    result = evaluate(model, Tokenizer(), cfg, out_dir=tmp_path / "out", log=lambda *_: None)
    scored = {name.split("/")[1] for name in result["metrics"]}
    assert scored == {t["label"] for t in tasks} and not result["missing_tasks"]
    assert all(0 <= v <= 1 for v in result["metrics"].values())
