"""A domain of `instructrec eval`: one prepared directory with its instruction folder, the
histories of its users, and its baselines (training/baselines), fitted lazily on its training
sequences with early stopping on its stored validation lists."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from instructrec.engine.errors import InputError, InstructRecError

from .eval_scenarios import SCENARIOS, Instance, Scenario, load_instances, sample

if TYPE_CHECKING:
    from .evaluate import EvalConfig

log = logging.getLogger(__name__)


class Domain:
    """One prepared directory with its instructions and lazily fitted baselines."""

    def __init__(self, name: str, data: Path, instructions: Path, cfg: EvalConfig):
        from instructrec.training.baselines import load_prepared

        self.name, self.data, self.instructions, self.cfg = name, Path(data), Path(instructions), cfg
        for path, flag in ((self.data / "stats.json", "data"), (self.instructions / "test.parquet", "instructions")):
            if not path.is_file():
                raise InputError(flag if name == "main" else f"cross_{flag}", f"{path} does not exist",
                                 "run `instructrec data prepare` and `instructrec instructions build` first")
        self.prepared = load_prepared(self.data)
        self.items = self.prepared.train.items
        self.stats = json.loads((self.data / "stats.json").read_text())
        self.histories = {split: {lr.request.user_id: lr.request.history for lr in getattr(self.prepared, split)}
                          for split in ("valid", "test")}
        self.titles = dict(zip(self.items.item_ids, self.items.titles))
        self.universe = sorted(self.items.item_ids)
        # Every item a user interacted with (train, valid and test): never a negative.
        self._interacted = {lr.request.user_id: set(lr.request.history) | {lr.target_item_id}
                            for lr in self.prepared.test}
        self._fitted: dict[str, tuple[object, dict]] = {}

    def interacted(self, user: str) -> set[str]:
        return self._interacted.get(user, set())

    def baseline_valid(self, query: str | None):
        from instructrec.training.baselines import LabeledRequest

        valid = sample_labeled(self.prepared.valid, self.cfg.baseline_valid, self.cfg.seed)
        if query == "category":
            valid = [LabeledRequest(replace(v.request, query=self.items.category_path(v.target_item_id)),
                                    v.target_item_id) for v in valid]
        return valid

    def fitted(self, method: str, variant: str = ""):
        key = f"{method}:{variant}"
        if key not in self._fitted:
            started = time.perf_counter()
            model, report, grid = self._fit(method, variant)
            info = {"train_seconds": round(report.train_seconds, 1), "best_epoch": report.best_epoch,
                    "best_valid": None if math.isnan(report.best_valid) else report.best_valid,
                    "metric": report.metric, "config": report.config,
                    "wall_seconds": round(time.perf_counter() - started, 1)}
            if grid:
                info["grid"] = grid
            log.info("%s: fitted %s%s in %.1fs (best epoch %d)", self.name, method,
                     f" ({variant})" if variant else "", info["wall_seconds"], report.best_epoch)
            self._fitted[key] = (model, info)
        return self._fitted[key]

    def _fit(self, method: str, variant: str):
        from instructrec.training.baselines import (
            BERT4Rec, TEM, Popularity, SASRec, TwoTowerRetriever, category_queries, tune)

        cfg = self.cfg
        train = self.prepared.train
        common = {"max_epochs": cfg.baseline_max_epochs} if cfg.baseline_max_epochs else {}
        overrides = dict(common, **cfg.baseline_overrides.get(method, {}))
        if method == "popularity":
            model = Popularity()
            return model, model.fit(train, self.baseline_valid(None)), None
        factories = {
            "sasrec": (lambda **p: SASRec(seed=cfg.seed, **overrides, **p), SASRec.grid, {}, None),
            "bert4rec": (lambda **p: BERT4Rec(seed=cfg.seed, **overrides, **p), BERT4Rec.grid, {}, None),
            "tem": (lambda **p: TEM(seed=cfg.seed, **overrides, **p), TEM.grid, {}, "category"),
        }
        if method == "two-tower" and variant == "search":
            pairs = category_queries(self.items, self.search_train_items())
            valid = self.search_valid()
            factories["two-tower"] = (lambda **p: TwoTowerRetriever(kind="search", seed=cfg.seed, **overrides, **p),
                                      TwoTowerRetriever.grid, {"search_pairs": pairs}, valid)
        elif method == "two-tower":
            factories["two-tower"] = (lambda **p: TwoTowerRetriever(kind="user", seed=cfg.seed, **overrides, **p),
                                      TwoTowerRetriever.grid, {}, None)
        make, grid, fit_kwargs, valid = factories[method]
        if valid is None or isinstance(valid, str):
            valid = self.baseline_valid(valid)
        if cfg.tune:
            result = tune(make, grid, train, valid, **fit_kwargs)
            return result.best_model, result.best_report, result.table()
        model = make()
        return model, model.fit(train, valid, **fit_kwargs), None

    def search_train_items(self) -> list[str]:
        import pyarrow.parquet as pq

        table = pq.read_table(self.data / "search_splits.parquet")
        return [i for i, s in zip(table["item_id"].to_pylist(), table["split"].to_pylist()) if s == "train"]

    def search_valid(self):
        from instructrec.training.baselines import LabeledRequest, RankingRequest

        valid = load_instances(self.instructions, "valid", SCENARIOS["product-search"], {}, self.items)
        valid = sample(valid, self.cfg.baseline_valid, self.cfg.seed, "product-search-baseline-valid")
        return [LabeledRequest(RankingRequest(inst.key, (), tuple(inst.candidate_ids), query=inst.query), inst.target)
                for inst in valid]


def sample_labeled(labeled, n: int, seed: int):
    if n <= 0 or n >= len(labeled):
        return list(labeled)
    rng = np.random.default_rng([seed, 7])
    return [labeled[i] for i in np.sort(rng.choice(len(labeled), size=n, replace=False))]


def baseline_scores(domain: Domain, method: str, scenario: Scenario, instances: Sequence[Instance]) -> np.ndarray:
    from instructrec.training.baselines import RankingRequest

    variant = "search" if method == "two-tower" and scenario.name == "product-search" else ""
    model, _ = domain.fitted(method, variant)
    requests = [RankingRequest(inst.user_id or inst.key, inst.history, tuple(inst.candidate_ids), query=inst.query)
                for inst in instances]
    width = {len(r.candidate_ids) for r in requests}
    if len(width) != 1:
        raise InstructRecError(f"{scenario.name}: candidate lists of different lengths {sorted(width)}")
    return model.score(requests)
