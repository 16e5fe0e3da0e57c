"""Instruction datasets: prepared interactions + an annotator + the template registry -> Parquet.

`build_instructions(data_dir, out_dir, annotator=...)` writes `train.parquet`, `valid.parquet`,
`test.parquet`, `stats.json` and `stats.md` (a report shaped like Table 2 of the original work).

Which rows are made
- Train, user rows (recommendation and personalized-search templates): per user, `per_user`
  targets drawn (seeded) from the user's TRAIN interactions that have at least one train
  interaction before them; the history is the train items before the target (newest 20 kept).
  Nothing of the user's valid or test interactions is ever read for these rows: not as target,
  history, review, negative or annotation input. Each target gets one template, drawn (seeded)
  among the selected templates that its data can fill.
- Train, product-search rows (P0 templates; `user_id` null): one per item of the search-train
  split (`search_per_item`), its vague intention drawn from a TRAIN-split review of the item.
- Valid / test, user rows: one row per (user, evaluation template), with the candidate list the
  data layer stored in candidates.parquet, in its stored order, so every method ranks the same
  lists. The history is everything the user did before the target (for test: train + valid).
- Valid / test, product-search rows: one per (item of that search split, evaluation template),
  target plus `negatives` items sampled (seeded) from the rest of the catalog, one list per
  item shared by all its templates. The data layer stores no per-item lists, so these lists are
  stored here, in the rows' `candidate_ids`.
- Evaluation templates: those of `DEFAULT_EVAL_TEMPLATE_IDS` that are selected (else every
  selected template whose target is the title and whose source needs only request fields).

Targets are made by the templates (`engine.formatting.render_template`): the title (T2/T3),
"Yes"/"No" (T0; exactly balanced per split, the "No" item a sampled negative), the preferred
title (T1), the swapped field (turn-around: the intention or preference for a given item, or the
latest past item) or a reasoning sentence ending with the title (chain-of-thought).

`candidates` / `candidate_ids` hold the items a row is about: the listed candidates for T3 (also
for valid/test T2 rows, which are scored over the same stored list), the one asked-about item for
T0, the two options for T1 (in the order shown), and null for train rows of other forms.
`target_item_id` is always the user's true item (for a T0 "No" row the asked item differs).

Token budget: with a tokenizer each source is fitted to `max_source_tokens` by dropping the
oldest history items; rows that cannot fit (listed candidates alone too long) are skipped,
counted under `skipped` in the report and logged. Without a tokenizer only the 20-item history
cap applies. Everything random draws from numpy SeedSequence streams keyed by (seed, purpose,
user or item), so a user's rows do not depend on which other users are built.

Where things live: this module makes the rows (which rows, their annotation and rendering);
build_tables.py reads the prepared directory; build_stats.py writes the report's figures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from instructrec.engine.errors import InputError, InstructRecError
from instructrec.engine.templates import (
    MAX_HISTORY_ITEMS,
    REGISTRY,
    Intention,
    Scenario,
    TaskForm,
    Template,
    get_template,
)

from .annotation import Annotator, ItemView, has_sentence
from .build_stats import split_stats, stats_markdown
from .build_tables import SPLITS, ItemRecord, PathLike, PreparedTables, load_tables

log = logging.getLogger(__name__)

DEFAULT_PER_USER = 4
DEFAULT_SEARCH_PER_ITEM = 1
DEFAULT_NEGATIVES = 9  # as the data layer: 1 positive + 9 sampled negatives
DEFAULT_MAX_SOURCE_TOKENS = 512
# Two templates per instruction type the reference results are reported on (sequential
# recommendation from the history, personalized search with a vague and with a specific
# intention, product search with each intention): one that lists the candidates (T3, the
# original's) and the engine's default for the type (T2: no list, each candidate's title scored as
# the answer). `instructrec eval` chooses between them per model on validation.
DEFAULT_EVAL_TEMPLATE_IDS = ("seq-rec-02", "pers-search-07", "pers-search-08", "prod-search-03", "prod-search-04",
                             "seq-rec-01", "pers-search-01", "pers-search-02", "prod-search-01", "prod-search-02")

# Separate random streams: adding a new random step never changes an existing one's draws.
_STREAM_USER_SAMPLE, _STREAM_TRAIN, _STREAM_SEARCH, _STREAM_EVAL_SEARCH, _STREAM_T0 = 11, 12, 13, 14, 15

OUTPUT_COLUMNS = (
    "instruction", "target", "template", "preference", "intention", "task", "strategy", "scenario",
    "split", "user_id", "target_item_id", "candidates", "candidate_ids", "annotator",
)


def output_schema():
    import pyarrow as pa

    text = pa.string()
    return pa.schema([
        ("instruction", text), ("target", text), ("template", text), ("preference", text),
        ("intention", text), ("task", text), ("strategy", text), ("scenario", text), ("split", text),
        ("user_id", text), ("target_item_id", text), ("candidates", pa.list_(text)),
        ("candidate_ids", pa.list_(text)), ("annotator", text),
    ])


# ---- seeded randomness ------------------------------------------------------------------------


def _key_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def _rng(seed: int, stream: int, key: str = "") -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream, _key_int(key)]))


def _sample_negatives(rng: np.random.Generator, universe: Sequence[str], excluded: set[str], count: int) -> list[str]:
    """`count` distinct items of `universe` (sorted ids) outside `excluded`; fewer only when the
    catalog has fewer such items."""
    if 2 * len(excluded) >= len(universe):
        # Most of the catalog is excluded: draw from the explicit remainder.
        pool = [item for item in universe if item not in excluded]
        take = min(count, len(pool))
        return [pool[i] for i in rng.choice(len(pool), size=take, replace=False).tolist()] if take else []
    chosen: list[str] = []
    taken: set[str] = set()
    # Rejection sampling: at least half the catalog is free, so each negative costs ~2 draws;
    # the loop is bounded all the same.
    for _ in range(100 * count + 100):
        if len(chosen) == count:
            break
        item = universe[int(rng.integers(len(universe)))]
        if item not in excluded and item not in taken:
            chosen.append(item)
            taken.add(item)
    return chosen


# ---- row specifications -----------------------------------------------------------------------


@dataclass
class RowSpec:
    """One instruction to make, before annotation and rendering."""

    template: Template
    split: str
    user_id: str | None
    target: str  # item id
    history: list[str]  # item ids, oldest first, at most MAX_HISTORY_ITEMS
    review: str | None  # the review of the target this row's I1 comes from
    timestamp: int | None
    # Items the row lists or asks about (T3 list, T0 item, T1 pair), in the order shown.
    shown: list[str] | None = None
    label: bool | None = None  # T0 only
    preference_key: tuple | None = None
    intention_key: tuple | None = None


def _needs(template: Template) -> frozenset[str]:
    """Every slot a template reads, in its source or its target."""
    needs = _NEEDS.get(template.id)
    if needs is None:
        needs = _NEEDS[template.id] = frozenset(template.slots) | frozenset(template.target_slots)
    return needs


_NEEDS: dict[str, frozenset[str]] = {}


def _needs_preference(template: Template) -> bool:
    return "preference" in _needs(template)


def _needs_intention(template: Template) -> bool:
    return "intention" in _needs(template)


def _feasible(template: Template, target: ItemRecord, specific: str, has_history: bool) -> bool:
    """Whether this target's data fills every slot of `template`."""
    needs = _needs(template)
    if ("history" in needs or "preference" in needs) and not has_history:
        return False
    if (template.intention is Intention.SPECIFIC or "target_categories" in needs) and not specific:
        return False
    return bool(target.title.strip())


