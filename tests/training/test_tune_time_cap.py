"""`instructrec train --max-minutes`: the schedule is fitted into the cap (the step budget lowered
to what fits, so the learning rate completes its decay inside it), tested with an injected clock;
and a run that crosses the cap anyway stops after that step with a resumable checkpoint and a
loadable final model holding the same weights, and the resumed run finishes the step budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from instructrec.engine.errors import InputError
from instructrec.training.tune import TrainConfig, train
from instructrec.training.tune_schedule import TimeBudget, lr_factor

from ..conftest import write_train_and_valid

TITLES = ["Halo 3 - Xbox 360", "Mario Kart 8", "Portal 2 - PC", "Tetris Effect", "Stardew Valley",
          "Forza Horizon 4", "Animal Crossing", "Dark Souls III"]


def write_instructions(directory: Path) -> Path:
    rows = {"instruction": [f"The shopper bought {TITLES[i - 1]}. What do they buy next?" for i in range(8)],
            "target": TITLES, "template": ["demo"] * 8}
    return write_train_and_valid(directory, rows)


def config(instructions: Path, out: Path, tokenizer_dir: Path, **overrides) -> TrainConfig:
    base = dict(instructions=instructions, model="random:t5-tiny", tokenizer=tokenizer_dir, out=out, precision="fp32",
                device="cpu", progress=False, batch_size=4, max_steps=4, rank_eval=False, dropout=0.0,
                threads=1, eval_max_rows=4)
    base.update(overrides)
    return TrainConfig(**base)


def test_time_cap_saves_a_checkpoint_and_a_final_model_then_resumes(tmp_path, tokenizer_dir, one_torch_thread):
    import torch
    from transformers import T5ForConditionalGeneration

    data = write_instructions(tmp_path / "data")
    # A cap of ~0 minutes: the first step crosses it (tokenizing alone takes longer).
    capped = train(config(data, tmp_path / "run", tokenizer_dir, max_minutes=1e-9))
    assert capped.time_capped and capped.stopped_early and capped.steps_done == 1
    assert capped.checkpoint.is_dir() and (tmp_path / "run" / "config.json").is_file()
    assert len(capped.evaluations) == 1  # validated before stopping
    final = T5ForConditionalGeneration.from_pretrained(tmp_path / "run").state_dict()
    saved = T5ForConditionalGeneration.from_pretrained(capped.checkpoint).state_dict()
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)

    resumed = train(config(data, tmp_path / "run", tokenizer_dir, resume=True))
    assert not resumed.stopped_early and resumed.steps_done == 4 and sorted(resumed.step_losses) == [2, 3, 4]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_a_non_positive_cap_is_refused_before_training(tmp_path, tokenizer_dir, bad):
    data = write_instructions(tmp_path / "data")
    with pytest.raises(InputError, match="max_minutes"):
        train(config(data, tmp_path / "run", tokenizer_dir, max_minutes=bad))
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the schedule fits the cap


class SteppingClock:
    """A clock that advances `tick` seconds each time it is read: every duration the trainer
    measures becomes a pure function of its own control flow, never of the machine's speed."""

    def __init__(self, tick: float = 1.0):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_a_capped_run_completes_its_schedule_inside_the_cap(tmp_path, tokenizer_dir, one_torch_thread):
    import json

    data = write_instructions(tmp_path / "data")
    out = tmp_path / "run"
    # 200 planned steps, a cap of 90 clock-seconds: at a few ticks per step, far fewer fit.
    result = train(config(data, out, tokenizer_dir, max_steps=200, max_minutes=1.5, optimizer="adamw",
                          lr=1e-2, warmup_steps=2, schedule="linear", eval_every=7), clock=SteppingClock())
    assert not result.stopped_early and not result.time_capped
    assert result.planned_steps == 200 and 8 < result.total_steps < 60
    assert result.steps_done == result.total_steps
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, result.total_steps + 1))
    assert steps[-1]["elapsed_s"] <= 90.0  # the last step ends inside the cap (by the injected clock)
    # The rate decayed all the way (a linear decay's last step runs at half the rate of the one
    # before it) and never rose after the warm-up.
    assert steps[-1]["lr"] == pytest.approx(steps[-2]["lr"] / 2) and steps[-1]["lr"] < 1e-2 / 8
    rates = [r["lr"] for r in steps[1:]]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert json.loads((out / "training_config.json").read_text())["planned_steps"] == 200
    assert (out / "model.safetensors").is_file()


