"""Multiple-choice scoring: `dbrx.eval.evaluate` on a Foundry-format multiple_choice task against lm-eval's
`--model hf` on the same checkpoint and the same prompts, in one process (same threads, same dtype); then the time
ratio, and whether the two agree question by question.

The prompts are Foundry's k-shot arc_easy prompts (dbrx.eval.build_examples), built once and written as one
0-shot task that both harnesses read (a Foundry JSONL whose query is the whole prompt; an lm-eval local task on the
same file), so both score the same text tokenized whole. (Foundry itself tokenizes the few-shot preamble apart
from the question, which changes a token or two where they meet; lm-eval cannot be given token ids.)

    .venv/bin/python bench/eval.py [--model runs/demo/hf | dbrx-tiny] [--questions 100] [--num-fewshot 5]
                                   [--batch-size 8] [--dtype float32]

--model: a checkpoint directory (runs/demo/hf, `make demo`'s, when present), or a preset name for a seeded random
one written to a temporary directory. Questions: the first N of Foundry's arc_easy
(../shared/foundry_eval/local_data/world_knowledge/arc_easy.jsonl) when present, else synthetic arithmetic.
The batch size is rows for us (a question: its context once, then each choice) and sequences for lm-eval (one per
choice), each harness's own unit. Needs the dev extras (lm-eval[hf]).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402, F401  both loaders import it on first use: a cost of the process, timed for neither

from dbrx import DbrxConfig, DbrxForCausalLM  # noqa: E402
from dbrx.eval import build_examples, evaluate, parse_task  # noqa: E402
from dbrx.perf import machine_profile  # noqa: E402
from dbrx.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "runs" / "demo" / "hf"
ARC_EASY = ROOT.parent / "shared" / "foundry_eval" / "local_data" / "world_knowledge" / "arc_easy.jsonl"


def checkpoint(name: str | None, tmp: Path) -> tuple[Path, str]:
    """(directory, description): the named directory, the demo checkpoint, or a seeded preset written to tmp."""
    if name is None:
        name = str(DEMO) if (DEMO / "config.json").exists() else "dbrx-tiny"
    if Path(name).is_dir():
        return Path(name), name
    model = DbrxForCausalLM(DbrxConfig.from_name(name))
    model.init_weights(seed=0)
    model.save_pretrained(tmp / "model")
    Tokenizer().save_pretrained(tmp / "model")
    return tmp / "model", f"{name}, random weights (seed 0)"


def questions(n: int) -> tuple[list[dict], str]:
    if ARC_EASY.exists():
        with ARC_EASY.open() as f:
            rows = [json.loads(line) for line, _ in zip(f, range(n))]
        return rows, f"the first {len(rows)} of {ARC_EASY.name}"
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        choices = [str(a + b + d) for d in rng.sample([-10, -1, 0, 1, 2, 10], 4)]
        rows.append({"query": f"Question: what is {a} plus {b}?", "choices": choices,
                     "gold": choices.index(str(a + b)) if str(a + b) in choices else 0})
    return rows, f"{n} synthetic arithmetic questions"


def write_prompts(rows: list[dict], num_fewshot: int, max_seq_len: int, tmp: Path) -> Path:
    """Foundry's `num_fewshot`-shot prompts of `rows`, as a 0-shot file: {query: the whole prompt, choices, gold}."""
    source = tmp / "questions.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = parse_task({"label": "arc_easy", "dataset_uri": str(source), "icl_task_type": "multiple_choice",
                       "num_fewshot": [num_fewshot], "continuation_delimiter": "\nAnswer: "}, "bench")
    examples = build_examples(spec, [dict(r, _line=i + 1) for i, r in enumerate(rows)], num_fewshot, Tokenizer(),
                              max_seq_len, source)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"query": ex.context_text[0], "choices": ex.row["choices"],
                                           "gold": ex.gold}) + "\n" for ex in examples))
    return prompts


def run_ours(model_dir: Path, data: Path, args, tmp: Path) -> tuple[dict, list[dict], float, float]:
    """(metrics, per-question rows, load seconds, scoring seconds)."""
    t0 = time.perf_counter()
    model = DbrxForCausalLM.from_pretrained(model_dir, dtype=args.dtype)
    tokenizer = Tokenizer()
    load = time.perf_counter() - t0
    cfg = {"max_seq_len": model.config.max_seq_len, "device_eval_batch_size": args.batch_size,
           "icl_tasks": [{"label": "mc", "dataset_uri": str(data), "icl_task_type": "multiple_choice",
                          "num_fewshot": [0]}]}
    t0 = time.perf_counter()
    result = evaluate(model, tokenizer, cfg, out_dir=tmp / "ours", log=lambda *_: None)
    scoring = time.perf_counter() - t0
    rows = [json.loads(line) for line in (tmp / "ours" / "examples.jsonl").read_text().splitlines()]
    return result["metrics"], rows, load, scoring


