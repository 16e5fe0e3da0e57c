"""What `instructrec eval` evaluates: the scenarios (each an instruction type, a candidate mode and
the baselines that apply), the methods, and the instances of a scenario read back from an
instruction folder's valid/test rows, with the candidate lists every method ranks.

See training/evaluate.py for how a run uses them.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from instructrec.engine.errors import InputError, InstructRecError
from instructrec.engine.types import NORMALIZE_CHOICES

log = logging.getLogger(__name__)

# "instructrec+popularity": the tuned model's score fused with the candidate's training popularity
# (evaluate.with_popularity; the weight chosen on validation), a hybrid reported beside the model.
FUSED_METHOD = "instructrec+popularity"
MODEL_METHODS = ("instructrec", "zero-shot", FUSED_METHOD)
# The methods that rank with the tuned checkpoint (a random:<shape> model can only be zero-shot).
TUNED_METHODS = ("instructrec", FUSED_METHOD)
BASELINE_METHODS = ("popularity", "sasrec", "bert4rec", "two-tower", "tem")
METHODS = MODEL_METHODS + BASELINE_METHODS
CANDIDATE_MODES = ("stored", "hard", "sampled")
# Task forms whose instructions rank a candidate list: T3 lists the candidates in the source; T2
# asks for the item without a list, and each candidate's title is scored as the answer. Where a
# scenario's rows hold both, each model method chooses on validation (a model trained for minutes
# from random weights ranks far better without the list: docs/results.md, "The ranking template").
RANKING_TASKS = ("T2", "T3")
METRIC_KEYS = ("hr@1", "hr@3", "hr@5", "ndcg@3", "ndcg@5")
SELECTION_METRIC = "ndcg@5"
# The popularity weights FUSED_METHOD chooses between on validation (0: the model alone).
POPULARITY_WEIGHTS = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
# A candidate's score: its title's log-likelihood ("sum"), that per title token ("mean"), or that
# minus the title's prior ("calibrated", or "calibrated:W" for W times it): the engine's
# `normalize` values. A sum favours short titles, so the form is chosen on validation; these are
# the default choices.
SCORE_FORMS = NORMALIZE_CHOICES


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
    # A list swapped in (hard negatives, an --add-to folder's lists): per listed template, the
    # structured request fields its instruction was rendered from, so that the engine renders it
    # with the new list and fits the history to the model's own budget (dropping the oldest titles,
    # as the build did for the stored list) instead of refusing a free instruction that overflows.
    fields: dict[str, dict] = field(default_factory=dict)

    @property
    def positive(self) -> int:
        return self.candidate_ids.index(self.target)

    def request_fields(self, template: str) -> dict:
        """The Request fields stating the need with `template` (the candidates are added apart)."""
        return self.fields.get(template) or {"instruction": self.prompts[template]}


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


def read_slots(template_id: str, instruction: str) -> dict[str, str] | None:
    """Every slot value of an instruction rendered by `template_id`; None if it does not read back."""
    from instructrec.engine.templates import REGISTRY

    match = _slot_pattern(REGISTRY[template_id].source).fullmatch(instruction)
    return None if match is None else match.groupdict()


def read_slot(template_id: str, instruction: str, slot: str) -> str:
    """The value of `slot` in an instruction rendered by `template_id` (e.g. the vague intention)."""
    values = read_slots(template_id, instruction)
    if values is None or slot not in values:
        raise InstructRecError(f"cannot read {slot!r} back from an instruction of template {template_id}")
    return values[slot]


def templates_of(scenario: Scenario) -> list[str]:
    """The templates an instruction build needs in --eval-templates for the scenario to be
    evaluated: the registry's reranking (T3) templates of its instruction type, then the engine's
    default (T2) template of that type, which ranks without listing the candidates."""
    from instructrec.engine.templates import REGISTRY, Intention, Preference, default_template

    listed = [t.id for t in REGISTRY.values() if t.ranks_titles and t.preference.value == scenario.preference
              and t.intention.value == scenario.intention and t.task.value == "T3"]
    return listed + [default_template(Preference(scenario.preference), Intention(scenario.intention), False).id]


def _ranking_rows(table, scenario: Scenario):
    """The mask of `table`'s rows (columns preference, intention, task) that rank a candidate
    list for the scenario's instruction type."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.and_(pc.and_(pc.equal(table["preference"], scenario.preference),
                           pc.equal(table["intention"], scenario.intention)),
                   pc.is_in(table["task"], value_set=pa.array(RANKING_TASKS)))


def has_rows(table, scenario: Scenario) -> bool:
    """Whether `table` (columns preference, intention, task) holds ranking rows of the scenario."""
    import pyarrow.compute as pc

    return pc.any(_ranking_rows(table, scenario)).as_py() is True


def scenario_templates(instructions: Path, split: str, scenario: Scenario) -> list[str]:
    import pyarrow.parquet as pq

    from instructrec.engine.templates import REGISTRY

    path = Path(instructions) / f"{split}.parquet"
    if not path.is_file():
        raise InputError("instructions", f"{path} does not exist",
                         "point --instructions at a folder written by `instructrec instructions build`")
    table = pq.read_table(path, columns=["template", "preference", "intention", "task"])
    # A T2 template whose answer is not the item's title (the diversity strategies) cannot score one.
    found = sorted(t for t in set(table.filter(_ranking_rows(table, scenario)).column("template").to_pylist())
                   if t in REGISTRY and REGISTRY[t].ranks_titles)
    if not found:
        wanted = templates_of(scenario)
        raise InputError("instructions", f"{path} has no {scenario.notation} reranking rows for scenario "
                         f"{scenario.name}", "rebuild it with `instructrec instructions build --eval-templates "
                         f"{','.join(wanted)},...` (the templates of every scenario you evaluate)")
    return found