def test_the_budget_estimate_by_hand():
    budget = TimeBudget(deadline=100.0)
    # Iterations start at 0, 10 (the first one, 10 s, is left out), 12, 14, 16, 18.
    for start in (0.0, 10.0, 12.0, 14.0, 16.0):
        budget.iteration_started(start)
    assert not budget.ready and budget.fit(step=4, total=50, now=17.0) == 50
    budget.iteration_started(18.0)
    assert budget.ready and budget.step_times == [2.0, 2.0, 2.0, 2.0]
    # 82 s left at 2 s per step with a 5% margin: 39 more steps.
    assert budget.fit(step=5, total=50, now=18.0) == 5 + int(82 // 2.1)
    # A 6 s evaluation: spread over the 6 iterations (+1 s each) and reserved once at the end.
    budget.record_overhead(6.0, evaluation=True)
    assert budget.fit(step=5, total=50, now=24.0) == 5 + int((100 - 24 - 6) // (3 * 1.05))
    # Never above the planned total, never below the steps already run.
    assert budget.fit(step=5, total=8, now=24.0) == 8
    assert budget.fit(step=5, total=50, now=99.0) == 5


class SpeedingClock(SteppingClock):
    """Reads slow (`tick`) for the first `slow_reads`, then four times faster: a machine whose
    first steps are slow (allocator, caches) or whose neighbour job has ended."""

    def __init__(self, slow_reads: int, tick: float = 1.0):
        super().__init__(tick)
        self.reads, self.slow_reads = 0, slow_reads

    def __call__(self) -> float:
        self.reads += 1
        if self.reads == self.slow_reads:
            self.tick /= 4
        return super().__call__()


def test_the_budget_grows_back_when_steps_get_faster_and_the_rate_never_rises(tmp_path, tokenizer_dir,
                                                                              one_torch_thread, caplog):
    import json
    import logging

    data = write_instructions(tmp_path / "data")
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="instructrec.training.tune"):
        result = train(config(data, out, tokenizer_dir, max_steps=400, max_minutes=2.0, optimizer="adamw",
                              lr=1e-2, warmup_steps=2, schedule="linear"), clock=SpeedingClock(slow_reads=60))
    fitted = [int(r.getMessage().split()[1]) for r in caplog.records if "steps fit in the cap" in r.getMessage()]
    # The first estimate, read at the slow speed, was raised once the steps ran faster.
    assert len(fitted) >= 2 and fitted[-1] > 1.5 * fitted[0]
    assert result.total_steps == result.steps_done > fitted[0] and not result.time_capped
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "train"]
    assert steps[-1]["elapsed_s"] <= 120.0
    rates = [r["lr"] for r in steps[1:]]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert steps[-1]["lr"] == pytest.approx(steps[-2]["lr"] / 2)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_refit_continues_the_decay_from_the_current_rate(schedule):
    from instructrec.training.tune_schedule import StepSchedule

    plan = StepSchedule(warmup=4, total=100, schedule=schedule)
    plan.refit(2, 50)  # in the warm-up: only the total changes
    assert [plan(s) for s in range(8)] == [lr_factor(s, 4, 50, schedule) for s in range(8)]
    ran = [plan(s) for s in range(20)]  # the factors the steps run at, refits applied as they come
    before = plan(20)
    plan.refit(20, 80)  # raised: the decay restarts from the rate step 20 had, ends at 80
    assert plan(20) == pytest.approx(before) and plan(80) == pytest.approx(0.0, abs=1e-12)
    assert plan(50) == pytest.approx(before * (1 - 30 / 60) if schedule == "linear"
                                     else before * 0.5 * (1 + math.cos(math.pi * 30 / 60)))
    ran += [plan(s) for s in range(20, 60)]
    middle = plan(60)
    plan.refit(60, 70)  # lowered: continuous again, zero at 70
    assert plan(60) == pytest.approx(middle) and plan(70) == pytest.approx(0.0, abs=1e-12)
    ran += [plan(s) for s in range(60, 70)]
    assert ran[3] == 1.0 and all(a >= b for a, b in zip(ran[3:], ran[4:])) and 0 < ran[-1] < ran[-2]
    constant = StepSchedule(warmup=0, total=10, schedule="constant")
    constant.refit(5, 20)
    assert constant(7) == 1.0 and constant.total == 20


