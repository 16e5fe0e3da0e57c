"""Quality evaluation (`instructrec eval`): scenarios x methods -> HR@1/3/5 and NDCG@3/5.

One run reads a prepared data directory (`instructrec data prepare`), an instruction folder built
from it (`instructrec instructions build --eval-templates ...`: its valid/test rows hold the
rendered instructions with the data layer's stored candidate lists), and a checkpoint; it writes
`metrics.json` and `results.md` to the output folder.

How every method sees the same thing
- An instance is (user or search item, target, candidate ids). Instances are drawn once per
  scenario (seeded) and every method ranks exactly those candidate lists; the instructions of
  every template of the scenario's type share them (checked).
- Every method gives one score per candidate, in the list's order; the rank of the target is
  `training.metrics.pessimistic_rank` for all of them (ties put the target after every tied
  negative). The engine's grouped tournament has no comparable scores across rounds, so its
  ranking becomes the scores -position. A request the engine rejects counts as a miss (rank K+1)
  and is counted under `errors`.
- Lists other than the stored ones (hard negatives, 100 candidates) are the same for all methods:
  the stored instruction's numbered list is replaced by the engine's `{candidates}` placeholder,
  which the engine fills with the new list (per tournament group for 100 candidates).

Model methods: `instructrec` (the tuned checkpoint) and `zero-shot` (the same architecture with
random weights, seeded: no pretrained Flan-T5 exists on these machines, so "untuned" is a
random-init model here). Where an instruction type has several T3 templates, each model method
picks one by NDCG@5 on a seeded sample of that type's validation instances with the stored lists
(the original's rule); hard-negatives and candidates-100 reuse seq-rec's choice (same type).

Runs can be split: a run writes every list it ranks to OUT/instances.json before ranking; another
run with `add_to` ranks exactly those lists and merges its methods into that run's metrics (the
baselines ran while the model trained, see docs/results.md).

Baselines (training/baselines), fitted on the prepared training sequences of the scenario's
domain with early stopping on the stored validation lists: popularity, SASRec, BERT4Rec, the
two-tower retriever (user tower for recommendation; its search tower, query = category path,
for product search) and TEM (query: the category path for I2, the vague intention text for I1).

Product search is evaluated on search-test items that are never a training target of the model:
instances whose target is a target in the model's train.parquet are dropped and counted
(`restrict_training_set` builds a training folder where none are, see docs/results.md).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from instructrec.engine.errors import InputError, InstructRecError

from .metrics import pessimistic_rank, summarize_ranks

log = logging.getLogger(__name__)

MODEL_METHODS = ("instructrec", "zero-shot")
BASELINE_METHODS = ("popularity", "sasrec", "bert4rec", "two-tower", "tem")
METHODS = MODEL_METHODS + BASELINE_METHODS
CANDIDATE_MODES = ("stored", "hard", "sampled")
METRIC_KEYS = ("hr@1", "hr@3", "hr@5", "ndcg@3", "ndcg@5")
SELECTION_METRIC = "ndcg@5"


@dataclass(frozen=True)
class Scenario:
    name: str
    notation: str  # the original's <P, I, T>
    preference: str  # the preference code of its templates (P0, P1, P2, P1+P2)
    intention: str  # I0, I1, I2
    title: str
    candidates: str = "stored"  # stored | hard (two-tower top 9) | sampled (99 negatives)
    cross_domain: bool = False
    baselines: tuple[str, ...] = ("popularity", "sasrec", "bert4rec")
    query: str | None = None  # what TEM / the search tower read: "category" | "vague"
    # The original's published HR@1 (Flan-T5-XL 3B on full Games, teacher-LLM annotations;
    # DESIGN.md "Reference results"): {method: value}. Theirs, not ours.
    theirs: dict = field(default_factory=dict)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("seq-rec", "<P1, I0, T3>", "P1", "I0", "sequential recommendation",
             baselines=("popularity", "sasrec", "bert4rec", "two-tower"),
             theirs={"instructrec": 0.6947, "sasrec": 0.6663}),
    Scenario("product-search", "<P0, I2, T3>", "P0", "I2", "product search on items unseen in training",
             baselines=("popularity", "two-tower"), query="category"),
    Scenario("pers-search-p2", "<P1, P2, T3>", "P1+P2", "I0",
             "personalized: history and explicit preference"),
    Scenario("pers-search-i1", "<P1, I1, T3>", "P1", "I1", "personalized search, vague intention",
             baselines=("popularity", "sasrec", "bert4rec", "tem"), query="vague"),
    Scenario("pers-search-i2", "<P1, I2, T3>", "P1", "I2", "personalized search, specific intention",
             baselines=("popularity", "sasrec", "bert4rec", "tem"), query="category",
             theirs={"instructrec": 0.9269, "tem": 0.8665}),
    Scenario("hard-negatives", "<P1, I0, T3>", "P1", "I0",
             "sequential recommendation, 9 negatives retrieved by the two-tower model", candidates="hard",
             baselines=("popularity", "sasrec", "bert4rec", "two-tower"),
             theirs={"instructrec": 0.1841, "sasrec": 0.0355}),
    Scenario("candidates-100", "<P1, I0, T3>", "P1", "I0",
             "sequential recommendation, 1 positive + 99 sampled negatives (grouped tournament)",
             candidates="sampled", baselines=("popularity", "sasrec", "bert4rec", "two-tower"),
             theirs={"instructrec": 0.3276, "tem": 0.2794}),
    Scenario("held-out", "<P2, I1, T3>", "P2", "I1",
             "held-out instruction type (explicit preference + vague intention, every task form "
             "removed from training)", baselines=("popularity", "sasrec", "bert4rec", "tem"), query="vague"),
    Scenario("cross-domain", "<P1, I0, T3>", "P1", "I0",
             "another domain, never trained on (Amazon 2023 sample)", cross_domain=True),
)}


def resolve_scenarios(names: Sequence[str]) -> list[Scenario]:
    if not names:
        raise InputError("scenario", "no scenario given", f"pass --scenario NAME (repeatable) or all: {', '.join(SCENARIOS)}")
    if "all" in names:
        return list(SCENARIOS.values())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise InputError("scenario", f"unknown scenario(s) {', '.join(unknown)}",
                         f"use one or more of: {', '.join(SCENARIOS)}, or all")
    return [SCENARIOS[n] for n in dict.fromkeys(names)]


def resolve_methods(names: Sequence[str] | None) -> list[str]:
    if not names or "all" in names:
        return list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise InputError("methods", f"unknown method(s) {', '.join(unknown)}", f"use some of: {', '.join(METHODS)}, or all")
    return [m for m in METHODS if m in names]


@dataclass
class EvalConfig:
    data: Path  # prepared directory of the main domain
    instructions: Path  # its instruction folder (valid/test with the scenarios' T3 templates)
    model: Path | None  # tuned checkpoint (needed by the model methods)
    out: Path
    scenarios: tuple[str, ...] = ("all",)
    methods: tuple[str, ...] = ("all",)
    train_instructions: Path | None = None  # the model's train.parquet folder (default: its training_config.json)
    cross_data: Path | None = None
    cross_instructions: Path | None = None
    max_instances: int = 1000  # test instances per scenario (0: all)
    max_instances_100: int = 300  # for candidates-100
    valid_instances: int = 200  # validation instances per template for the template choice
    baseline_valid: int = 3000  # validation lists for the baselines' early stopping (0: all)
    baseline_max_epochs: int = 0  # 0: each baseline's own default
    tune: bool = False  # grid-search each baseline (training/baselines README grids)
    # Per-method config fields, e.g. {"tem": {"pairs_per_user": 2}} (CLI: --baseline-set tem.pairs_per_user=2).
    baseline_overrides: dict = field(default_factory=dict)
    dtype: str = "auto"
    seed: int = 0
    threads: int | None = None
    # A previous run's folder: rank exactly its instances (its instances.json) and add this run's
    # methods to its metrics. Lets the baselines run while the model still trains.
    add_to: Path | None = None


# ---------------------------------------------------------------------------------------------
# Instances


@dataclass
class Instance:
    key: str  # user id, or the search item id for product search
    user_id: str | None
    target: str
    candidate_ids: list[str]
    titles: list[str]
    prompts: dict[str, str]  # template id -> instruction text (or with {candidates})
    history: tuple[str, ...] = ()  # item ids, for the baselines
    query: str | None = None  # for TEM / the search tower

    @property
    def positive(self) -> int:
        return self.candidate_ids.index(self.target)


def _slot_pattern(source: str) -> re.Pattern:
    """A regex that reads the slot values back out of a rendered template source."""
    parts, last = [], 0
    for match in re.finditer(r"\{([a-z_]+)\}", source):
        parts.append(re.escape(source[last:match.start()]))
        name = match.group(1)
        parts.append(f"(?P<{name}>.*?)" if name not in ("candidates",) else "(?P<candidates>.*)")
        last = match.end()
    parts.append(re.escape(source[last:]))
    return re.compile("".join(parts), re.DOTALL)


def read_slot(template_id: str, instruction: str, slot: str) -> str:
    """The value of `slot` in an instruction rendered by `template_id` (e.g. the vague intention)."""
    from instructrec.engine.templates import REGISTRY

    match = _slot_pattern(REGISTRY[template_id].source).fullmatch(instruction)
    if match is None or slot not in match.groupdict():
        raise InstructRecError(f"cannot read {slot!r} back from an instruction of template {template_id}")
    return match.group(slot)


def scenario_templates(instructions: Path, split: str, scenario: Scenario) -> list[str]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(instructions) / f"{split}.parquet"
    if not path.is_file():
        raise InputError("instructions", f"{path} does not exist",
                         "point --instructions at a folder written by `instructrec instructions build`")
    table = pq.read_table(path, columns=["template", "preference", "intention", "task"])
    mask = pc.and_(pc.and_(pc.equal(table["preference"], scenario.preference),
                           pc.equal(table["intention"], scenario.intention)), pc.equal(table["task"], "T3"))
    found = sorted(set(table.filter(mask).column("template").to_pylist()))
    if not found:
        from instructrec.engine.templates import REGISTRY

        wanted = [t.id for t in REGISTRY.values() if t.ranks_titles and t.preference.value == scenario.preference
                  and t.intention.value == scenario.intention and t.task.value == "T3"]
        raise InputError("instructions", f"{path} has no {scenario.notation} reranking rows for scenario "
                         f"{scenario.name}", "rebuild it with `instructrec instructions build --eval-templates "
                         f"{','.join(wanted)},...` (the templates of every scenario you evaluate)")
    return found


def load_instances(instructions: Path, split: str, scenario: Scenario, histories: dict[str, tuple[str, ...]],
                   items, exclude_targets: set[str] | None = None) -> list[Instance]:
    """Every instance of `scenario` in `split`, keyed by user (search item for product search),
    with the instruction of each of the scenario's templates; only keys every template has."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    templates = scenario_templates(instructions, split, scenario)
    table = pq.read_table(Path(instructions) / f"{split}.parquet",
                          columns=["instruction", "template", "user_id", "target_item_id", "candidates",
                                   "candidate_ids"])
    table = table.filter(pc.is_in(table["template"], value_set=pa.array(templates)))
    by_key: dict[str, Instance] = {}
    for row in table.to_pylist():
        key = row["user_id"] if row["user_id"] is not None else row["target_item_id"]
        inst = by_key.get(key)
        if inst is None:
            inst = by_key[key] = Instance(key, row["user_id"], row["target_item_id"], list(row["candidate_ids"]),
                                          list(row["candidates"]), {})
        elif inst.candidate_ids != list(row["candidate_ids"]) or inst.target != row["target_item_id"]:
            raise InstructRecError(f"{split}: templates of {scenario.name} list different candidates for {key!r}; "
                                   "every method must rank the same list (rebuild the instructions)")
        inst.prompts[row["template"]] = row["instruction"]
    instances = []
    dropped_seen = 0
    for key in sorted(by_key):
        inst = by_key[key]
        if len(inst.prompts) != len(templates):
            continue
        if exclude_targets is not None and inst.target in exclude_targets:
            dropped_seen += 1
            continue
        if inst.user_id is not None:
            inst.history = histories.get(inst.user_id, ())
        if scenario.query == "category":
            inst.query = items.category_path(inst.target)
        elif scenario.query == "vague":
            first = templates[0]
            inst.query = read_slot(first, inst.prompts[first], "intention")
        instances.append(inst)
    if dropped_seen:
        log.info("%s %s: %d instances dropped: their target is a training target of the model",
                 scenario.name, split, dropped_seen)
    return instances


