"""The learning-rate schedule, and fitting it into a wall-clock cap (`--max-minutes`).

A capped run that simply stops leaves the rate wherever it was (a Video Games run stopped with
the rate at 36% of its peak). Here the schedule is fitted to the cap instead: after a few measured
steps the step budget is set to the steps that fit before the deadline, and refitted every ten
steps and after each evaluation or checkpoint (their time is known only once they ran), so
the decay ends inside the cap. A refit may lower the budget (a slower stretch) or raise it again,
up to the planned steps: the first estimate, read while the allocator and caches warm up, is
often pessimistic, and a budget that only went down left a fifth of a 4-minute cap unused. Each
refit after the warm-up continues the decay from the rate the next step would have had, down to
zero at the new total, so the rate never climbs back. The clock is injected, so this is tested
without timing anything.
"""

from __future__ import annotations

import bisect
import math
import statistics
from dataclasses import dataclass, field


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak lr for optimiser step `step` (0-based): linear warm-up reaching the
    peak at step warmup-1, then linear / cosine decay towards 0 at step `total`, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class StepSchedule:
    """`lr_factor` as a LambdaLR function whose `total` may be refitted during the run (`refit`). An
    object, not a closure: LambdaLR saves a callable object's attributes in its state_dict, so the
    refitted total and its anchor travel with the scheduler through checkpoints."""

    def __init__(self, warmup: int, total: int, schedule: str):
        self.warmup, self.total, self.schedule = warmup, total, schedule
        # Set by a refit after the warm-up: from anchor_step on, the decay runs from anchor_factor
        # down to 0 at `total` in the schedule's shape.
        self.anchor_step: int | None = None
        self.anchor_factor = 1.0

    def __call__(self, step: int) -> float:
        if self.anchor_step is None or step < self.anchor_step or self.schedule == "constant":
            return lr_factor(step, self.warmup, self.total, self.schedule)
        progress = min(1.0, (step - self.anchor_step) / max(1, self.total - self.anchor_step))
        if self.schedule == "linear":
            return self.anchor_factor * (1.0 - progress)
        return self.anchor_factor * 0.5 * (1.0 + math.cos(math.pi * progress))

    def refit(self, next_step: int, total: int) -> None:
        """End the schedule at `total` from optimiser step `next_step` (0-based, the next to run) on.
        In the warm-up only the total changes (the decay has not begun); after it, the decay restarts
        from the factor `next_step` would have had, so the rate is continuous and never rises."""
        if next_step >= self.warmup and self.schedule != "constant":
            self.anchor_factor = self(next_step)
            self.anchor_step = next_step
        self.total = total


# Steps measured before the first estimate; the first step of a process is left out of it (it
# carries one-off costs: allocator growth, lazy initialisation; 3-10x a later step here).
ESTIMATE_AFTER_STEPS = 4
# Step times the estimate reads: the newest ones spanning at least a quarter of the time left,
# and at least 128 steps. Length-grouped batches make single step times vary ~3x, so they are read
# as the means of consecutive chunks of 32 steps (the median of the newest 32 single steps swung a
# 4-minute run's budget between 391 and 859 steps from one refit to the next), and the estimate is
# the mean of the middle half of those chunk means. Two and a half minutes of other jobs in the
# first seven of a 45-minute run cut the budget of a 128-step mean from ~11,000 steps to 4,560
# (the rate decayed towards the lower total until the budget recovered); a window of a quarter of
# the 38 minutes left holds their chunks as a minority the middle half leaves out. A slowdown that
# lasts moves the estimate smoothly as it fills the window (a median of the chunks flipped between
# the two speeds, 10,135 and 14,478 steps two seconds apart, while half the window was slow), and
# the window narrows as the deadline nears (the last minutes read the newest 128 steps).
STEP_TIME_WINDOW = 128
STEP_TIME_CHUNK = 32
WINDOW_SHARE_OF_TIME_LEFT = 0.25
# Step times kept (the oldest half dropped beyond this): hours of steps of a few milliseconds.
MAX_STEP_TIMES = 1 << 18
# The estimate plans for steps this much slower than measured: between two refits the mean
# step time of a shared machine drifts by a few percent, and a run that overshoots is cut by the
# hard stop with its schedule unfinished.
FIT_MARGIN = 0.05