def _is_eval_template(template: Template) -> bool:
    return template.ranks_titles


def resolve_templates(templates: Iterable[str] | str | None) -> list[Template]:
    if templates is None or templates == "all":
        return list(REGISTRY.values())
    if isinstance(templates, str):
        templates = [name.strip() for name in templates.split(",") if name.strip()]
    chosen = [get_template(name) for name in dict.fromkeys(templates)]
    if not chosen:
        raise InputError("templates", "no template selected", "give template ids separated by commas, or 'all'")
    return chosen


def resolve_eval_templates(selected: list[Template], eval_templates: Iterable[str] | str | None) -> list[Template]:
    if eval_templates is not None:
        chosen = resolve_templates(eval_templates)
        bad = [t.id for t in chosen if not _is_eval_template(t)]
        if bad:
            raise InputError("eval_templates", f"{bad} cannot rank candidates (target is not the title, or the "
                             "source needs training-only slots)", "choose templates whose ranks_titles is true "
                             "(instructrec instructions templates)")
        return chosen
    selected_ids = {t.id for t in selected}
    defaults = [REGISTRY[i] for i in DEFAULT_EVAL_TEMPLATE_IDS if i in selected_ids]
    return defaults or [t for t in selected if _is_eval_template(t)]


class _Builder:
    def __init__(self, tables: PreparedTables, annotator: Annotator, *, templates: list[Template],
                 eval_templates: list[Template], per_user: int, search_per_item: int, seed: int,
                 negatives: int, max_users: int | None, max_items: int | None):
        self.tables = tables
        self.annotator = annotator
        self.seed = seed
        self.per_user = per_user
        self.search_per_item = search_per_item
        self.negatives = negatives
        self.user_templates = sorted((t for t in templates if t.scenario is not Scenario.PRODUCT_SEARCH), key=lambda t: t.id)
        self.search_templates = sorted((t for t in templates if t.scenario is Scenario.PRODUCT_SEARCH), key=lambda t: t.id)
        self.eval_user_templates = [t for t in eval_templates if t.scenario is not Scenario.PRODUCT_SEARCH]
        self.eval_search_templates = [t for t in eval_templates if t.scenario is Scenario.PRODUCT_SEARCH]
        self._specific_cache: dict[str, str] = {}
        self._reviews_cache: dict[bool, dict] = {}
        # Train user rows always have a history; feasibility then depends only on whether the
        # target has category labels (I2) and a title.
        probe = ItemRecord("", "probe", (), None, None)
        self._user_options = {
            has_specific: [t for t in self.user_templates if _feasible(t, probe, "x" if has_specific else "", True)]
            for has_specific in (False, True)}
        self.users = self._choose(sorted(tables.sequences), max_users, "users")
        self.user_set = set(self.users)
        self.search_items = {split: self._choose(sorted(i for i, s in tables.search_split.items()
                                                        if s == split and i in tables.items), max_items, split)
                             for split in SPLITS}
        self.skipped: Counter[str] = Counter()

    def _choose(self, names: list[str], limit: int | None, what: str) -> list[str]:
        if limit is None or limit >= len(names):
            return names
        rng = _rng(self.seed, _STREAM_USER_SAMPLE, what)
        picked = sorted(rng.choice(len(names), size=limit, replace=False).tolist())
        return [names[i] for i in picked]

    def specific(self, item_id: str) -> str:
        value = self._specific_cache.get(item_id)
        if value is None:
            record = self.tables.items[item_id]
            value = self.annotator.specific_intention(_view(record)).strip()
            self._specific_cache[item_id] = value
        return value

    # -- train, user rows -------------------------------------------------------------------
    def train_user_specs(self, progress: bool) -> list[RowSpec]:
        specs: list[RowSpec] = []
        if not self.user_templates or self.per_user == 0:
            return specs
        for user in _progress(self.users, progress, "train users"):
            train = [i for i in self.tables.sequences[user] if i.split == "train"]
            eligible = list(range(1, len(train)))
            if not eligible:
                self.skipped["train_user_without_history"] += 1
                continue
            rng = _rng(self.seed, _STREAM_TRAIN, user)
            if self.per_user <= len(eligible):
                picks = sorted(rng.choice(eligible, size=self.per_user, replace=False).tolist())
            else:  # more rows than targets: every target once, the rest drawn again (other templates)
                extra = rng.choice(eligible, size=self.per_user - len(eligible), replace=True).tolist()
                picks = sorted(eligible + extra)
            seen = {i.item_id for i in self.tables.sequences[user]}  # all splits: never a negative
            for index in picks:
                target = train[index]
                record = self.tables.items[target.item_id]
                options = self._user_options[bool(self.specific(target.item_id))] if record.title.strip() else []
                if not options:
                    self.skipped["train_target_without_feasible_template"] += 1
                    continue
                template = options[int(rng.integers(len(options)))]
                history = [i.item_id for i in train[max(0, index - MAX_HISTORY_ITEMS):index]]
                spec = RowSpec(template, "train", user, target.item_id, history, target.review, target.timestamp)
                self._add_shown(spec, rng, seen)
                specs.append(spec)
        return specs

    def _add_shown(self, spec: RowSpec, rng: np.random.Generator, excluded: set[str]) -> None:
        task = spec.template.task
        if task is TaskForm.RERANKING:
            shown = _sample_negatives(rng, self.tables.item_ids, excluded | {spec.target}, self.negatives)
            shown.insert(int(rng.integers(len(shown) + 1)), spec.target)
            spec.shown = shown
        elif task is TaskForm.PAIRWISE:
            negative = _sample_negatives(rng, self.tables.item_ids, excluded | {spec.target}, 1)
            if not negative:
                raise InputError("data", "the catalog has no item outside a user's history to pair with",
                                 "prepare more items")
            spec.shown = [spec.target, negative[0]] if rng.integers(2) == 0 else [negative[0], spec.target]
        elif task is TaskForm.POINTWISE:
            # The asked item is decided once labels are balanced (see _balance_pointwise); draw the
            # negative now so the draws of one user stay in that user's stream.
            negative = _sample_negatives(rng, self.tables.item_ids, excluded | {spec.target}, 1)
            spec.shown = [spec.target] + negative

    # -- product search rows ----------------------------------------------------------------
    def search_specs(self, split: str, progress: bool) -> list[RowSpec]:
        templates = self.search_templates if split == "train" else self.eval_search_templates
        if not templates or (split == "train" and self.search_per_item == 0):
            return []
        reviews = self._item_reviews(train_only=(split == "train"))
        specs: list[RowSpec] = []
        for item_id in _progress(self.search_items[split], progress, f"{split} search items"):
            record = self.tables.items[item_id]
            specific = self.specific(item_id)
            review, stamp = reviews.get(item_id, (None, None))
            stream = _STREAM_SEARCH if split == "train" else _STREAM_EVAL_SEARCH
            rng = _rng(self.seed, stream, f"{split}:{item_id}")
            feasible = [t for t in templates if _feasible(t, record, specific, False)
                        and not ("context" in t.slots and stamp is None)]
            if not feasible:
                self.skipped[f"{split}_search_item_without_feasible_template"] += 1
                continue
            if split == "train":
                chosen = [feasible[int(rng.integers(len(feasible)))] for _ in range(self.search_per_item)]
                for template in chosen:
                    spec = RowSpec(template, split, None, item_id, [], review, stamp)
                    self._add_shown(spec, rng, {item_id})
                    specs.append(spec)
                continue
            # One candidate list per evaluated item, shared by all its templates (listed in T3,
            # stored with T2): evaluation compares templates and methods on the same list.
            shown = _sample_negatives(rng, self.tables.item_ids, {item_id}, self.negatives)
            shown.insert(int(rng.integers(len(shown) + 1)), item_id)
            for template in feasible:
                specs.append(RowSpec(template, split, None, item_id, [], review, stamp, shown=list(shown)))
        return specs

    def _item_reviews(self, *, train_only: bool) -> dict[str, tuple[str | None, int]]:
        """Per item, the earliest review that has a sentence to draw from (train-split ones only
        for training rows) and its time; items without one get (None, time of their earliest
        interaction) and their intention comes from the metadata."""
        if train_only not in self._reviews_cache:
            self._reviews_cache[train_only] = self._collect_item_reviews(train_only)
        return self._reviews_cache[train_only]

    def _collect_item_reviews(self, train_only: bool) -> dict[str, tuple[str | None, int]]:
        best: dict[str, tuple[int, str, str | None, int]] = {}
        for user, sequence in self.tables.sequences.items():
            for interaction in sequence:
                if train_only and interaction.split != "train":
                    continue
                # A review with a sentence of three words or more says something; "Ok" does not.
                has_text = has_sentence(interaction.review)
                # Rank: a review that says something first, then earliest, then user id (ties).
                rank = (0 if has_text else 1, interaction.timestamp, user)
                current = best.get(interaction.item_id)
                if current is None or rank < current[0]:
                    best[interaction.item_id] = (rank, user, interaction.review if has_text else None,
                                                 interaction.timestamp)
        return {item: (review, stamp) for item, (_, _, review, stamp) in best.items()}

    # -- valid / test user rows -------------------------------------------------------------
    def eval_user_specs(self, split: str, progress: bool) -> list[RowSpec]:
        if not self.eval_user_templates:
            return []
        specs: list[RowSpec] = []
        rows = sorted((r for r in self.tables.candidates if r[1] == split and r[0] in self.user_set),
                      key=lambda r: r[0])
        for user, _, target_id, candidate_ids in _progress(rows, progress, f"{split} users"):
            sequence = self.tables.sequences.get(user, [])
            target = next((i for i in sequence if i.split == split), None)
            if target is None or target.item_id != target_id:
                raise InputError("data", f"candidates.parquet gives {split} target {target_id!r} for user {user!r}, "
                                 f"but interactions.parquet has {target.item_id if target else None!r}",
                                 "rebuild the directory with `instructrec data prepare`")
            candidate_ids = list(candidate_ids)
            if target_id not in candidate_ids:
                raise InputError("data", f"the stored {split} candidates of user {user!r} lack the target",
                                 "rebuild the directory with `instructrec data prepare`")
            before = [i for i in sequence if i.position < target.position]
            history = [i.item_id for i in before[-MAX_HISTORY_ITEMS:]]
            record = self.tables.items[target_id]
            for template in self.eval_user_templates:
                if not _feasible(template, record, self.specific(target_id), bool(history)):
                    self.skipped[f"{split}_user_template_not_fillable"] += 1
                    continue
                specs.append(RowSpec(template, split, user, target_id, history, target.review, target.timestamp,
                                     shown=candidate_ids))
        return specs

    # -- labels, annotation, rendering ---------------------------------------------------------
    def balance_pointwise(self, specs: list[RowSpec], split: str) -> None:
        """Exactly half the T0 rows (one more "Yes" when odd) ask about the true item."""
        pointwise = [s for s in specs if s.template.task is TaskForm.POINTWISE]
        if not pointwise:
            return
        n_yes = math.ceil(len(pointwise) / 2)
        labels = np.array([True] * n_yes + [False] * (len(pointwise) - n_yes))
        labels = labels[_rng(self.seed, _STREAM_T0, split).permutation(len(labels))]
        for spec, label in zip(pointwise, labels.tolist()):
            if not label and len(spec.shown or ()) < 2:
                label = True  # no negative could be drawn; recorded below
                self.skipped["pointwise_without_negative_kept_as_yes"] += 1
            spec.label = label
            spec.shown = [spec.target] if label else [spec.shown[1]]

    def annotate(self, specs: list[RowSpec], progress: bool) -> tuple[dict, dict]:
        preference_requests: dict[tuple, list[ItemView]] = {}
        intention_requests: dict[tuple, tuple[ItemView, str | None]] = {}
        for spec in specs:
            if _needs_preference(spec.template):
                spec.preference_key = (spec.user_id, tuple(spec.history))
                if spec.preference_key not in preference_requests:
                    preference_requests[spec.preference_key] = self._history_views(spec)
            if _needs_intention(spec.template) and spec.template.intention is Intention.VAGUE:
                spec.intention_key = (spec.target, spec.review)
                if spec.intention_key not in intention_requests:
                    intention_requests[spec.intention_key] = (_view(self.tables.items[spec.target]), spec.review)
        started = time.perf_counter()
        self.annotator.fit_catalog([_view(record) for record in self.tables.items.values()])
        keys = list(preference_requests)
        preferences = dict(zip(keys, self.annotator.explicit_preferences([preference_requests[k] for k in keys])))
        keys = list(intention_requests)
        intentions = dict(zip(keys, self.annotator.vague_intentions([intention_requests[k] for k in keys])))
        log.info("annotated %d preferences and %d vague intentions with %s in %.1fs", len(preferences),
                 len(intentions), self.annotator.name, time.perf_counter() - started)
        return ({k: _phrase(v, "preference") for k, v in preferences.items()},
                {k: _phrase(v, "intention") for k, v in intentions.items()})

    def _history_views(self, spec: RowSpec) -> list[ItemView]:
        reviews = {}
        if spec.user_id is not None:
            reviews = {i.item_id: i.review for i in self.tables.sequences[spec.user_id]}
        return [_view(self.tables.items[item_id], reviews.get(item_id)) for item_id in spec.history]

    def slots(self, spec: RowSpec, preferences: dict, intentions: dict) -> dict[str, Any]:
        items = self.tables.items
        slots: dict[str, Any] = {"target_title": items[spec.target].title}
        if spec.history:
            slots["history"] = [items[i].title for i in spec.history]
        if spec.preference_key is not None:
            slots["preference"] = preferences[spec.preference_key]
        if spec.template.intention is Intention.VAGUE and spec.intention_key is not None:
            slots["intention"] = intentions[spec.intention_key]
        elif spec.template.intention is Intention.SPECIFIC:
            slots["intention"] = self.specific(spec.target)
        if "target_categories" in _needs(spec.template):
            slots["target_categories"] = self.specific(spec.target)
        if spec.timestamp is not None:
            slots["context"] = describe_time(spec.timestamp)
        task = spec.template.task
        if task is TaskForm.RERANKING or (spec.shown and task is TaskForm.MATCHING):
            slots["candidates"] = [items[i].title for i in spec.shown]
        elif task is TaskForm.PAIRWISE:
            slots["item_a"], slots["item_b"] = (items[i].title for i in spec.shown)
        elif task is TaskForm.POINTWISE:
            slots["item"] = items[spec.shown[0]].title
            slots["label"] = bool(spec.label)
        return slots


