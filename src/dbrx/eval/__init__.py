"""Evaluation with LLM Foundry's task formats: `dbrx eval CONFIG.yaml --model DIR`.

Built so far: the log-likelihood task types (multiple_choice, schema, language_modeling) with Foundry's prompts and
scores, lm-eval's acc and acc_norm beside them, and the Eval Gauntlet's rescaled category averages (a category with
a missing benchmark is reported as incomplete)."""

from dbrx.eval.gauntlet import gauntlet_scores
from dbrx.eval.runner import check_tasks, evaluate
from dbrx.eval.scoring import Score, score_groups, score_pairs
from dbrx.eval.tasks import EvalError, build_examples, parse_task

__all__ = ["EvalError", "Score", "build_examples", "check_tasks", "evaluate", "gauntlet_scores", "parse_task", "score_groups", "score_pairs"]
