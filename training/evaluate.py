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
random-init model here). A scenario ranks with its type's templates that rank a list: T3 (the
candidates listed in the instruction) and T2 (no list; each candidate's title scored as the
answer). Each candidate's score is its title's log-likelihood (`sum`, the paper's) or that per
title token (`mean`, the engine's length-normalised score). Each model method picks one template
and score form among those (`score_forms`) by NDCG@5 (the original's rule for templates; `select_by`
names another metric) on a seeded sample of that type's validation instances with the stored
lists. Hard negatives choose on validation instances whose lists are retrieved the same way (the
two-tower's top 9): popularity is strong on those lists, so the form that wins on stored lists
need not win there.
Candidates-100 chooses on validation instances with 99 sampled negatives, as its test lists: a
form that wins among 10 candidates need not win among 100 (the calibrated forms lift rare titles).
`instructrec+popularity` is a hybrid reported beside the model: the tuned model's scores of its
chosen template and form fused with the candidates' training popularity (`with_popularity`), the
weight chosen on the same validation lists.
With `combine_templates`, the choices also hold every sum of two or more of the scenario's
templates ("seq-rec-01+seq-rec-02": each template's scores standardised within the list, then
summed, as `--ensemble` sums models), listed after the single templates so that a tie keeps one.

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

from instructrec.engine.errors import InputError, ModelLoadError
from instructrec.engine.fusion import fuse_priors, standardised
from instructrec.engine.sources import CHECKPOINT, RANDOM, ModelSource, resolve_model
from instructrec.engine.types import PRIORS_SUFFIX, parse_score_form

from .eval_domain import Domain, baseline_scores
from .eval_report import dataset_stats, merge_results, model_info, results_markdown
from .eval_scenarios import (
    BASELINE_METHODS, FUSED_METHOD, METHODS, METRIC_KEYS, MODEL_METHODS, POPULARITY_WEIGHTS, SCENARIOS, SCORE_FORMS,
    SELECTION_METRIC, TUNED_METHODS, Instance,
    Scenario, has_rows, load_instances, read_slot, resolve_methods, resolve_scenarios, sample, sampled_negatives,
    templates_of, with_candidate_list, with_candidates, with_request_fields)
from .eval_train_set import parse_instruction_type, restrict_training_set
from .metrics import pessimistic_rank, summarize_ranks

__all__ = [
    "BASELINE_METHODS", "METHODS", "MODEL_METHODS", "SCENARIOS", "EvalConfig", "Evaluation", "Instance", "Scenario",
    "engine_ranks", "engine_ranks_by_form", "engine_scores_by_form", "evaluate", "load_instances", "merge_results", "parse_instruction_type", "ranks_from_scores",
    "read_slot", "resolve_methods", "resolve_scenarios", "restrict_training_set", "results_markdown",
    "standardised", "with_candidate_list", "with_popularity",
]

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    data: Path  # prepared directory of the main domain
    instructions: Path  # its instruction folder (valid/test with the scenarios' T2/T3 templates)
    # The tuned model (needed by the model methods): a checkpoint folder, a Hub id (`revision`), or
    # random:<shape> (zero-shot only, with `tokenizer`); resolved by engine.sources.resolve_model.
    model: str | Path | None
    out: Path
    scenarios: tuple[str, ...] = ("all",)
    methods: tuple[str, ...] = ("all",)
    train_instructions: Path | None = None  # the model's train.parquet folder (default: its training_config.json)
    cross_data: Path | None = None
    cross_instructions: Path | None = None
    max_instances: int = 1000  # test instances per scenario (0: all)
    max_instances_100: int = 300  # for candidates-100
    valid_instances: int = 200  # validation instances per template for the template choice
    valid_instances_100: int | None = None  # for candidates-100's lists of 100 (None: valid_instances)
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
    revision: str | None = None  # of a Hub id `model`: branch, tag or commit
    tokenizer: Path | None = None  # for a random:<shape> model, which brings none
    # The candidate score forms each model method chooses between on validation (Reranker.rank's
    # `normalize`): "sum" (the title's log-likelihood) and "mean" (per title token).
    score_forms: tuple[str, ...] = SCORE_FORMS
    # Further trained checkpoints (folders or Hub ids, one tokenizer with `model`) whose scores the
    # tuned methods sum with the model's, each standardised per list: an ensemble Reranker
    # (engine/reranker.py), e.g. seeds of one recipe.
    ensemble: tuple[str | Path, ...] = ()
    # The validation metric that chooses each model method's template and form and the hybrid's
    # popularity weight (one of METRIC_KEYS): NDCG@5 is the original's rule; HR@1 chooses for the
    # first position, which a reranker's top slot is judged on.
    select_by: str = SELECTION_METRIC
    # Also choose between sums of two or more of a scenario's templates (each template's scores
    # standardised within the list, as an ensemble's models are): one model read through several
    # wordings of the same instruction. Validation costs nothing more (every template is scored
    # there anyway); a chosen sum costs one scoring pass per summed template on test.
    combine_templates: bool = False


# ---------------------------------------------------------------------------------------------
# Scoring


def ranks_from_scores(scores: np.ndarray, instances: Sequence[Instance]) -> list[int]:
    return [pessimistic_rank(row, inst.positive) for row, inst in zip(scores, instances, strict=True)]


def engine_ranks(reranker, instances: Sequence[Instance], template: str, chunk: int = 256,
                 normalize: str = "sum") -> tuple[list[int], int]:
    """(rank of each target, number of requests the engine rejected) for one template and score form."""
    return engine_ranks_by_form(reranker, instances, template, (normalize,), chunk)[normalize]


def engine_ranks_by_form(reranker, instances: Sequence[Instance], template: str, forms: Sequence[str],
                         chunk: int = 256) -> dict[str, tuple[list[int], int]]:
    """engine_ranks for several score forms, each list scored once for all of them
    (Reranker.rank_forms): {form: (ranks, rejected requests)}."""
    return {form: (ranks_of(scores, instances), errors)
            for form, (scores, errors) in engine_scores_by_form(reranker, instances, template, forms, chunk).items()}


def ranks_of(scores: Sequence[np.ndarray | None], instances: Sequence[Instance]) -> list[int]:
    """The target's rank in each list; a list without scores (the engine rejected it) is a miss, K+1."""
    return [len(inst.candidate_ids) + 1 if row is None else pessimistic_rank(row, inst.positive)
            for row, inst in zip(scores, instances, strict=True)]


def engine_scores_by_form(reranker, instances: Sequence[Instance], template: str, forms: Sequence[str],
                          chunk: int = 256) -> dict[str, tuple[list[np.ndarray | None], int]]:
    """{form: (each instance's candidate scores in its candidate_ids order, or None where the engine
    rejected the request; the number rejected)}, each list scored once for every form
    (Reranker.rank_forms). After a grouped tournament the scores of different rounds are not
    comparable, so a candidate's score there is minus its position in the ranking."""
    from instructrec.engine import Request
    from instructrec.engine.formatting import CANDIDATES_PLACEHOLDER

    out: dict[str, tuple[list[np.ndarray | None], int]] = {form: ([], 0) for form in forms}
    for start in range(0, len(instances), chunk):
        part = instances[start:start + chunk]
        requests = [Request(**inst.request_fields(template), candidates=inst.titles,
                            candidate_ids=inst.candidate_ids, request_id=inst.key) for inst in part]
        by_form = reranker.rank_forms(requests, list(forms), errors="return")
        for form in forms:
            rows, errors = out[form]
            for inst, result in zip(part, by_form[form], strict=True):
                if result.error is not None:
                    errors += 1
                    log.debug("engine rejected %s: %s", inst.key, result.error)
                    rows.append(None)
                    continue
                if len(inst.candidate_ids) > reranker.group_size and CANDIDATES_PLACEHOLDER in inst.prompts[template]:
                    by_id = {cid: -float(pos) for pos, cid in enumerate(result.ranked_ids)}
                else:
                    by_id = dict(zip(result.ranked_ids, result.scores))
                rows.append(np.array([by_id[c] for c in inst.candidate_ids], dtype=np.float64))
            out[form] = (rows, errors)
    for form, (_, errors) in out.items():
        if errors:
            log.warning("template %s, score %s: the engine rejected %d of %d requests; they count as misses",
                        template, form, errors, len(instances))
    return out


TEMPLATE_SUM = "+"  # joins the templates of a summed choice: "seq-rec-01+seq-rec-02"


def template_sums(templates: Sequence[str]) -> list[str]:
    """Every sum of two or more of `templates` (combine_templates), smaller sums first, each in the
    templates' order: a, b, c -> a+b, a+c, b+c, a+b+c."""
    from itertools import combinations

    for template in templates:
        if TEMPLATE_SUM in template:
            raise ValueError(f"template id {template!r} holds {TEMPLATE_SUM!r}, which joins summed templates")
    return [TEMPLATE_SUM.join(group) for size in range(2, len(templates) + 1)
            for group in combinations(templates, size)]


def summed_standardised(per_template: Sequence[Sequence[np.ndarray | None]]) -> list[np.ndarray | None]:
    """Each list's scores under several templates, each standardised within the list and summed;
    None (a miss) where any template's request was rejected."""
    return [None if any(row is None for row in rows) else sum(standardised(row) for row in rows)
            for rows in zip(*per_template, strict=True)]


def with_popularity(scores: Sequence[np.ndarray | None], counts: np.ndarray, weight: float) -> list[np.ndarray | None]:
    """Each list's model scores fused with its candidates' training interaction counts by the
    engine's own fusion (engine/fusion.py: standardised(score) + weight x standardised(log(1 +
    count)), within the list), so that the weight chosen here is the V of the batch job's
    `--normalize FORM+priors:V` with candidate_priors = log(1 + count). One weight serves the sum,
    mean and calibrated forms and a tournament's -positions alike. Weight 0 ranks as the model
    alone; a large weight as popularity, ties broken by the model."""
    if weight < 0 or not np.isfinite(weight):
        raise ValueError(f"popularity weight must be finite and >= 0, got {weight!r}")
    return [None if row is None else fuse_priors(row, np.log1p(count), weight)
            for row, count in zip(scores, counts, strict=True)]


def build_untuned(source: ModelSource, tokenizer: Path | None, seed: int):
    """The model's architecture with random weights (seeded): the zero-shot reference. The
    tokenizer is the checkpoint's, or `tokenizer` for a random:<shape> source."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from instructrec.engine.loading import load_tokenizer

    config = T5Config.from_dict(source.config())
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval(), load_tokenizer(tokenizer or source.path)


def _metrics(ranks: list[int]) -> dict:
    summary = summarize_ranks(ranks)
    return {"n": int(summary["n"]), **{k: summary[k] for k in METRIC_KEYS}}


def _test_metrics(ranks: list[int]) -> dict:
    """A method's test entry: its metrics and the target's rank in every list, in the order of
    instances.json, so that any two methods (also of runs merged with --add-to) can be compared
    list by list (eval_report: paired differences)."""
    return dict(_metrics(ranks), ranks=[int(r) for r in ranks])


# ---------------------------------------------------------------------------------------------
# Checks made before any data is loaded


def resolve_eval_model(cfg: EvalConfig, methods: list[str]) -> ModelSource | None:
    """The model of the run (None when no --model is given and no model method needs one)."""
    needs_model = any(m in MODEL_METHODS for m in methods)
    fix = ("pass --model DIR written by `instructrec train`, a Hub id such as google/flan-t5-base, or "
           "random:<shape> with --tokenizer DIR (zero-shot only); or leave out the model methods")
    if cfg.model is None:
        if needs_model:
            raise InputError("model", f"methods {', '.join(m for m in methods if m in MODEL_METHODS)} need a model", fix)
        return None
    try:
        source = resolve_model(cfg.model, revision=cfg.revision, allowed=(CHECKPOINT, RANDOM))
    except ModelLoadError as exc:
        raise InputError("model", f"{cfg.model} is not a checkpoint directory ({exc})", fix) from exc
    if source.is_random:
        if any(m in TUNED_METHODS for m in methods):
            raise InputError("model", f"{source.spec} has random weights, so it can only be the zero-shot reference",
                             "pass --methods zero-shot (with baselines if wanted), or a trained checkpoint or Hub "
                             "id for the instructrec method")
        if "zero-shot" in methods and cfg.tokenizer is None:
            raise InputError("tokenizer", f"{source.spec} brings no tokenizer",
                             "pass --tokenizer DIR, e.g. ../shared/assets/flan-t5-tokenizer")
        if cfg.tokenizer is not None and not Path(cfg.tokenizer).is_dir():
            raise InputError("tokenizer", f"{cfg.tokenizer} is not a directory",
                             "pass a tokenizer or checkpoint folder, e.g. ../shared/assets/flan-t5-tokenizer")
    elif cfg.tokenizer is not None:
        raise InputError("tokenizer", f"given with {source.describe()}, which has a tokenizer of its own",
                         "drop --tokenizer (it is for random:<shape> models)")
    return source


def resolve_ensemble(cfg: EvalConfig, methods: list[str], source: ModelSource | None) -> list[ModelSource]:
    """The further models of an ensemble (cfg.ensemble), each a trained checkpoint."""
    if not cfg.ensemble:
        return []
    if not any(m in TUNED_METHODS for m in methods):
        raise InputError("ensemble", f"given, but none of the methods {', '.join(methods)} ranks with the tuned model",
                         f"add one of {', '.join(TUNED_METHODS)} to --methods, or drop --ensemble")
    if source is None or source.is_random:
        raise InputError("ensemble", "an ensemble sums trained models with --model, which is not one",
                         "pass --model DIR written by `instructrec train`")
    out = []
    for n, model in enumerate(cfg.ensemble):
        try:
            member = resolve_model(model, allowed=(CHECKPOINT, RANDOM))
        except (ModelLoadError, InputError) as exc:  # resolve_model names its argument "model"
            raise InputError(f"ensemble[{n}]", f"{model} is not a checkpoint directory ({exc})",
                             "pass a folder written by `instructrec train` (or a Hub id)") from exc
        if member.is_random:
            raise InputError(f"ensemble[{n}]", f"{member.spec} has random weights",
                             "ensemble trained checkpoints only")
        out.append(member)
    return out


def check_inputs(cfg: EvalConfig, scenarios: list[Scenario]) -> None:
    """Every folder and instruction type the scenarios need, checked at once from the instruction
    files' small columns, so a run that cannot finish says what is missing in its first seconds
    instead of after loading the data (an InputError naming each missing piece and the fix)."""
    import pyarrow.parquet as pq

    for directory, flag in ((cfg.data, "data"), (cfg.instructions, "instructions")):
        if directory is None or not (Path(directory) / ("stats.json" if flag == "data" else "test.parquet")).is_file():
            raise InputError(flag, f"{directory} is not a folder written by `instructrec "
                             f"{'data prepare' if flag == 'data' else 'instructions build'}`",
                             "run `instructrec data prepare` and `instructrec instructions build` first")
    problems: list[tuple[str, str]] = []
    cross = [s for s in scenarios if s.cross_domain]
    if cross and (cfg.cross_data is None or cfg.cross_instructions is None):
        problems.append(("cross_data", "scenario cross-domain needs another domain's prepared data and instructions: "
                                       "pass --cross-data DIR --cross-instructions DIR (e.g. the Amazon 2023 sample)"))
    folders = [(cfg.instructions, [s for s in scenarios if not s.cross_domain])]
    if cross and cfg.cross_instructions is not None:
        folders.append((cfg.cross_instructions, cross))
    for folder, wanted in folders:
        path = Path(folder) / "test.parquet"
        if not path.is_file():
            problems.append(("cross_instructions", f"{path} does not exist"))
            continue
        table = pq.read_table(path, columns=["preference", "intention", "task"])
        missing = [s for s in wanted if not has_rows(table, s)]
        if missing:
            problems.append(("instructions", f"{path} has no reranking rows of "
                             + ", ".join(f"{s.notation} (scenario {s.name})" for s in missing) + ": "
                             + _rebuild_hint(Path(folder), missing)))
    if problems:
        field_name = problems[0][0] if len(problems) == 1 else "scenario"
        raise InputError(field_name, "; ".join(problem for _, problem in problems),
                         "or leave those scenarios out: --scenario NAME, repeatable")


def _rebuild_hint(folder: Path, missing: list[Scenario]) -> str:
    """The instruction build that adds the missing types: the folder's own --eval-templates (from
    its stats.json) plus the templates of each missing type."""
    built: list[str] = []
    stats = folder / "stats.json"
    if stats.is_file():
        built = list(json.loads(stats.read_text()).get("eval_templates") or [])
    wanted = list(dict.fromkeys(built + [t for s in missing for t in templates_of(s)]))
    return (f"rebuild it with `instructrec instructions build --eval-templates {','.join(wanted)}` "
            "(and the folder's other build flags)")


# ---------------------------------------------------------------------------------------------
# The run


def _training_targets(cfg: EvalConfig, sources: Sequence[ModelSource | None]) -> tuple[set[str] | None, str | None]:
    """Item ids that are a target of some training row of the models (an ensemble's: of any of
    them), and where they came from (the train.parquet paths, comma-separated)."""
    import pyarrow.parquet as pq

    folders: list[Path] = []
    if cfg.train_instructions is not None:
        folders.append(Path(cfg.train_instructions))
    else:
        for source in sources:
            record = source.path / "training_config.json" if source is not None and source.path is not None else None
            if record is not None and record.is_file():
                folder = Path(json.loads(record.read_text())["instructions"])
                if folder not in folders:
                    folders.append(folder)
    if not folders:
        return None, None
    targets: set[str] = set()
    for folder in folders:
        path = folder / "train.parquet"
        if not path.is_file():
            raise InputError("train_instructions", f"{path} does not exist",
                             "pass --train-instructions DIR: the folder the model was trained on")
        table = pq.read_table(path, columns=["target_item_id"])
        targets.update(i for i in table["target_item_id"].to_pylist() if i is not None)
    return targets, ", ".join(str(f / "train.parquet") for f in folders)


class Evaluation:
    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.scenarios = resolve_scenarios(cfg.scenarios)
        self.methods = resolve_methods(cfg.methods)
        self.source = resolve_eval_model(cfg, self.methods)
        self.ensemble = resolve_ensemble(cfg, self.methods, self.source)
        check_inputs(cfg, self.scenarios)
        self.main = Domain("main", cfg.data, cfg.instructions, cfg)
        self.cross = Domain("cross", cfg.cross_data, cfg.cross_instructions, cfg) \
            if any(s.cross_domain for s in self.scenarios) else None
        self._rerankers: dict[str, object] = {}
        # "scenario:split" -> (instances dropped because their target is a training target, found).
        self.dropped: dict[str, tuple[int, int]] = {}
        self._seen_from: str | None = None
        self._valid_cache: dict[str, list[Instance]] = {}
        self._chosen: dict[tuple[str, str], tuple[str, dict]] = {}
        # (model, list key, template, form) -> engine_scores_by_form's (scores, errors): the fused
        # method reuses the tuned model's scores of the same lists instead of ranking them again.
        self._scores: dict[tuple[str, str, str, str], tuple[list, int]] = {}
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

        method = "instructrec" if method in TUNED_METHODS else method  # the fused method shares its model
        if method not in self._rerankers:
            if method == "instructrec":
                self._rerankers[method] = Reranker.from_pretrained(
                    [self.source, *self.ensemble], backend="torch", dtype=self.cfg.dtype, seed=self.cfg.seed)
            else:
                model, tokenizer = build_untuned(self.source, self.cfg.tokenizer, self.cfg.seed)
                self._rerankers[method] = Reranker.from_model(model, tokenizer, dtype=self.cfg.dtype,
                                                              seed=self.cfg.seed)
        return self._rerankers[method]

    def instances(self, scenario: Scenario, split: str, domain: Domain, n: int,
                  exclude_targets: set[str] | None) -> list[Instance]:
        found = load_instances(domain.instructions, split, scenario, domain.histories[split], domain.items)
        if scenario.name == "product-search" and exclude_targets is not None:
            found = self._unseen_targets(found, exclude_targets, f"{scenario.name}:{split}", domain)
        if not found:
            raise InputError("instructions", f"no {split} instances for scenario {scenario.name} in {domain.instructions}",
                             "rebuild the instructions with that scenario's templates")
        label = f"{scenario.name}:{split}"
        recorded = self.fixed_lists is not None and label in self.fixed_lists
        if self.fixed_lists is not None and not recorded:
            if split != "valid":
                raise InputError("add_to", f"{self.cfg.add_to} has no instances of {label}",
                                 "evaluate the same scenarios as the run you add to")
            # Validation lists only choose a model method's template and form (no baseline ranks
            # them): a run recorded before hard negatives had their own, or one that had nothing to
            # choose, gets them drawn here.
            log.warning("%s has no validation lists %s (an older version or a run with nothing to choose did not "
                        "record them): drawing them in this run, as that run would have", self.cfg.add_to, label)
        if recorded:
            by_key = {inst.key: inst for inst in found}
            missing = [key for key, _ in self.fixed_lists[label] if key not in by_key]
            if missing:
                raise InputError("add_to", f"{len(missing)} instances of {label} in {self.cfg.add_to} are not in "
                                 f"{domain.instructions} (first {missing[0]!r})", "use the same --instructions")
            chosen = [with_candidate_list(by_key[key], ids, domain.titles) for key, ids in self.fixed_lists[label]]
            self.lists[label] = self.fixed_lists[label]
        else:
            chosen = self._new_instances(scenario, domain, sample(found, n, self.cfg.seed, label))
            self.lists[label] = [[inst.key, inst.candidate_ids] for inst in chosen]
        # Rendered from their fields, so the engine fits each history to the model's own budget.
        return [with_request_fields(inst, domain.titles) for inst in chosen]

    def _unseen_targets(self, found: list[Instance], seen: set[str], label: str, domain: Domain) -> list[Instance]:
        """Product search is about items the model never generated in training: the instances whose
        target is a training target are dropped, counted, and announced with the fix."""
        kept = [inst for inst in found if inst.target not in seen]
        dropped = len(found) - len(kept)
        self.dropped[label] = (dropped, len(found))
        if dropped:
            trained_on = Path(self._seen_from).parent if self._seen_from else "TRAIN_INSTRUCTIONS"
            fix = (f"train the model on `instructrec eval-train-set --instructions {trained_on} --data {domain.data} "
                   "--out DIR` (it removes those training rows; add --hold-out P2+I1 for the held-out scenario)")
            if not kept:
                raise InputError("train_instructions", f"all {len(found)} {label} instances have a target the model "
                                 f"was trained to generate ({self._seen_from})", fix)
            log.warning("%s: %d of %d instances DROPPED because their target is a training target of the model "
                        "(%s); the scenario runs on the %d left. To evaluate all of them, %s", label, dropped,
                        len(found), self._seen_from, len(kept), fix)
        return kept

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
        seen_targets, seen_from = _training_targets(cfg, [self.source, *self.ensemble])
        self._seen_from = seen_from
        results: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
                         "product_search_unseen_check": seen_from, "scenarios": {}}
        tests = {}
        for scenario in self.scenarios:
            domain = self.cross if scenario.cross_domain else self.main
            n = cfg.max_instances_100 if scenario.candidates == "sampled" else cfg.max_instances
            tests[scenario.name] = test = self.instances(scenario, "test", domain, n, seen_targets)
            key = self._selection_key(scenario, domain)
            choosing = len(test[0].prompts) * len(cfg.score_forms) > 1 or FUSED_METHOD in self.methods
            if choosing and key not in self._valid_cache:
                # Drawn as the test lists are (stored, retrieved or sampled), so the choice is made
                # on lists of the kind it ranks; recorded even without a model method, so a later
                # --add-to run chooses on these same lists.
                listed = replace(scenario, name=key)
                n_valid = cfg.valid_instances
                if scenario.candidates == "sampled" and cfg.valid_instances_100 is not None:
                    n_valid = cfg.valid_instances_100
                self._valid_cache[key] = self.instances(listed, "valid", domain, n_valid, seen_targets)
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
            dropped, _ = self.dropped.get(f"{scenario.name}:test", (0, 0))
            if dropped:
                entry["dropped_training_targets"] = dropped
            log.info("scenario %s: %d test instances of %d candidates, templates %s", scenario.name, len(test),
                     entry["candidates_per_list"], ", ".join(entry["templates"]))
            for method in self.methods:
                if method in MODEL_METHODS:
                    entry["methods"][method] = self._model_method(method, scenario, domain, test, seen_targets)
                elif method in scenario.baselines:
                    m0 = time.perf_counter()
                    scores = baseline_scores(domain, method, scenario, test)
                    variant = "search" if method == "two-tower" and scenario.name == "product-search" else ""
                    entry["methods"][method] = dict(_test_metrics(ranks_from_scores(scores, test)),
                                                    seconds=round(time.perf_counter() - m0, 1),
                                                    fit=domain.fitted(method, variant)[1])
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            results["scenarios"][scenario.name] = entry
            log.info("scenario %s done in %.0fs: %s", scenario.name, entry["seconds"],
                     "; ".join(f"{m} HR@1 {v['hr@1']:.3f}" for m, v in entry["methods"].items()))
        results["datasets"] = {"main": dataset_stats(self.main)}
        if self.cross is not None:
            results["datasets"]["cross"] = dataset_stats(self.cross)
        results["model"] = model_info(self.source, cfg.tokenizer) if self.source is not None else None
        if self.ensemble:
            results["model"]["ensemble"] = [model_info(member) for member in self.ensemble]
        return results

    @staticmethod
    def _selection_key(scenario: Scenario, domain: Domain) -> str:
        """Templates are chosen per instruction type and domain, on that type's validation
        instances with the stored lists; hard negatives and candidates-100 on validation instances
        whose lists are retrieved (hard) or sampled (99 negatives) as their test lists are, under
        keys of their own: a form that ranks 10 stored candidates best need not rank 100 best
        (the calibrated forms lift rare titles, and 100 random candidates hold many)."""
        key = f"{domain.name}:{scenario.preference}+{scenario.intention}"
        return key if scenario.candidates == "stored" else f"{key}:{scenario.candidates}"

    def _model_method(self, method: str, scenario: Scenario, domain: Domain, test: list[Instance],
                      seen_targets: set[str] | None) -> dict:
        t0 = time.perf_counter()
        model = "instructrec" if method in TUNED_METHODS else method
        key = self._selection_key(scenario, domain)
        (chosen, form), selection = self._choice(model, key, sorted(test[0].prompts))
        scores, errors = self._model_scores(model, scenario.name, test, chosen, form)
        entry = dict(template=chosen, normalize=form, valid_by_choice=selection, selected_by=self.cfg.select_by)
        if method == FUSED_METHOD:
            valid = self._valid_cache[key]
            valid_scores, _ = self._model_scores(model, key, valid, chosen, form)
            valid_counts = baseline_scores(domain, "popularity", scenario, valid)
            by_weight = {str(w): _metrics(ranks_of(with_popularity(valid_scores, valid_counts, w), valid))
                         for w in POPULARITY_WEIGHTS}
            # Highest validation --select-by metric; max keeps the first of a tie: the smallest weight.
            weight = max(POPULARITY_WEIGHTS, key=lambda w: by_weight[str(w)][self.cfg.select_by])
            scores = with_popularity(scores, baseline_scores(domain, "popularity", scenario, test), weight)
            # The batch job's --normalize serving this hybrid, with candidate_priors = log(1 + the
            # item's training interactions) (docs/evaluation.md).
            entry.update(popularity_weight=weight, valid_by_popularity_weight=by_weight,
                         job_normalize=f"{form}{PRIORS_SUFFIX}{weight:g}" if weight else form)
        return dict(_test_metrics(ranks_of(scores, test)), errors=errors, **entry,
                    seconds=round(time.perf_counter() - t0, 1))

    def _choice(self, model: str, key: str, templates: list[str]) -> tuple[tuple[str, str], dict]:
        """((template, score form), validation metrics of every choice) for `model` on the instruction
        type `key`: the highest validation --select-by metric (default NDCG@5); with a single choice,
        that one (no metrics)."""
        if self.cfg.combine_templates:
            templates = [*templates, *template_sums(templates)]
        choices = [(template, form) for template in templates for form in self.cfg.score_forms]
        if len(choices) == 1:
            return choices[0], {}
        if (model, key) not in self._chosen:
            selection = {}
            for template in templates:  # one scoring pass per template serves every form
                for form in self.cfg.score_forms:
                    scores, errors = self._model_scores(model, key, self._valid_cache[key], template, form,
                                                        every_form=True)
                    selection[f"{template} {form}"] = dict(_metrics(ranks_of(scores, self._valid_cache[key])),
                                                           errors=errors)
            # max keeps the first of a tie: the first template id, then form.
            best = max(choices, key=lambda choice: selection[" ".join(choice)][self.cfg.select_by])
            self._chosen[model, key] = (best, selection)
        return self._chosen[model, key]

    def _model_scores(self, model: str, lists: str, instances: list[Instance], template: str,
                      form: str, every_form: bool = False) -> tuple[list, int]:
        """engine_scores_by_form of `model` on the lists named `lists` (a scenario's test lists or a
        selection key's validation lists), kept. With `every_form`, the pass scores every --score-forms
        form at once (validation, where all are compared); else only `form` (a test list's choice:
        the calibrated forms cost a second decoding)."""
        if (model, lists, template, form) not in self._scores and TEMPLATE_SUM in template:
            parts = [self._model_scores(model, lists, instances, part, form, every_form)
                     for part in template.split(TEMPLATE_SUM)]
            summed = summed_standardised([scores for scores, _ in parts])
            self._scores[model, lists, template, form] = (summed, sum(row is None for row in summed))
        if (model, lists, template, form) not in self._scores:
            forms = self.cfg.score_forms if every_form else (form,)
            by_form = engine_scores_by_form(self.reranker(model), instances, template, forms)
            for each, result in by_form.items():
                self._scores[model, lists, template, each] = result
        return self._scores[model, lists, template, form]


def evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluation; write OUT/metrics.json and OUT/results.md; return the metrics."""
    for name in ("max_instances", "max_instances_100", "valid_instances", "valid_instances_100", "baseline_valid",
                 "baseline_max_epochs"):
        value = getattr(cfg, name)
        if name == "valid_instances_100" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(name, f"must be an integer >= 0, got {value!r}")
    if cfg.select_by not in METRIC_KEYS:
        raise InputError("select_by", f"unknown metric {cfg.select_by!r}", f"use one of: {', '.join(METRIC_KEYS)}")
    forms = cfg.score_forms
    if isinstance(forms, str) or not forms or len(set(forms)) < len(forms):
        raise InputError("score_forms", f"must be one or more distinct of {', '.join(SCORE_FORMS)} or calibrated:W, "
                         f"got {forms!r}",
                         "e.g. --score-forms sum,mean,calibrated (chosen between on validation) or --score-forms sum")
    for form in forms:
        parse_score_form(form, field="score_forms")
    out = Path(cfg.out)
    evaluation = Evaluation(cfg)  # checks every input, then loads the data
    import torch

    previous = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        results = evaluation.run(out / "instances.json")
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