@dataclass
class TimeBudget:
    """Fits the step budget into `deadline` (a clock value). Tell it when each loop iteration
    starts and how long the evaluations and checkpoints inside the loop took; ask `fit` for the
    new total. An iteration's time is everything between two starts but those evaluations and
    checkpoints (the step, the logging, the progress bar)."""

    deadline: float
    step_times: list[float] = field(default_factory=list)
    overhead_s: float = 0.0  # evaluations and checkpoints inside the loop so far
    last_eval_s: float = 0.0  # the final validation and save happen after the last step
    iterations: int = 0  # started by this process
    _started_at: float | None = None
    _overhead_in_iteration: float = 0.0
    # Running sums of step_times (one more entry than it): the sum of any newest stretch in O(1).
    _sums: list[float] = field(default_factory=lambda: [0.0])

    def iteration_started(self, now: float) -> None:
        if self._started_at is not None and self.iterations > 1:
            seconds = now - self._started_at - self._overhead_in_iteration
            self.step_times.append(seconds)
            self._sums.append(self._sums[-1] + seconds)
            if len(self.step_times) > MAX_STEP_TIMES:
                drop = MAX_STEP_TIMES // 2
                del self.step_times[:drop], self._sums[:drop]
        self.iterations += 1
        self._started_at, self._overhead_in_iteration = now, 0.0

    def record_overhead(self, seconds: float, evaluation: bool = False) -> None:
        self.overhead_s += seconds
        self._overhead_in_iteration += seconds
        if evaluation:
            self.last_eval_s = seconds

    @property
    def ready(self) -> bool:
        return len(self.step_times) >= ESTIMATE_AFTER_STEPS

    def fit(self, step: int, total: int, now: float) -> int:
        """The step budget that ends by the deadline: at most `total` (the planned steps), never
        below `step` (the steps already run). `total` until ESTIMATE_AFTER_STEPS steps were measured."""
        if not self.ready:
            return total
        left = self.deadline - now - self.last_eval_s
        # Evaluations and checkpoints spread over the steps run so far, plus the final one.
        per_step = self.step_time_estimate(left) + self.overhead_s / max(1, self.iterations)
        fits = step + int(max(0.0, left) // (per_step * (1.0 + FIT_MARGIN)))
        return max(step, min(total, fits))

    def step_time_estimate(self, left: float) -> float:
        """The mean of the middle half of the STEP_TIME_CHUNK-step chunk means of the newest steps
        that span WINDOW_SHARE_OF_TIME_LEFT of `left` seconds and at least STEP_TIME_WINDOW steps;
        the mean of every step while fewer than that were measured."""
        count, total = len(self.step_times), self._sums[-1]
        if count < STEP_TIME_WINDOW:
            return total / count
        # _sums is non-decreasing: the newest stretch from index i on spans total - _sums[i].
        first = bisect.bisect_right(self._sums, total - WINDOW_SHARE_OF_TIME_LEFT * max(0.0, left)) - 1
        chunks = (count - max(0, min(first, count - STEP_TIME_WINDOW))) // STEP_TIME_CHUNK
        means = sorted((self._sums[end] - self._sums[end - STEP_TIME_CHUNK]) / STEP_TIME_CHUNK
                       for end in range(count, count - chunks * STEP_TIME_CHUNK, -STEP_TIME_CHUNK))
        return statistics.fmean(means[chunks // 4: chunks - chunks // 4])


# A refit is said at INFO when the budget moved by more than REFIT_SAY_FRACTION from what was
# last said, and either by more than REFIT_SAY_AT_ONCE_FRACTION or REFIT_SAY_EVERY_S after the last
# INFO line. Length-grouped step times made a 128-step mean swing by more than 5% for hours (a
# 100-minute run said 113 refits at INFO); a real change of speed moves it by far more.
REFIT_SAY_FRACTION = 0.05
REFIT_SAY_AT_ONCE_FRACTION = 0.25
REFIT_SAY_EVERY_S = 300.0


@dataclass
class RefitAnnouncer:
    """Decides whether a refitted step budget is worth an INFO line (else DEBUG)."""

    told: int | None = None  # the budget last said at INFO
    told_at: float = 0.0  # the clock then

    def worth_saying(self, fits: int, now: float) -> bool:
        if self.told is None:
            self.told, self.told_at = fits, now
            return True
        moved = abs(fits - self.told) / max(1, self.told)
        if moved > REFIT_SAY_FRACTION and (moved > REFIT_SAY_AT_ONCE_FRACTION
                                           or now - self.told_at >= REFIT_SAY_EVERY_S):
            self.told, self.told_at = fits, now
            return True
        return False