def load_instances(instructions: Path, split: str, scenario: Scenario, histories: dict[str, tuple[str, ...]],
                   items) -> list[Instance]:
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
    for key in sorted(by_key):
        inst = by_key[key]
        if len(inst.prompts) != len(templates):
            continue
        if inst.user_id is not None:
            inst.history = histories.get(inst.user_id, ())
        if scenario.query == "category":
            inst.query = items.category_path(inst.target)
        elif scenario.query == "vague":
            first = templates[0]
            inst.query = read_slot(first, inst.prompts[first], "intention")
        instances.append(inst)
    return instances


def sample(instances: list[Instance], n: int, seed: int, label: str) -> list[Instance]:
    """A seeded subset of `n` instances (all when n is 0 or larger), in key order."""
    if n <= 0 or n >= len(instances):
        return list(instances)
    rng = np.random.default_rng([seed, zlib.crc32(label.encode())])
    keep = np.sort(rng.choice(len(instances), size=n, replace=False))
    return [instances[i] for i in keep]


def _list_placeholder(inst: Instance) -> dict[str, str]:
    """The instructions with their numbered candidate list replaced by `{candidates}`; those of
    templates that do not list candidates (T2) stay as they are."""
    from instructrec.engine.formatting import CANDIDATES_PLACEHOLDER, format_candidate_list
    from instructrec.engine.templates import REGISTRY

    listed = format_candidate_list(inst.titles)
    out = {}
    for template, text in inst.prompts.items():
        if not REGISTRY[template].lists_candidates:
            out[template] = text
            continue
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
    from instructrec.engine.templates import REGISTRY

    history_titles = [titles_of[i] for i in inst.history if i in titles_of]
    fields = {template: _request_fields(inst.key, template, text, history_titles)
              for template, text in inst.prompts.items() if REGISTRY[template].lists_candidates}
    return replace(inst, candidate_ids=list(ids), titles=[titles_of[i] for i in ids], prompts=_list_placeholder(inst),
                   fields=fields)


def _request_fields(key: str, template: str, instruction: str, history_titles: list[str]) -> dict:
    """The structured fields that render `instruction` with `template` (its candidates left out)."""
    values = read_slots(template, instruction)
    if values is None:
        raise InstructRecError(f"the instruction of {key!r} ({template}) does not read back as its template; "
                               "cannot swap in another list (rebuild the instructions)")
    fields = {"template": template}
    for name, value in values.items():
        if name == "history":
            fields["history"] = _history_items(value, history_titles, key)
        elif name != "candidates":
            fields[name] = value
    return fields


def with_request_fields(inst: Instance, titles_of: dict[str, str]) -> Instance:
    """The instance with the structured request fields of every instruction that renders back from
    them exactly (those a swapped list set are kept). The build fitted each instruction to the
    Flan-T5 tokenizer's source budget; a model with another tokenizer (a compact vocabulary spells
    another domain's words in smaller pieces) can count more tokens, and the engine would refuse the
    free text. From its fields the engine renders the same text where it fits, and otherwise drops
    the oldest history titles, as the build did. An instruction without a history the user's
    prepared titles show exactly, or that renders differently, stays the stored text."""
    from instructrec.engine.formatting import build_instruction
    from instructrec.engine.templates import REGISTRY

    if not inst.history:
        return inst
    history_titles = [titles_of[i] for i in inst.history if i in titles_of]
    fields = dict(inst.fields)
    for template, text in inst.prompts.items():
        if template in fields:
            continue
        values = read_slots(template, text)
        if values is None or "history" not in values:
            continue
        history = _matching_history(values["history"], history_titles)
        if history is None:
            continue
        others = {name: value for name, value in values.items() if name not in ("history", "candidates")}
        if not set(others) <= _TEXT_FIELDS:
            continue
        found = {"template": template, "history": history, **others}
        try:
            listed = inst.titles if REGISTRY[template].lists_candidates else None
            same = build_instruction(**found, candidates=listed) == text
        except InputError:  # these fields do not render (the stored text is used as it is)
            same = False
        if same:
            fields[template] = found
    return replace(inst, fields=fields) if fields != inst.fields else inst


# The slots besides the history and the candidates that a Request carries as fields of its own.
_TEXT_FIELDS = {"preference", "intention", "context"}


def _matching_history(text: str, history_titles: list[str]) -> list[str] | None:
    """The newest of the user's history titles that format to exactly `text` (a title may itself
    hold the separator); None if none do."""
    from instructrec.engine.formatting import format_history

    for newest in range(1, len(history_titles) + 1):
        shown = format_history(history_titles[-newest:])
        if shown == text:
            return history_titles[-newest:]
        if len(shown) > len(text):
            break
    return None


def _history_items(text: str, history_titles: list[str], key: str) -> list[str]:
    """The history titles an instruction's history slot shows: the newest of the user's history
    titles that format to exactly `text`, else the text split at its separators (a WARNING where
    the user's history is known but does not match)."""
    from instructrec.engine.formatting import HISTORY_SEPARATOR

    matching = _matching_history(text, history_titles)
    if matching is not None:
        return matching
    if history_titles:
        log.warning("the instruction of %r does not show the newest titles of the user's prepared history; its "
                    "history is split at %r to fit a swapped-in list (a title holding it would be cut)", key,
                    HISTORY_SEPARATOR)
    return text.split(HISTORY_SEPARATOR)


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
