"""Grid search on the validation candidates: every grid point trained with early stopping, the
best validation metric kept (ties go to the earlier point of the grid's fixed order)."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from instructrec.engine.errors import InputError
from instructrec.training.baselines.common import FitReport, LabeledRequest, TrainingData

logger = logging.getLogger(__name__)


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of the grid, keys in sorted order so the order does not depend on the dict."""
    keys = sorted(grid)
    empty = [k for k in keys if not grid[k]]
    if empty:
        raise InputError("grid", f"no values for {', '.join(empty)}", "give each key at least one value")
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


@dataclass
class TuningResult:
    best_model: Any
    best_params: dict[str, Any]
    best_report: FitReport
    reports: list[tuple[dict[str, Any], FitReport]] = field(default_factory=list)

    def table(self) -> list[dict[str, Any]]:
        return [{**params, "valid": r.best_valid, "best_epoch": r.best_epoch, "train_seconds": r.train_seconds}
                for params, r in self.reports]


def tune(make_model: Callable[..., Any], grid: Mapping[str, Sequence[Any]], train: TrainingData,
         valid: Sequence[LabeledRequest], **fit_kwargs) -> TuningResult:
    """Fit `make_model(**point)` for every grid point; keep the one with the best validation metric."""
    if not valid:
        raise InputError("valid", "tuning needs validation requests", "pass the valid candidates")
    best = None
    reports = []
    for params in grid_points(grid):
        model = make_model(**params)
        report = model.fit(train, valid, **fit_kwargs)
        reports.append((params, report))
        logger.info("tune %s %s -> valid %s %.4f (epoch %d, %.1fs)", report.method, params, report.metric,
                    report.best_valid, report.best_epoch, report.train_seconds)
        if best is None or (not math.isnan(report.best_valid) and report.best_valid > best[2].best_valid):
            best = (model, params, report)
    return TuningResult(best[0], best[1], best[2], reports)
