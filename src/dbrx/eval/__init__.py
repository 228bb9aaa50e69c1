"""Evaluation with LLM Foundry's task formats: `dbrx eval CONFIG.yaml --model DIR`.

All five of Foundry's task types (multiple_choice, schema, language_modeling, generation_task_with_answers,
code_evaluation, the last in dbrx.eval.sandbox) with Foundry's prompts and scores, lm-eval's acc and acc_norm
beside them, the Eval Gauntlet's rescaled category averages (a category with a missing benchmark is reported as
incomplete), the offline stdlib suite (dbrx.eval.suite) and, as an optional extra, the lm-eval model type `dbrx`
(dbrx.eval.lm_eval; never imported here)."""

from dbrx.eval.gauntlet import gauntlet_scores
from dbrx.eval.runner import check_tasks, evaluate
from dbrx.eval.scoring import Score, score_groups, score_pairs
from dbrx.eval.tasks import EvalError, build_examples, parse_task

__all__ = ["EvalError", "Score", "build_examples", "check_tasks", "evaluate", "gauntlet_scores", "parse_task", "score_groups", "score_pairs"]
