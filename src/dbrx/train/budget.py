"""A wall-clock budget for a run (`max_duration: 9min`): after timing its first steps, the run fixes the step
count whose training, evaluations and checkpoints fit in what is left of the budget. The count is then fixed:
the LR schedule, `dur` intervals and a resumed run all use it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def events_between(done: int, total: int, every: int | None) -> int:
    """How many of steps done+1 .. total trigger an event that fires every `every` steps and at the last
    step (as evaluations and checkpoints do)."""
    if not every or total <= done:
        return 0
    return total // every - done // every + (1 if total % every else 0)


@dataclass
class BudgetPlan:
    steps: int  # the run's total step count, steps already taken included
    step_s: float
    eval_s: float
    save_s: float
    evals: int  # evaluations and checkpoints still to come
    saves: int
    seconds: float  # the planned time of what is still to come

    def describe(self, budget_s: float, done: int) -> str:
        return (f"max_duration {_clock(budget_s)}: {self.steps:,} steps fit ({self.steps - done:,} more at "
                f"{self.step_s:.3f} s a step, {self.evals} evaluation(s) at {self.eval_s:.1f} s, {self.saves} "
                f"checkpoint(s) at {self.save_s:.1f} s: {_clock(self.seconds)} still to run)")


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def plan_steps(done: int, remaining_s: float, step_s: float, eval_s: float, save_s: float,
               eval_every: Callable[[int], int | None], save_every: Callable[[int], int | None]) -> BudgetPlan:
    """The largest total step count N >= done whose remaining steps, evaluations and checkpoints take at most
    `remaining_s` (N = done, stopping now, when not even one more step fits). `eval_every(N)` and
    `save_every(N)` give the intervals for a run of N steps (fractions of the run depend on N)."""

    def plan(n: int) -> BudgetPlan:
        evals = events_between(done, n, eval_every(n))
        saves = events_between(done, n, save_every(n))
        seconds = (n - done) * step_s + evals * eval_s + saves * save_s
        return BudgetPlan(n, step_s, eval_s, save_s, evals, saves, seconds)

    # The cost grows with n (evaluations and checkpoints at fractions of the run stay about as many): bisect for
    # the last n that fits, between done and the count that steps alone would fill.
    lo, hi = done, done + max(0, int(remaining_s / max(step_s, 1e-9)))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if plan(mid).seconds <= remaining_s else (lo, mid - 1)
    return plan(lo)