def sample(instances: list[Instance], n: int, seed: int, label: str) -> list[Instance]:
    """A seeded subset of `n` instances (all when n is 0 or larger), in key order."""
    if n <= 0 or n >= len(instances):
        return list(instances)
    rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
    keep = np.sort(rng.choice(len(instances), size=n, replace=False))
    return [instances[i] for i in keep]


def _list_placeholder(inst: Instance) -> dict[str, str]:
    """The instructions with their numbered candidate list replaced by `{candidates}`."""
    from instructrec.engine.formatting import CANDIDATES_PLACEHOLDER, format_candidate_list

    listed = format_candidate_list(inst.titles)
    out = {}
    for template, text in inst.prompts.items():
        if text.count(listed) != 1:
            raise InstructRecError(f"the instruction of {inst.key!r} ({template}) does not list its stored "
                                   "candidates exactly once; cannot swap in another list")
        out[template] = text.replace(listed, CANDIDATES_PLACEHOLDER)
    return out


def with_candidates(inst: Instance, negatives: list[str], titles_of: dict[str, str], seed: int) -> Instance:
    """The instance with the target plus `negatives`, the target at a seeded position."""
    rng = np.random.default_rng([seed, zlib.crc32(inst.key.encode())])
    ids = list(negatives)
    ids.insert(int(rng.integers(len(ids) + 1)), inst.target)
    return with_candidate_list(inst, ids, titles_of)


