"""Runs sized to the machine: a wall-clock max_duration fixes the step count after timing the first steps, so that
training, evaluations and checkpoints fit; the schedule, `dur` intervals and a resumed run use that count."""

import json
import math
import shutil

import pytest

from dbrx.train.budget import events_between, plan_steps
from dbrx.train.config import ConfigError, Time, load_config
from dbrx.train.trainer import Trainer
from tests.test_train import data, run_config  # noqa: F401 (the data fixture)


def test_wall_clock_and_fraction_units():
    assert Time.parse("9min") == Time(540, "s") and Time.parse("90s") == Time(90, "s")
    assert Time.parse("1.5h") == Time(5400, "s") and Time.parse("0.25dur") == Time(0.25, "dur")
    assert Time.parse("8.5min").wall_clock and not Time.parse("10sp").wall_clock
    with pytest.raises(ConfigError, match="wall-clock budget"):
        Time.parse("2Kmin", "max_duration")


def test_events_between_counts_every_interval_and_the_last_step():
    assert events_between(0, 10, 4) == 3  # steps 4, 8 and the last, 10
    assert events_between(4, 10, 4) == 2
    assert events_between(0, 8, 4) == 2
    assert events_between(8, 8, 4) == 0 and events_between(0, 10, None) == 0


def test_the_plan_is_the_largest_count_that_fits():
    every = {"eval": lambda n: math.ceil(0.25 * n), "save": lambda n: math.ceil(0.5 * n)}

    def cost(n, done=8):
        return (n - done) * 0.5 + events_between(done, n, every["eval"](n)) * 5 + \
            events_between(done, n, every["save"](n)) * 2

    plan = plan_steps(8, 100.0, 0.5, 5.0, 2.0, every["eval"], every["save"])
    assert cost(plan.steps) <= 100 < cost(plan.steps + 1)
    assert (plan.evals, plan.saves) == (4, 2) and plan.seconds == pytest.approx(cost(plan.steps))
    assert "max_duration 2m00s: " in plan.describe(120, 8) and f"{plan.steps:,} steps fit" in plan.describe(120, 8)
    # Nothing more fits: stop where the run is.
    assert plan_steps(8, 0.1, 0.5, 5.0, 2.0, every["eval"], every["save"]).steps == 8


def test_intervals_in_wall_clock_time_and_dur_warmup_with_a_budget_are_refused(data):
    base = run_config(data, data / "run", max_duration="5s")
    with pytest.raises(ConfigError, match="eval_interval: 10s is wall-clock time"):
        Trainer(load_config(None, base={**base, "eval_interval": "10s"}), log=lambda *_: None)
    sched = {"name": "cosine_with_warmup", "t_warmup": "0.1dur", "alpha_f": 0.1}
    with pytest.raises(ConfigError, match="scheduler.t_warmup: 0.1dur"):
        Trainer(load_config(None, base={**base, "scheduler": sched}), log=lambda *_: None)
    with pytest.raises(ConfigError, match="max_duration: 'dur'"):
        Trainer(load_config(None, base={**base, "max_duration": "1dur"}), log=lambda *_: None)


def test_a_budgeted_run_fixes_its_count_and_a_resumed_run_keeps_it(data, monkeypatch, capsys):
    from dbrx.perf import machine_profile
    from dbrx.tokenizer import Tokenizer

    machine_profile()  # measured once per process, as are the tokenizer files: not this test's budget
    Tokenizer()._tokenizer_json()
    cfg = run_config(data, data / "run", max_duration="10s", eval_interval="0.5dur", save_interval="0.5dur",
                     console_log_interval="1ba")
    logs = []
    trainer = Trainer(load_config(None, base=cfg), log=logs.append)
    assert trainer.max_steps is None
    summary = trainer.fit()
    n = trainer.max_steps
    out = capsys.readouterr().out
    planned = int(out.split("max_duration 10s: ")[1].split(" steps fit")[0].replace(",", ""))  # logged
    assert summary["step"] == n  # the count may have followed the machine's speed ("running slower/faster")
    assert abs(n - planned) <= 0.01 * planned or f"{planned:,} -> " in out  # changes under 1% are not logged
    rows = [json.loads(line) for line in (data / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if "eval_loss" in r]
    # At half the count first fixed and at the end (and at the first count too, if the count grew past it).
    assert evals[0] == math.ceil(0.5 * planned) and evals[-1] == n and len(evals) == 2 + (n > 2 * evals[0])
    assert Trainer.WARMUP_STEPS + Trainer.PROBE_STEPS < evals[0] < n
    lr = cfg["optimizer"]["lr"]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr * 0.1)  # the cosine ends at alpha_f at n
    checkpoints = sorted((data / "run" / "checkpoints").glob("ba*"))
    assert [c.name for c in checkpoints] == [f"ba{step:08d}" for step in evals]
    stored = json.loads((checkpoints[0] / "trainer_state.json").read_text())["run"]["max_steps"]

    # Resume from the half-way checkpoint: no new timing, the count it had then.
    for later in checkpoints[1:]:
        shutil.rmtree(later)
    monkeypatch.setattr(Trainer, "size_to_budget", lambda *a, **k: pytest.fail("a resumed run re-sized itself"))
    logs.clear()
    again = Trainer(load_config(None, base={**cfg, "autoresume": True}), log=logs.append)
    final = again.fit()["step"]
    assert any(f"keeps its {stored:,} steps" in line for line in logs) and final == again.max_steps <= stored


def test_the_count_follows_the_machine_speed_within_the_budget(data):
    cfg = run_config(data, data / "run", max_duration="60s", eval_interval="0.5dur", save_interval=None)
    logs = []
    trainer = Trainer(load_config(None, base=cfg), log=logs.append)
    trainer.size_to_budget(0.01)
    planned = trainer.max_steps
    trainer.keep_to_budget(0.0099, logs.append)  # about as timed: the count stays
    assert trainer.max_steps == planned
    trainer.keep_to_budget(0.04, logs.append)  # 4x slower: what still fits, and the schedule follows
    assert trainer.max_steps < planned / 3 and f"{planned:,} -> {trainer.max_steps:,} steps" in logs[-1]
    assert trainer.eval_every == math.ceil(0.5 * planned)  # the intervals stay; the last step evaluates anyway
    trainer.keep_to_budget(0.01, logs.append)  # as fast as timed again: back to what fits
    assert abs(trainer.max_steps - planned) <= 0.02 * planned and "running faster" in logs[-1]
    trainer.keep_to_budget(0.005, logs.append)  # 2x faster than timed: more steps than the first plan
    assert trainer.max_steps > 1.9 * planned
    assert trainer.eval_every == math.ceil(0.5 * planned)