def test_the_estimate_holds_steady_over_batches_of_varying_length():
    """Length-grouped batches take from 1x to ~3x the shortest one's time in a shuffled order: the
    budget, refitted every ten steps at the same mean speed, should not swing with the batch mix."""
    import numpy as np

    durations = np.random.default_rng(0).choice([0.1, 0.2, 0.3], size=400, p=[0.5, 0.2, 0.3])
    budget = TimeBudget(deadline=1e9)
    now, fits = 0.0, []
    for step, seconds in enumerate(durations):
        budget.iteration_started(now)
        now += seconds
        if step >= 100 and step % 10 == 0:
            # The steps that fit in the next 60 s: about 60 / mean step time / 1.05.
            fits.append(budget.fit(0, 10**6, budget.deadline - 60.0))
    mean_fit = float(np.mean(fits))
    assert mean_fit == pytest.approx(60.0 / durations.mean() / 1.05, rel=0.1)
    assert max(fits) - min(fits) < 0.15 * mean_fit


def test_refits_are_said_at_info_when_the_budget_moved_much_or_minutes_ago():
    from instructrec.training.tune_schedule import RefitAnnouncer

    say = RefitAnnouncer()
    assert say.worth_saying(1000, now=0.0)  # the first budget is always said
    assert not say.worth_saying(1080, now=10.0)  # 8% within five minutes of the last line
    assert not say.worth_saying(1040, now=200.0)
    assert say.worth_saying(1080, now=310.0)  # 8% from what was said, five minutes later
    assert not say.worth_saying(1100, now=320.0)  # 1.9% from 1,080: never, however late
    assert not say.worth_saying(1060, now=5000.0)
    assert say.worth_saying(1500, now=5001.0)  # 39% at once: a real change of speed
    assert say.worth_saying(1000, now=5002.0)  # and back