def with_candidate_list(inst: Instance, ids: list[str], titles_of: dict[str, str]) -> Instance:
    if ids == inst.candidate_ids:
        return inst
    if inst.target not in ids:
        raise InstructRecError(f"candidate list of {inst.key!r} lacks its target {inst.target!r}")
    return replace(inst, candidate_ids=list(ids), titles=[titles_of[i] for i in ids], prompts=_list_placeholder(inst))


def sampled_negatives(inst: Instance, universe: list[str], interacted: set[str], k: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 100, zlib.crc32(inst.key.encode())])
    picked: list[str] = []
    seen = set(interacted) | {inst.target}
    if len(universe) - len(seen & set(universe)) < k:
        raise InputError("data", f"the catalog has fewer than {k} items outside user {inst.key!r}'s history",
                         "lower the candidate count or prepare more items")
    while len(picked) < k:
        candidate = universe[int(rng.integers(len(universe)))]
        if candidate not in seen:
            seen.add(candidate)
            picked.append(candidate)
    return picked


# ---------------------------------------------------------------------------------------------
# Scoring


def ranks_from_scores(scores: np.ndarray, instances: Sequence[Instance]) -> list[int]:
    return [pessimistic_rank(row, inst.positive) for row, inst in zip(scores, instances, strict=True)]