def run_hf(model_dir: Path, data: Path, args, tmp: Path) -> tuple[dict, list[dict], float, float, float]:
    """lm-eval's hf model on the same file. (results, samples, load s, loglikelihood s, whole task s)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from dbrx.eval.lm_eval import write_multiple_choice_task

    for name in ("lm_eval", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    write_multiple_choice_task(tmp / "tasks", "dbrx_bench_mc", data, cache_dir=tmp / "hf_datasets")
    t0 = time.perf_counter()
    lm = HFLM(pretrained=str(model_dir), dtype=args.dtype, device="cpu", batch_size=args.batch_size)
    load = time.perf_counter() - t0
    scoring = 0.0
    loglikelihood = lm.loglikelihood

    def timed(requests, **_):
        nonlocal scoring
        t = time.perf_counter()
        out = loglikelihood(requests, disable_tqdm=True)
        scoring += time.perf_counter() - t
        return out

    lm.loglikelihood = timed
    t0 = time.perf_counter()
    result = lm_eval.simple_evaluate(model=lm, tasks=["dbrx_bench_mc"], num_fewshot=0, log_samples=True,
                                     bootstrap_iters=0, verbosity="ERROR",
                                     task_manager=TaskManager(include_path=str(tmp / "tasks"), include_defaults=False))
    task = time.perf_counter() - t0
    samples = sorted(result["samples"]["dbrx_bench_mc"], key=lambda s: s["doc_id"])
    return result["results"]["dbrx_bench_mc"], samples, load, scoring, task


def best(scores: list[float]) -> int:
    """The highest score's index, the first on ties (numpy's argmax, as lm-eval takes it)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory or preset (default: runs/demo/hf, else "
                                                   "dbrx-tiny)")
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--num-fewshot", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    import transformers
    from lm_eval import __version__ as lm_eval_version

    print(machine_profile("cpu").describe(), flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir, model_name = checkpoint(args.model, tmp)
        rows, source = questions(args.questions)
        data = write_prompts(rows, args.num_fewshot, DbrxConfig.from_pretrained(model_dir).max_seq_len, tmp)
        print(f"model: {model_name}; {source}, {args.num_fewshot}-shot (Foundry's arc_easy prompts), {args.dtype}, "
              f"batch {args.batch_size}, {torch.get_num_threads()} threads; transformers {transformers.__version__}, "
              f"lm-eval {lm_eval_version}", flush=True)

        metrics, ours, our_load, our_scoring = run_ours(model_dir, data, args, tmp)
        results, theirs, hf_load, hf_scoring, hf_task = run_hf(model_dir, data, args, tmp)

    encode = Tokenizer().encode
    context_tokens = [len(encode(r["prompt"])) for r in ours]
    our_fed = sum(c + sum(r["tokens"]) for c, r in zip(context_tokens, ours))  # one row per question
    hf_fed = sum(c + t - 1 for c, r in zip(context_tokens, ours) for t in r["tokens"])  # one row per choice
    predicted = sum(sum(r["tokens"]) for r in ours)
    our_total, hf_total = our_load + our_scoring, hf_load + hf_task
    print(f"tokens through the model: ours {our_fed:,} (each context once), lm-eval hf {hf_fed:,} "
          f"({hf_fed / our_fed:.1f}x); vocabulary-head positions: ours {predicted:,}, hf {hf_fed:,}")
    print(f"[ours] load {our_load:6.2f} s + evaluate {our_scoring:7.2f} s = {our_total:7.2f} s "
          f"({our_fed / our_scoring:,.0f} tokens/s)")
    print(f"[hf]   load {hf_load:6.2f} s + simple_evaluate {hf_task:7.2f} s (of which loglikelihood "
          f"{hf_scoring:.2f} s) = {hf_total:7.2f} s ({hf_fed / hf_scoring:,.0f} tokens/s)")
    print(f"ratio (lm-eval hf / ours): {hf_total / our_total:.1f}x end to end, {hf_scoring / our_scoring:.1f}x "
          f"scoring (target >= 5x)")

    # sanity: the same log-likelihoods and the same lm-eval acc / acc_norm, question by question
    diffs = [abs(a - b[0]) for r, s in zip(ours, theirs) for a, b in zip(r["logprobs"], s["filtered_resps"])]
    same_acc = sum((best(r["logprobs"]) == r["gold"]) == (s["acc"] == 1.0) for r, s in zip(ours, theirs))
    same_norm = sum((best([lp / len(c) for lp, c in zip(r["logprobs"], s["doc"]["choices"])]) == r["gold"])
                    == (s["acc_norm"] == 1.0) for r, s in zip(ours, theirs))  # lm-eval: the choice's characters
    label = "metrics/mc/0-shot"  # the few-shot examples are inside the prompts
    print(f"agreement: max |log-likelihood difference| {max(diffs):.2e} over {len(diffs)} choices; acc agrees on "
          f"{same_acc}/{len(ours)} questions, acc_norm (from our log-likelihoods) on {same_norm}/{len(ours)}")
    print(f"acc: ours (lm-eval's acc) {metrics[label + '/lm_eval_acc']:.4f}, hf {results['acc,none']:.4f}; acc_norm: "
          f"ours {metrics[label + '/lm_eval_acc_norm']:.4f}, hf {results['acc_norm,none']:.4f}; Foundry's accuracy "
          f"(mean per-token) {metrics[label + '/InContextLearningMultipleChoiceAccuracy']:.4f}")
    if len(ours) != len(theirs):
        sys.exit(f"error: {len(ours)} questions scored by us, {len(theirs)} by lm-eval")


if __name__ == "__main__":
    main()
