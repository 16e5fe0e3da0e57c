"""The learning-rate schedule, and fitting it into a wall-clock cap (`--max-minutes`).

A capped run that simply stops leaves the rate wherever it was (a Video Games run stopped with
the rate at 36% of its peak). Here the cap shortens the schedule instead: after a few measured
steps the step budget is lowered to the steps that fit before the deadline, and lowered again
after each evaluation or checkpoint (their time is known only once they ran), so the decay ends
inside the cap. The budget only ever goes down, so the rate never climbs back. The clock is
injected, so this is tested without timing anything.
"""

from __future__ import annotations

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
    """`lr_factor` as a LambdaLR function whose `total` may be lowered during the run. An object,
    not a closure: LambdaLR saves a callable object's attributes in its state_dict, so the
    lowered total travels with the scheduler through checkpoints."""

    def __init__(self, warmup: int, total: int, schedule: str):
        self.warmup, self.total, self.schedule = warmup, total, schedule

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup, self.total, self.schedule)


# Steps measured before the first estimate; the first step of a process is left out of it (it
# carries one-off costs: allocator growth, lazy initialisation; 3-10x a later step here).
ESTIMATE_AFTER_STEPS = 4
# Step times the estimate reads (the median of the newest ones): recent enough to follow a
# machine whose load changes, long enough that one slow step does not cut the budget.
STEP_TIME_WINDOW = 32


@dataclass
class TimeBudget:
    """Fits the step budget into `deadline` (a clock value). Feed it every step's duration and
    every other interval of the loop (evaluations, checkpoints); ask `fit` for the new total."""

    deadline: float
    step_times: list[float] = field(default_factory=list)
    overhead_s: float = 0.0  # evaluations and checkpoints inside the loop so far
    last_eval_s: float = 0.0  # the final validation and save happen after the last step
    steps_seen: int = 0  # steps of this process, the first one included

    def record_step(self, seconds: float) -> None:
        self.steps_seen += 1
        if self.steps_seen > 1:
            self.step_times.append(seconds)
            del self.step_times[:-STEP_TIME_WINDOW]

    def record_overhead(self, seconds: float, evaluation: bool = False) -> None:
        self.overhead_s += seconds
        if evaluation:
            self.last_eval_s = seconds

    @property
    def ready(self) -> bool:
        return len(self.step_times) >= ESTIMATE_AFTER_STEPS

    def fit(self, step: int, total: int, now: float) -> int:
        """The step budget that ends by the deadline: `total` or less, never below `step`
        (the steps already run). Unchanged until ESTIMATE_AFTER_STEPS steps were measured."""
        if not self.ready:
            return total
        # Evaluations and checkpoints spread over the steps run so far, plus the final one.
        per_step = statistics.median(self.step_times) + self.overhead_s / max(1, self.steps_seen)
        left = self.deadline - now - self.last_eval_s
        fits = step + int(max(0.0, left) // per_step)
        return max(step, min(total, fits))