def engine_ranks(reranker, instances: Sequence[Instance], template: str, chunk: int = 256) -> tuple[list[int], int]:
    """(rank of each target, number of requests the engine rejected) for one template."""
    from instructrec.engine import Request
    from instructrec.engine.formatting import CANDIDATES_PLACEHOLDER

    ranks, errors = [], 0
    for start in range(0, len(instances), chunk):
        part = instances[start:start + chunk]
        requests = [Request(instruction=inst.prompts[template], candidates=inst.titles,
                            candidate_ids=inst.candidate_ids, request_id=inst.key) for inst in part]
        for inst, result in zip(part, reranker.rank(requests, errors="return")):
            k = len(inst.candidate_ids)
            if result.error is not None:
                errors += 1
                log.debug("engine rejected %s: %s", inst.key, result.error)
                ranks.append(k + 1)
                continue
            if k > reranker.group_size and CANDIDATES_PLACEHOLDER in inst.prompts[template]:
                # Tournament: scores of different rounds are not comparable; the order is the ranking.
                by_id = {cid: -float(pos) for pos, cid in enumerate(result.ranked_ids)}
            else:
                by_id = dict(zip(result.ranked_ids, result.scores))
            ranks.append(pessimistic_rank([by_id[c] for c in inst.candidate_ids], inst.positive))
    if errors:
        log.warning("template %s: the engine rejected %d of %d requests; they count as misses",
                    template, errors, len(instances))
    return ranks, errors