def describe_time(timestamp: int) -> str:
    """The situation a timestamp gives: weekday and month (UTC), e.g. "shopping on a Saturday in December"."""
    moment = datetime.fromtimestamp(int(timestamp), tz=timezone.utc)
    return f"shopping on a {moment:%A} in {moment:%B}"


def _phrase(text: str, what: str) -> str:
    cleaned = " ".join(str(text).split()).rstrip(" .")
    if not cleaned:
        raise InstructRecError(f"the annotator returned an empty {what}")
    return cleaned


def _view(record: ItemRecord, review: str | None = None) -> ItemView:
    return ItemView(item_id=record.item_id, title=record.title, categories=record.categories, brand=record.brand,
                    description=record.description, review=review)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="", leave=False)


# ---- entry point --------------------------------------------------------------------------------


def _load_tokenizer(tokenizer):
    """A folder or Hub id through the engine's one loader; a loaded tokenizer (or None) as it is."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from instructrec.engine.loading import load_tokenizer

    return load_tokenizer(tokenizer)


def _row_specs(builder: _Builder, progress: bool) -> dict[str, list[RowSpec]]:
    """The rows to make, per split, with balanced T0 labels (before annotation and rendering)."""
    specs_by_split: dict[str, list[RowSpec]] = {
        "train": builder.train_user_specs(progress) + builder.search_specs("train", progress)}
    for split in ("valid", "test"):
        specs_by_split[split] = builder.eval_user_specs(split, progress) + builder.search_specs(split, progress)
    for split, specs in specs_by_split.items():
        builder.balance_pointwise(specs, split)
    return specs_by_split


def _render_split(builder: _Builder, specs: list[RowSpec], split: str, preferences: dict, intentions: dict,
                  token_counter, max_source_tokens: int, skip_examples: dict[str, str],
                  progress: bool) -> dict[str, list]:
    """The output columns of one split. A row whose source cannot fit the token budget is
    skipped and counted in `builder.skipped` (its first message kept in `skip_examples`)."""
    from instructrec.engine.formatting import render_template

    items = builder.tables.items
    columns: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
    for spec in _progress(specs, progress, f"render {split}"):
        template = spec.template
        try:
            rendered = render_template(template, builder.slots(spec, preferences, intentions),
                                       tokenizer=token_counter, max_source_tokens=max_source_tokens)
        except InputError as exc:
            reason = f"{split}_{exc.kind}_{exc.field}"
            builder.skipped[reason] += 1
            skip_examples.setdefault(reason, str(exc))
            continue
        if rendered.target is None:
            raise InstructRecError(f"template {template.id} made no target for {spec.target}: a builder bug")
        listed = spec.shown  # T3/T1/T0 items shown; valid/test: the list scored; else None
        columns["instruction"].append(rendered.source)
        columns["target"].append(rendered.target)
        columns["template"].append(template.id)
        columns["preference"].append(template.preference.value)
        columns["intention"].append(template.intention.value)
        columns["task"].append(template.task.value)
        columns["strategy"].append(template.strategy.value)
        columns["scenario"].append(template.scenario.value)
        columns["split"].append(split)
        columns["user_id"].append(spec.user_id)
        columns["target_item_id"].append(spec.target)
        columns["candidate_ids"].append(list(listed) if listed else None)
        columns["candidates"].append([items[i].title for i in listed] if listed else None)
        columns["annotator"].append(builder.annotator.name)
    return columns


def build_instructions(data_dir: PathLike, out_dir: PathLike, *, annotator: Annotator,
                       templates: Iterable[str] | str | None = None, eval_templates: Iterable[str] | str | None = None,
                       per_user: int = DEFAULT_PER_USER, search_per_item: int = DEFAULT_SEARCH_PER_ITEM,
                       seed: int = 0, tokenizer=None, max_source_tokens: int = DEFAULT_MAX_SOURCE_TOKENS,
                       negatives: int | None = None, max_users: int | None = None, max_items: int | None = None,
                       progress: bool = False) -> dict:
    """Build the instruction dataset of a prepared directory into `out_dir`; returns the report
    (also written as stats.json, and as a Table-2 style stats.md).

    `templates`: ids (list or comma-separated) or None/"all" for training rows; `eval_templates`
    for valid/test rows (default: see module doc). `tokenizer`: a tokenizer or its directory
    (a checkpoint dir works); None applies no token budget. `negatives`: sampled negatives per
    listed candidate set (default: as in the stored candidate lists, else 9). `max_users` /
    `max_items`: a seeded subset of users / search items per split, for quick builds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, value, low in (("per_user", per_user, 0), ("search_per_item", search_per_item, 0),
                             ("max_users", max_users, 1), ("max_items", max_items, 1), ("negatives", negatives, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise InputError(name, f"must be an integer >= {low}, got {value!r}")
    if not isinstance(annotator, Annotator):
        raise InputError("annotator", f"must be an Annotator, got {type(annotator).__name__}",
                         "use OfflineAnnotator() or TeacherAnnotator(...)")
    started = time.perf_counter()
    selected = resolve_templates(templates)
    evaluated = resolve_eval_templates(selected, eval_templates)
    tables = load_tables(data_dir)
    if negatives is None:
        lengths = Counter(len(c[3]) for c in tables.candidates)
        negatives = (lengths.most_common(1)[0][0] - 1) if lengths else DEFAULT_NEGATIVES
        negatives = max(negatives, 1)
    token_counter = _load_tokenizer(tokenizer)
    if token_counter is None:
        log.warning("no tokenizer given: sources are not fitted to %d tokens (only the %d-item history cap); "
                    "pass --tokenizer CHECKPOINT_DIR to fit them", max_source_tokens, MAX_HISTORY_ITEMS)

    builder = _Builder(tables, annotator, templates=selected, eval_templates=evaluated, per_user=per_user,
                       search_per_item=search_per_item, seed=seed, negatives=negatives, max_users=max_users,
                       max_items=max_items)
    specs_by_split = _row_specs(builder, progress)
    all_specs = [spec for split in SPLITS for spec in specs_by_split[split]]
    preferences, intentions = builder.annotate(all_specs, progress)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    schema = output_schema()
    report_splits = {}
    skip_examples: dict[str, str] = {}
    for split in SPLITS:
        columns = _render_split(builder, specs_by_split[split], split, preferences, intentions, token_counter,
                                max_source_tokens, skip_examples, progress)
        pq.write_table(pa.table(columns, schema=schema), out / f"{split}.parquet")
        report_splits[split] = split_stats(columns)

    skipped = dict(sorted(builder.skipped.items()))
    if skipped:
        log.warning("instruction rows skipped: %s", ", ".join(f"{k}={v}" for k, v in skipped.items()))
        for reason, example in skip_examples.items():
            log.warning("e.g. %s: %s", reason, example)
    report = {
        "data_dir": str(data_dir), "out_dir": str(out), "annotator": annotator.name, "seed": seed,
        "per_user": per_user, "search_per_item": search_per_item, "negatives": negatives,
        "max_users": max_users, "max_items": max_items,
        "token_budget": max_source_tokens if token_counter is not None else None,
        "templates": [t.id for t in selected], "eval_templates": [t.id for t in evaluated],
        "rows": {split: report_splits[split]["instructions"] for split in SPLITS},
        "splits": report_splits, "skipped": skipped, "skip_examples": skip_examples,
        "annotations": {"preferences": len(preferences), "vague_intentions": len(intentions)},
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / "stats.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "stats.md").write_text(stats_markdown(report), encoding="utf-8")
    return report
