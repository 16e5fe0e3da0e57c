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

Where things live: this module holds the run (EvalConfig, Evaluation, evaluate) and the scoring
through the engine; eval_scenarios.py the scenarios, methods and instances; eval_domain.py the
prepared data of a domain and its baselines; eval_report.py results.md and merging runs;
eval_train_set.py the evaluated model's training folder. The names tests and users import are
re-exported here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from instructrec.engine.errors import InputError

from .eval_domain import Domain, baseline_scores
from .eval_report import dataset_stats, merge_results, model_info, results_markdown
from .eval_scenarios import (
    BASELINE_METHODS, METHODS, METRIC_KEYS, MODEL_METHODS, SCENARIOS, SELECTION_METRIC, Instance, Scenario,
    load_instances, read_slot, resolve_methods, resolve_scenarios, sample, sampled_negatives, with_candidate_list,
    with_candidates)
from .eval_train_set import parse_instruction_type, restrict_training_set
from .metrics import pessimistic_rank, summarize_ranks

__all__ = [
    "BASELINE_METHODS", "METHODS", "MODEL_METHODS", "SCENARIOS", "EvalConfig", "Evaluation", "Instance", "Scenario",
    "engine_ranks", "evaluate", "load_instances", "merge_results", "parse_instruction_type", "ranks_from_scores",
    "read_slot", "resolve_methods", "resolve_scenarios", "restrict_training_set", "results_markdown",
    "with_candidate_list",
]

log = logging.getLogger(__name__)


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
        results["datasets"] = {"main": dataset_stats(self.main)}
        if self.cross is not None:
            results["datasets"]["cross"] = dataset_stats(self.cross)
        results["model"] = model_info(cfg.model) if cfg.model is not None else None
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