def build_untuned(model_dir: Path, seed: int):
    """The tuned model's architecture with random weights (seeded): the zero-shot reference."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    config = T5Config.from_pretrained(model_dir)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval(), AutoTokenizer.from_pretrained(model_dir)


def _metrics(ranks: list[int]) -> dict:
    summary = summarize_ranks(ranks)
    return {"n": int(summary["n"]), **{k: summary[k] for k in METRIC_KEYS}}


# ---------------------------------------------------------------------------------------------
# Domains: prepared data, histories and fitted baselines


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


# ---------------------------------------------------------------------------------------------
# The run


def _training_targets(cfg: EvalConfig) -> tuple[set[str] | None, str | None]:
    """Item ids that are a target of some training row of the model, and where they came from."""
    import pyarrow.parquet as pq

    folder = cfg.train_instructions
    if folder is None and cfg.model is not None and (Path(cfg.model) / "training_config.json").is_file():
        folder = Path(json.loads((Path(cfg.model) / "training_config.json").read_text())["instructions"])
    if folder is None:
        return None, None
    path = Path(folder) / "train.parquet"
    if not path.is_file():
        raise InputError("train_instructions", f"{path} does not exist",
                         "pass --train-instructions DIR: the folder the model was trained on")
    table = pq.read_table(path, columns=["target_item_id"])
    return {i for i in table["target_item_id"].to_pylist() if i is not None}, str(path)


class Evaluation:
    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.scenarios = resolve_scenarios(cfg.scenarios)
        self.methods = resolve_methods(cfg.methods)
        if any(m in MODEL_METHODS for m in self.methods):
            if cfg.model is None or not (Path(cfg.model) / "config.json").is_file():
                raise InputError("model", f"{cfg.model} is not a checkpoint directory (no config.json)",
                                 "pass --model DIR written by `instructrec train`, or leave out the model methods")
        if any(s.cross_domain for s in self.scenarios) and (cfg.cross_data is None or cfg.cross_instructions is None):
            raise InputError("cross_data", "scenario cross-domain needs another domain's prepared data and instructions",
                             "pass --cross-data DIR --cross-instructions DIR (e.g. the Amazon 2023 sample)")
        self.main = Domain("main", cfg.data, cfg.instructions, cfg)
        self.cross = Domain("cross", cfg.cross_data, cfg.cross_instructions, cfg) \
            if any(s.cross_domain for s in self.scenarios) else None
        self._rerankers: dict[str, object] = {}
        self._valid_cache: dict[str, list[Instance]] = {}
        self._chosen: dict[tuple[str, str], tuple[str, dict]] = {}
        # "scenario:split" -> [[key, candidate ids], ...]: every list ranked, written beside the metrics.
        self.lists: dict[str, list] = {}
        self.fixed_lists: dict[str, list] | None = None
        if cfg.add_to is not None:
            path = Path(cfg.add_to) / "instances.json"
            if not path.is_file():
                raise InputError("add_to", f"{path} does not exist", "point --add-to at a folder written by "
                                 "`instructrec eval` (it holds metrics.json and instances.json)")
            self.fixed_lists = json.loads(path.read_text())

    def reranker(self, method: str):
        from instructrec.engine import Reranker

        if method not in self._rerankers:
            if method == "instructrec":
                self._rerankers[method] = Reranker.from_pretrained(self.cfg.model, dtype=self.cfg.dtype,
                                                                   seed=self.cfg.seed)
            else:
                model, tokenizer = build_untuned(Path(self.cfg.model), self.cfg.seed)
                self._rerankers[method] = Reranker.from_model(model, tokenizer, dtype=self.cfg.dtype,
                                                              seed=self.cfg.seed)
        return self._rerankers[method]

    def instances(self, scenario: Scenario, split: str, domain: Domain, n: int,
                  exclude_targets: set[str] | None) -> list[Instance]:
        found = load_instances(domain.instructions, split, scenario, domain.histories[split], domain.items,
                               exclude_targets if scenario.name == "product-search" else None)
        if not found:
            raise InputError("instructions", f"no {split} instances for scenario {scenario.name} in {domain.instructions}",
                             "rebuild the instructions with that scenario's templates")
        label = f"{scenario.name}:{split}"
        if self.fixed_lists is not None:
            if label not in self.fixed_lists:
                raise InputError("add_to", f"{self.cfg.add_to} has no instances of {label}",
                                 "evaluate the same scenarios as the run you add to")
            by_key = {inst.key: inst for inst in found}
            missing = [key for key, _ in self.fixed_lists[label] if key not in by_key]
            if missing:
                raise InputError("add_to", f"{len(missing)} instances of {label} in {self.cfg.add_to} are not in "
                                 f"{domain.instructions} (first {missing[0]!r})", "use the same --instructions")
            chosen = [with_candidate_list(by_key[key], ids, domain.titles) for key, ids in self.fixed_lists[label]]
            self.lists[label] = self.fixed_lists[label]
            return chosen
        chosen = self._new_instances(scenario, domain, sample(found, n, self.cfg.seed, label))
        self.lists[label] = [[inst.key, inst.candidate_ids] for inst in chosen]
        return chosen

    def _new_instances(self, scenario: Scenario, domain: Domain, picked: list[Instance]) -> list[Instance]:
        if scenario.candidates == "stored":
            return picked
        if scenario.candidates == "sampled":
            return [with_candidates(inst, sampled_negatives(inst, domain.universe, set(inst.history) | {
                inst.target} | domain.interacted(inst.key), 99, self.cfg.seed), domain.titles, self.cfg.seed)
                for inst in picked]
        from instructrec.training.baselines import retrieve_hard_negatives

        tower, _ = domain.fitted("two-tower")
        exclude = [domain.interacted(inst.key) | set(inst.history) | {inst.target} for inst in picked]
        negatives = retrieve_hard_negatives(tower, [inst.history for inst in picked], exclude, k=9)
        return [with_candidates(inst, neg, domain.titles, self.cfg.seed) for inst, neg in zip(picked, negatives)]

    def run(self, lists_path: Path | None = None) -> dict:
        """Draw every scenario's lists first (written to `lists_path` at once, so a later --add-to
        run can start before this one ends), then rank them with every method."""
        cfg = self.cfg
        seen_targets, seen_from = _training_targets(cfg)
        results: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
                         "product_search_unseen_check": seen_from, "scenarios": {}}
        tests = {}
        for scenario in self.scenarios:
            domain = self.cross if scenario.cross_domain else self.main
            n = cfg.max_instances_100 if scenario.candidates == "sampled" else cfg.max_instances
            tests[scenario.name] = test = self.instances(scenario, "test", domain, n, seen_targets)
            key = self._selection_key(scenario, domain)
            if len(test[0].prompts) > 1 and key not in self._valid_cache:
                # Drawn (and recorded) even without a model method, so a later --add-to run
                # chooses the template on these same validation lists.
                stored = replace(scenario, name=key, candidates="stored")
                self._valid_cache[key] = self.instances(stored, "valid", domain, cfg.valid_instances, seen_targets)
        if lists_path is not None:
            lists_path.parent.mkdir(parents=True, exist_ok=True)
            lists_path.write_text(json.dumps(self.lists) + "\n")
        for scenario in self.scenarios:
            domain = self.cross if scenario.cross_domain else self.main
            t0 = time.perf_counter()
            test = tests[scenario.name]
            entry = {"notation": scenario.notation, "title": scenario.title, "domain": domain.name,
                     "n_test": len(test), "candidates_per_list": len(test[0].candidate_ids),
                     "templates": sorted(test[0].prompts), "theirs": scenario.theirs, "methods": {}}
            log.info("scenario %s: %d test instances of %d candidates, templates %s", scenario.name, len(test),
                     entry["candidates_per_list"], ", ".join(entry["templates"]))
            for method in self.methods:
                if method in MODEL_METHODS:
                    entry["methods"][method] = self._model_method(method, scenario, domain, test, seen_targets)
                elif method in scenario.baselines:
                    m0 = time.perf_counter()
                    scores = baseline_scores(domain, method, scenario, test)
                    variant = "search" if method == "two-tower" and scenario.name == "product-search" else ""
                    entry["methods"][method] = dict(_metrics(ranks_from_scores(scores, test)),
                                                    seconds=round(time.perf_counter() - m0, 1),
                                                    fit=domain.fitted(method, variant)[1])
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            results["scenarios"][scenario.name] = entry
            log.info("scenario %s done in %.0fs: %s", scenario.name, entry["seconds"],
                     "; ".join(f"{m} HR@1 {v['hr@1']:.3f}" for m, v in entry["methods"].items()))
        results["datasets"] = {"main": _dataset_stats(self.main)}
        if self.cross is not None:
            results["datasets"]["cross"] = _dataset_stats(self.cross)
        results["model"] = _model_info(cfg.model) if cfg.model is not None else None
        return results

    @staticmethod
    def _selection_key(scenario: Scenario, domain: Domain) -> str:
        """Templates are chosen per instruction type and domain, on that type's validation
        instances with the stored lists: hard-negatives and candidates-100 reuse seq-rec's choice
        (the same <P1, I0, T3> templates), which saves ranking 100-candidate validation lists."""
        return f"{domain.name}:{scenario.preference}+{scenario.intention}"

    def _model_method(self, method: str, scenario: Scenario, domain: Domain, test: list[Instance],
                      seen_targets: set[str] | None) -> dict:
        reranker = self.reranker(method)
        t0 = time.perf_counter()
        templates = sorted(test[0].prompts)
        selection = {}
        if len(templates) > 1:
            key = self._selection_key(scenario, domain)
            if (method, key) not in self._chosen:
                for template in templates:
                    ranks, errors = engine_ranks(reranker, self._valid_cache[key], template)
                    selection[template] = dict(_metrics(ranks), errors=errors)
                # Highest validation NDCG@5; ties go to the first template id.
                self._chosen[method, key] = (max(templates, key=lambda t: (selection[t][SELECTION_METRIC],
                                                                           -templates.index(t))), selection)
            chosen, selection = self._chosen[method, key]
        else:
            chosen = templates[0]
        ranks, errors = engine_ranks(reranker, test, chosen)
        return dict(_metrics(ranks), errors=errors, template=chosen, valid_by_template=selection,
                    seconds=round(time.perf_counter() - t0, 1))


def _dataset_stats(domain: Domain) -> dict:
    s = domain.stats
    return {"data": str(domain.data), "users": s["users"], "items": s["items"], "interactions": s["interactions"],
            "sparsity": s.get("sparsity"), "avg_seq_len": s.get("avg_seq_len"), "splits": s.get("splits"),
            "search_splits": s.get("search_splits")}


def _model_info(model: Path) -> dict:
    model = Path(model)
    info: dict = {"path": str(model)}
    cfg_path = model / "training_config.json"
    if cfg_path.is_file():
        train_cfg = json.loads(cfg_path.read_text())
        info["training"] = {k: train_cfg.get(k) for k in (
            "model", "instructions", "optimizer", "lr", "batch_size", "max_steps", "max_minutes", "schedule",
            "warmup_steps", "resolved_precision", "threads", "max_source_length", "seed")}
    metrics_path = model / "metrics.jsonl"
    if metrics_path.is_file():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        if train:
            info["steps"] = train[-1]["step"]
            info["examples_seen"] = train[-1]["examples_seen"]
            info["train_step_seconds"] = round(sum(r["examples"] / r["examples_per_s"] for r in train), 1)
            info["final_train_loss"] = train[-1]["loss"]
        if evals:
            info["final_eval"] = evals[-1]
    config_path = model / "config.json"
    if config_path.is_file():
        c = json.loads(config_path.read_text())
        info["architecture"] = {k: c.get(k) for k in ("d_model", "d_ff", "num_layers", "num_decoder_layers",
                                                      "num_heads", "vocab_size")}
    return info


def evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluation; write OUT/metrics.json and OUT/results.md; return the metrics."""
    import torch

    previous = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        for name in ("max_instances", "max_instances_100", "valid_instances", "baseline_valid", "baseline_max_epochs"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(name, f"must be an integer >= 0, got {value!r}")
        out = Path(cfg.out)
        results = Evaluation(cfg).run(out / "instances.json")
    finally:
        torch.set_num_threads(previous)
    if cfg.add_to is not None:
        previous_metrics = Path(cfg.add_to) / "metrics.json"
        if not previous_metrics.is_file():
            (out / "metrics.own.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
            raise InputError("add_to", f"{previous_metrics} does not exist (has that run finished?); this run's "
                             f"metrics are in {out / 'metrics.own.json'}", "rerun once the other run has finished")
        results = merge_results(json.loads(previous_metrics.read_text()), results)
    (out / "metrics.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    return results


def merge_results(previous: dict, new: dict) -> dict:
    """`previous` with the methods of `new` added per scenario (same instances: checked by count)."""
    merged = json.loads(json.dumps(previous))
    for name, entry in new["scenarios"].items():
        if name not in merged["scenarios"]:
            merged["scenarios"][name] = entry
            continue
        old = merged["scenarios"][name]
        if old["n_test"] != entry["n_test"] or old["candidates_per_list"] != entry["candidates_per_list"]:
            raise InstructRecError(f"scenario {name}: the run added to ranked {old['n_test']} lists of "
                                   f"{old['candidates_per_list']}, this one {entry['n_test']} of "
                                   f"{entry['candidates_per_list']}")
        old["methods"].update(entry["methods"])
        old["seconds"] = round(old.get("seconds", 0) + entry.get("seconds", 0), 1)
    merged["runs"] = previous.get("runs", [previous["config"]]) + [new["config"]]
    if new.get("model"):
        merged["model"] = new["model"]
    return merged


# ---------------------------------------------------------------------------------------------
# Report


METHOD_LABELS = {"instructrec": "InstructRec (ours, tuned)", "zero-shot": "untuned (random init)",
                 "popularity": "Popularity", "sasrec": "SASRec", "bert4rec": "BERT4Rec",
                 "two-tower": "two-tower (DSSM-style)", "tem": "TEM"}


def results_markdown(results: dict) -> str:
    """Dataset statistics (the original's Table 5 columns), the model and baseline fits, and one
    table per scenario; the original's published HR@1 rows are marked as theirs, in italics."""
    lines = ["# Evaluation results", "", "## Datasets", "",
             "| dataset | #users | #items | #interactions | sparsity | avg. sequence |", "|---|---|---|---|---|---|"]
    for name, d in results.get("datasets", {}).items():
        sparsity = f"{100 * d['sparsity']:.3f}%" if d.get("sparsity") is not None else ""
        avg = f"{d['avg_seq_len']:.2f}" if d.get("avg_seq_len") is not None else ""
        lines.append(f"| {name}: `{d['data']}` | {d['users']:,} | {d['items']:,} | {d['interactions']:,} | "
                     f"{sparsity} | {avg} |")
    model = results.get("model") or {}
    if model:
        arch, training = model.get("architecture") or {}, model.get("training") or {}
        lines += ["", "## Model", "",
                  f"- `{model['path']}`: T5 d_model {arch.get('d_model')}, d_ff {arch.get('d_ff')}, "
                  f"{arch.get('num_layers')}+{arch.get('num_decoder_layers')} layers, {arch.get('num_heads')} heads"]
        if training:
            lines.append(f"- trained from `{training.get('model')}` on `{training.get('instructions')}`: "
                         f"{model.get('steps')} steps x {training.get('batch_size')} rows "
                         f"({model.get('examples_seen')} examples), {training.get('optimizer')} lr {training.get('lr')}, "
                         f"{training.get('resolved_precision')}, {model.get('train_step_seconds')} s of steps")
    fits = {}
    for entry in results["scenarios"].values():
        for method, m in entry["methods"].items():
            if "fit" in m:
                fits.setdefault((entry["domain"], method, m["fit"].get("config", {}).get("kind", "")), m["fit"])
    if fits:
        lines += ["", "## Baseline fits", "", "| domain | method | best epoch | valid metric | train s |", "|---|---|---|---|---|"]
        for (domain, method, kind), f in sorted(fits.items()):
            valid = f"{f['metric']} {f['best_valid']:.4f}" if f.get("best_valid") is not None else ""
            label = f"{method} ({kind})" if kind else method
            lines.append(f"| {domain} | {label} | {f['best_epoch']} | {valid} | {f['train_seconds']} |")
    for name, entry in results["scenarios"].items():
        lines += ["", f"## {name} {entry['notation']}: {entry['title']}", "",
                  f"{entry['n_test']} test instances of {entry['candidates_per_list']} candidates "
                  f"({entry['domain']} domain); templates: {', '.join(entry['templates'])}.", "",
                  "| method | HR@1 | HR@3 | HR@5 | NDCG@3 | NDCG@5 | template | errors |",
                  "|---|---|---|---|---|---|---|---|"]
        for method, m in entry["methods"].items():
            lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(f"{m[k]:.4f}" for k in METRIC_KEYS)
                         + f" | {m.get('template', '')} | {m.get('errors', '')} |")
        for method, value in entry.get("theirs", {}).items():
            label = "InstructRec (Flan-T5-XL 3B)" if method == "instructrec" else METHOD_LABELS.get(method, method)
            lines.append(f"| *theirs: {label}* | *{value:.4f}* | | | | | | |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The evaluated model's training folder


def parse_instruction_type(text: str) -> tuple[str, str]:
    """'P2+I1' -> ('P2', 'I1'); 'P1+P2+I1' -> ('P1+P2', 'I1')."""
    pref, sep, intent = text.rpartition("+")
    if not sep or not pref.startswith("P") or not re.fullmatch(r"I[0-2]", intent):
        raise InputError("hold_out", f"{text!r} is not PREFERENCE+INTENTION", "write e.g. P2+I1 or P1+I1")
    return pref, intent


def restrict_training_set(instructions: Path, prepared: Path, out: Path, hold_out: str | None) -> dict:
    """A training folder for the evaluated model: train.parquet without (a) the rows of the held-out
    instruction type `hold_out` (all task forms) and (b) the rows whose target is a product-search
    valid/test item, so product search is evaluated on items the model never generated in training
    (the build makes only product-search train rows follow the item split). valid/test link back."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    train = pq.read_table(Path(instructions) / "train.parquet")
    splits = pq.read_table(Path(prepared) / "search_splits.parquet")
    held_items = pc.filter(splits["item_id"], pc.not_equal(splits["split"], "train"))
    keep = pc.invert(pc.fill_null(pc.is_in(train["target_item_id"], value_set=held_items), False))
    report = {"rows_in": train.num_rows,
              "dropped_search_eval_targets": train.num_rows - pc.sum(keep).as_py()}
    if hold_out:
        pref, intent = parse_instruction_type(hold_out)
        held = pc.and_(pc.equal(train["preference"], pref), pc.equal(train["intention"], intent))
        report["held_out"] = hold_out
        report["dropped_held_out"] = pc.sum(pc.and_(held, keep)).as_py()
        keep = pc.and_(keep, pc.invert(held))
    kept = train.filter(keep)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(kept, out / "train.parquet")
    for name in ("valid.parquet", "test.parquet"):
        link = out / name
        if not link.exists():
            link.symlink_to((Path(instructions) / name).resolve())
    report["rows_out"] = kept.num_rows
    (out / "restrict.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