class WobblingClock(SteppingClock):
    """Each read advances `tick`, 20% longer in every other stretch of `stretch` reads: the step
    times of length-grouped batches on a machine of steady speed."""

    def __init__(self, tick: float, stretch: int):
        super().__init__(tick)
        self.reads, self.stretch, self.base = 0, stretch, tick

    def __call__(self) -> float:
        self.reads += 1
        self.tick = self.base * (1.2 if (self.reads // self.stretch) % 2 else 1.0)
        return super().__call__()


def test_a_wobbling_step_time_does_not_fill_the_log(tmp_path, tokenizer_dir, one_torch_thread, caplog):
    import logging

    data = write_instructions(tmp_path / "data")
    with caplog.at_level(logging.DEBUG, logger="instructrec.training.tune"):
        result = train(config(data, tmp_path / "run", tokenizer_dir, max_steps=5000, max_minutes=2.0,
                              optimizer="adamw", lr=1e-2, warmup_steps=2, schedule="linear"),
                       clock=WobblingClock(tick=0.1, stretch=100))
    refits = [r for r in caplog.records if "steps fit in the cap" in r.getMessage()]
    said = [r for r in refits if r.levelno == logging.INFO]
    # The budget was refitted many times as the step time wobbled, and said at INFO once: two
    # clock-minutes are within REFIT_SAY_EVERY_S and no move reached REFIT_SAY_AT_ONCE_FRACTION.
    assert len(refits) >= 5 and len(said) == 1
    assert result.steps_done == result.total_steps and not result.time_capped


def _budget_after(durations, deadline: float) -> tuple[TimeBudget, float]:
    """A TimeBudget told of iterations of these durations from clock 0; the clock at the end."""
    budget, now = TimeBudget(deadline=deadline), 0.0
    for seconds in durations:
        budget.iteration_started(now)
        now += seconds
    budget.iteration_started(now)
    return budget, now


def test_a_minute_of_sharing_early_in_a_long_run_barely_moves_the_budget():
    """45 minutes, 0.2 s steps, one minute at three times that (a neighbour job) two minutes in.
    The steps already lost are lost; what the budget plans for the 42 minutes left should read
    that minute as the small part of the recent past it is, not as the machine's new speed."""
    fast, slow = [0.2] * 600, [0.6] * 100  # 2 minutes at 0.2 s, then 1 minute at 0.6 s
    budget, now = _budget_after(fast + slow, deadline=2700.0)
    steady = 700 + int((2700.0 - now) // (0.2 * 1.05))  # had the neighbour never come
    fitted = budget.fit(700, 10**6, now)
    # A 128-step window read the minute as the new speed: 700 + 2520 s / 0.51 s = ~5,400 steps.
    assert fitted > 0.9 * steady


def test_a_slowdown_that_lasts_is_followed():
    """The same neighbour stays: after ten minutes of it the budget plans for the slow speed."""
    budget, now = _budget_after([0.2] * 600 + [0.6] * 1000, deadline=2700.0)
    at_slow_speed = 1600 + int((2700.0 - now) // (0.6 * 1.05))
    assert budget.fit(1600, 10**6, now) == pytest.approx(at_slow_speed, rel=0.05)


def test_the_window_is_never_under_128_steps_near_the_deadline():
    """Ten seconds before the deadline a quarter of the time left is 2.5 s: twelve steps of 0.2 s
    would swing with the batch mix; the window still reads the newest 128."""
    from instructrec.training.tune_schedule import STEP_TIME_WINDOW

    durations = [1.0] * 200 + [0.1, 0.3] * (STEP_TIME_WINDOW // 2)
    budget, now = _budget_after(durations, deadline=1e9)
    assert budget.step_time_estimate(left=10.0) == pytest.approx(0.2)
    # With time enough left, the window spans every step: ten whole chunks of 32, the newest four
    # of 0.2 s mean, six of 1.0 s steps; the middle half (the 3rd to 8th of the sorted ten) is two
    # of 0.2 and four of 1.0.
    assert budget.step_time_estimate(left=4 * sum(durations)) == pytest.approx((2 * 0.2 + 4 * 1.0) / 6)


def test_the_estimate_moves_smoothly_while_a_slowdown_fills_the_window():
    """Slow chunks added one by one to a window of fast ones: the estimate never jumps (a median
    of the chunks flipped from the fast speed to the slow one as the slow ones passed half)."""
    from instructrec.training.tune_schedule import STEP_TIME_CHUNK

    budget, now = _budget_after([0.2] * (64 * STEP_TIME_CHUNK), deadline=1e9)
    estimates = [budget.step_time_estimate(left=1e9)]
    for _ in range(192):
        for _ in range(STEP_TIME_CHUNK):
            now += 0.6
            budget.iteration_started(now)
        estimates.append(budget.step_time_estimate(left=1e9))
    assert estimates[0] == pytest.approx(0.2) and estimates[-1] == pytest.approx(0.6)
    steps = [b - a for a, b in zip(estimates, estimates[1:])]
    assert min(steps) >= -1e-12 and max(steps) < 0.02
