"""The instruction model: preference P, intention I, task form T, context, and the template registry.

An instruction states a user's needs in natural language. Its parts (see DESIGN.md, "The method,
in facts"):

- preference: P0 none, P1 the titles of the user's past items, P2 an explicit sentence about
  their taste (and P1+P2 when a template states both);
- intention: I0 none, I1 vague ("something to play with my kids"), I2 specific (the target's
  category labels joined);
- task form: T0 pointwise yes/no, T1 pairwise (which of two), T2 matching (generate the item),
  T3 reranking (choose among listed candidates);
- optional context (time, place, occasion).

Each `Template` declares these attributes, its scenario and diversity strategy, the slots its
source text needs (derived from the `{slot}` placeholders) and how its target is made. The
templates are written for this project; their attributes are checked when the module loads, so a
template whose text contradicts its declared P/I/T cannot be registered.

Rendering to text (sanitising, history lists, token budget) lives in `engine/formatting.py`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Mapping

from .errors import InputError, InstructRecError, UnknownTemplateError

__all__ = [
    "Preference", "Intention", "TaskForm", "Scenario", "Strategy", "TargetKind", "TemplateGroup",
    "Template", "TemplateDefinitionError", "REGISTRY", "SLOT_NAMES", "LIST_SLOTS",
    "REQUEST_FIELDS", "MAX_HISTORY_ITEMS", "get_template", "describe_templates",
    "default_template", "DEFAULT_TEMPLATE_IDS",
]

# The method caps a user's history at the 20 most recent items (DESIGN.md); longer histories
# are out of the distribution the model was tuned on.
MAX_HISTORY_ITEMS = 20


class Preference(str, Enum):
    NONE = "P0"
    HISTORY = "P1"  # titles of past items, oldest to newest
    EXPLICIT = "P2"  # a sentence describing the user's taste
    HISTORY_AND_EXPLICIT = "P1+P2"  # both stated in one instruction


class Intention(str, Enum):
    NONE = "I0"
    VAGUE = "I1"  # free-text need, e.g. "a gift my son will enjoy"
    SPECIFIC = "I2"  # the target's category labels joined


class TaskForm(str, Enum):
    POINTWISE = "T0"  # is this item right for the user? yes/no
    PAIRWISE = "T1"  # which of two items
    MATCHING = "T2"  # generate the item (or, for the diversity strategies, a text)
    RERANKING = "T3"  # choose among listed candidates


class Scenario(str, Enum):
    RECOMMENDATION = "recommendation"  # preference only
    PRODUCT_SEARCH = "product_search"  # intention only
    PERSONALIZED_SEARCH = "personalized_search"  # preference and intention


class Strategy(str, Enum):
    PLAIN = "plain"
    TURN_AROUND = "turn_around"  # swap input and output: write the need for a given item
    RELATEDNESS = "relatedness"  # relate preference and intention: next need from history, past item from need + choice
    CHAIN_OF_THOUGHT = "chain_of_thought"  # target explains the inferred taste, then names the item


class TargetKind(str, Enum):
    TITLE = "title"  # the target item's title
    YES_NO = "yes_no"  # "Yes" / "No" from the boolean slot `label`
    CHOICE = "choice"  # the title of the preferred one of item_a / item_b
    INTENTION = "intention"  # the intention text (turn-around, relatedness)
    PREFERENCE = "preference"  # the explicit preference sentence (turn-around)
    HISTORY = "history"  # the most recent past item of the user (turn-around, relatedness)
    REASONING = "reasoning"  # a sentence stating the inferred taste, ending with the title


class TemplateGroup(str, Enum):
    """The coarse grouping the original 39 templates are counted by."""

    PREFERENCE_RELATED = "preference_related"  # P1/P2, I0
    INTENTION_RELATED = "intention_related"  # P0, I1/I2
    COMBINED = "combined"  # P1/P2 and I1/I2


# Every slot a template may name. List slots hold titles; `label` is a bool; the rest are text.
SLOT_NAMES = frozenset({
    "history", "preference", "intention", "context", "candidates", "item", "item_a", "item_b",
    "target_title", "target_categories", "label",
})
LIST_SLOTS = frozenset({"history", "candidates"})
# The slots that `build_instruction` fills from a request; a template needing any other slot in
# its source (item, item_a, target_title, ...) is a training-only template.
REQUEST_FIELDS = frozenset({"history", "preference", "intention", "context", "candidates"})

# Target text of each kind; REASONING takes the template's own `target_pattern`. The derived
# slots `answer` (from label) and `latest_history_item` (from history) are made by the renderer.
_FIXED_TARGET_PATTERNS = {
    TargetKind.TITLE: "{target_title}",
    TargetKind.CHOICE: "{target_title}",
    TargetKind.YES_NO: "{answer}",
    TargetKind.INTENTION: "{intention}",
    TargetKind.PREFERENCE: "{preference}",
    TargetKind.HISTORY: "{latest_history_item}",
}
# The slot a derived target placeholder is computed from.
_DERIVED_TARGET_SLOTS = {"answer": "label", "latest_history_item": "history"}

_TARGETS_BY_TASK = {
    TaskForm.POINTWISE: {TargetKind.YES_NO},
    TaskForm.PAIRWISE: {TargetKind.CHOICE},
    TaskForm.MATCHING: {TargetKind.TITLE, TargetKind.INTENTION, TargetKind.PREFERENCE,
                        TargetKind.HISTORY, TargetKind.REASONING},
    TaskForm.RERANKING: {TargetKind.TITLE, TargetKind.REASONING},
}
_TARGETS_BY_STRATEGY = {
    Strategy.PLAIN: {TargetKind.TITLE, TargetKind.YES_NO, TargetKind.CHOICE},
    Strategy.TURN_AROUND: {TargetKind.INTENTION, TargetKind.PREFERENCE, TargetKind.HISTORY},
    Strategy.RELATEDNESS: {TargetKind.INTENTION, TargetKind.HISTORY},
    Strategy.CHAIN_OF_THOUGHT: {TargetKind.REASONING},
}
# Targets that name the item: its title must not already be in the source.
_TITLE_TARGETS = {TargetKind.TITLE, TargetKind.CHOICE, TargetKind.REASONING}

PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


class TemplateDefinitionError(InstructRecError):
    """A template's text contradicts its declared attributes (a bug in this module, not input)."""


def _placeholders(pattern: str) -> list[str]:
    return PLACEHOLDER.findall(pattern)


@dataclass(frozen=True)
class Template:
    """One coarse instruction template.

    `source` is the instruction text with `{slot}` placeholders; `slots` (derived) are the slots it
    needs, in order of appearance. `target_kind` says how the target is made and `target_slots`
    (derived) which slots that needs; only REASONING templates carry their own `target_pattern`.
    """

    id: str
    preference: Preference
    intention: Intention
    task: TaskForm
    scenario: Scenario
    strategy: Strategy
    source: str
    target_kind: TargetKind
    description: str
    target_pattern: str | None = None
    slots: tuple[str, ...] = field(init=False)
    target_slots: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        source_slots = _placeholders(self.source)
        object.__setattr__(self, "slots", tuple(source_slots))
        object.__setattr__(self, "target_slots", tuple(
            _DERIVED_TARGET_SLOTS.get(name, name) for name in _placeholders(self.resolved_target_pattern)))
        self._check(source_slots)

    @property
    def resolved_target_pattern(self) -> str:
        if self.target_kind is TargetKind.REASONING:
            return self.target_pattern or ""
        return _FIXED_TARGET_PATTERNS[self.target_kind]

    @property
    def group(self) -> TemplateGroup:
        if self.preference is Preference.NONE:
            return TemplateGroup.INTENTION_RELATED
        if self.intention is Intention.NONE:
            return TemplateGroup.PREFERENCE_RELATED
        return TemplateGroup.COMBINED

    @property
    def has_context(self) -> bool:
        return "context" in self.slots

    @property
    def lists_candidates(self) -> bool:
        return "candidates" in self.slots

    @property
    def ranks_titles(self) -> bool:
        """Usable for inference: the target is the item title and the source needs only request
        fields, so the engine can score each candidate title as the target."""
        return self.target_kind is TargetKind.TITLE and set(self.slots) <= REQUEST_FIELDS

    def _fail(self, problem: str) -> None:
        raise TemplateDefinitionError(f"template {self.id}: {problem}")

    def _check(self, source_slots: list[str]) -> None:
        if not re.fullmatch(r"[a-z]+(-[a-z]+)*-\d{2}", self.id):
            self._fail("id must look like 'seq-rec-01'")
        unknown = (set(source_slots) | set(self.target_slots)) - SLOT_NAMES
        if unknown:
            self._fail(f"unknown slots {sorted(unknown)}")
        repeated = {name for name in source_slots if source_slots.count(name) > 1}
        if repeated:
            self._fail(f"slots {sorted(repeated)} appear more than once in the source")
        if "label" in source_slots:
            self._fail("the yes/no label belongs to the target, never the source")
        if (self.target_pattern is not None) != (self.target_kind is TargetKind.REASONING):
            self._fail("target_pattern is given exactly for REASONING targets")
        if self.target_kind is TargetKind.REASONING and not self.resolved_target_pattern.rstrip(".").endswith(
                "{target_title}"):
            self._fail("a reasoning target ends with the recommended title")

        everywhere = set(source_slots) | set(self.target_slots)
        source = set(source_slots)
        if self.target_kind not in _TARGETS_BY_TASK[self.task]:
            self._fail(f"target {self.target_kind.value} does not fit task {self.task.value}")
        if self.target_kind not in _TARGETS_BY_STRATEGY[self.strategy]:
            self._fail(f"target {self.target_kind.value} does not fit strategy {self.strategy.value}")
        if (self.task is TaskForm.RERANKING) != ("candidates" in source):
            self._fail("exactly the T3 templates list {candidates}")
        if (self.task is TaskForm.PAIRWISE) != ({"item_a", "item_b"} <= source):
            self._fail("exactly the T1 templates name {item_a} and {item_b}")
        if (self.task is TaskForm.POINTWISE) != ("item" in source):
            self._fail("exactly the T0 templates name {item}")
        if self.target_kind in _TITLE_TARGETS and "target_title" in source:
            self._fail("the source would give away the target title")
        if self.target_kind in (TargetKind.INTENTION, TargetKind.PREFERENCE, TargetKind.HISTORY):
            produced = self.target_slots[0]
            if produced in source:
                self._fail(f"the source would give away the target ({produced})")

        has_history, has_preference = "history" in everywhere, "preference" in everywhere
        expected = {
            Preference.NONE: (False, False),
            Preference.HISTORY: (True, None),  # a chain-of-thought target may state the taste
            Preference.EXPLICIT: (False, True),
            Preference.HISTORY_AND_EXPLICIT: (True, True),
        }[self.preference]
        if has_history != expected[0] or (expected[1] is not None and has_preference != expected[1]):
            self._fail(f"slots {sorted(everywhere)} contradict preference {self.preference.value}")
        if self.preference is Preference.HISTORY and "preference" in source:
            self._fail("a P1 template does not state an explicit preference in its source")
        has_intention = "intention" in everywhere
        if has_intention != (self.intention is not Intention.NONE):
            self._fail(f"slots {sorted(everywhere)} contradict intention {self.intention.value}")
        if self.intention is Intention.NONE and "target_categories" in everywhere:
            self._fail("an I0 template does not mention categories")

        expected_scenario = {
            TemplateGroup.PREFERENCE_RELATED: Scenario.RECOMMENDATION,
            TemplateGroup.INTENTION_RELATED: Scenario.PRODUCT_SEARCH,
            TemplateGroup.COMBINED: Scenario.PERSONALIZED_SEARCH,
        }[self.group]
        if self.scenario is not expected_scenario:
            self._fail(f"P/I make it a {expected_scenario.value} template, not {self.scenario.value}")

    def describe(self) -> dict:
        """JSON-friendly attributes, as listed by `instructrec instructions templates`."""
        return {
            "id": self.id,
            "P": self.preference.value,
            "I": self.intention.value,
            "T": self.task.value,
            "scenario": self.scenario.value,
            "strategy": self.strategy.value,
            "group": self.group.value,
            "slots": list(self.slots),
            "target_kind": self.target_kind.value,
            "target_slots": list(self.target_slots),
            "context": self.has_context,
            "lists_candidates": self.lists_candidates,
            "ranks_titles": self.ranks_titles,
            "description": self.description,
            "source": self.source,
            "target": self.resolved_target_pattern,
        }


# Short names keep the table below readable.
P0, P1, P2, P12 = Preference.NONE, Preference.HISTORY, Preference.EXPLICIT, Preference.HISTORY_AND_EXPLICIT
I0, I1, I2 = Intention.NONE, Intention.VAGUE, Intention.SPECIFIC
T0, T1, T2, T3 = TaskForm.POINTWISE, TaskForm.PAIRWISE, TaskForm.MATCHING, TaskForm.RERANKING
REC, SEARCH, PSEARCH = Scenario.RECOMMENDATION, Scenario.PRODUCT_SEARCH, Scenario.PERSONALIZED_SEARCH
PLAIN, TURN, RELATED, COT = Strategy.PLAIN, Strategy.TURN_AROUND, Strategy.RELATEDNESS, Strategy.CHAIN_OF_THOUGHT
TITLE, YES_NO, CHOICE = TargetKind.TITLE, TargetKind.YES_NO, TargetKind.CHOICE
WRITE_INTENTION, WRITE_PREFERENCE, PAST_ITEM, REASONING = (
    TargetKind.INTENTION, TargetKind.PREFERENCE, TargetKind.HISTORY, TargetKind.REASONING)

# Recurring phrases, so that the same field reads the same way in every template.
_HISTORY = "Past purchases of this shopper, oldest to newest: {history}."
_TASTE = "Their taste in brief: {preference}."
_NEED = "What they are looking for now: {intention}."
_CATEGORY = "They are browsing the category {intention}."
_SITUATION = "Situation: {context}."

_TEMPLATES = (
    # ---- preference-related: recommendation (P1 / P2 / P1+P2, I0) ----
    Template("seq-rec-01", P1, I0, T2, REC, PLAIN,
             f"{_HISTORY} Based on this sequence, name the item they are most likely to want next.",
             TITLE, "Next item from the purchase history (default for history alone)."),
    Template("seq-rec-02", P1, I0, T3, REC, PLAIN,
             f"{_HISTORY} Which of the following items will they most likely choose next? "
             "Answer with its title.\n{candidates}",
             TITLE, "Pick the next item among listed candidates from the history."),
    Template("seq-rec-03", P1, I0, T0, REC, PLAIN,
             f"{_HISTORY} Would {{item}} be a welcome next purchase for them? Answer yes or no.",
             YES_NO, "Judge one item against the purchase history."),
    Template("seq-rec-04", P1, I0, T1, REC, PLAIN,
             f"{_HISTORY} Option A: {{item_a}}. Option B: {{item_b}}. "
             "Which option would they prefer? Reply with its title.",
             CHOICE, "Choose the better of two items for the purchase history."),
    Template("seq-rec-05", P2, I0, T2, REC, PLAIN,
             f"{_TASTE} Suggest one item this shopper would enjoy.",
             TITLE, "Item for a stated taste (default for a preference alone)."),
    Template("seq-rec-06", P2, I0, T3, REC, PLAIN,
             f"{_TASTE} From the list below, pick the item that suits them best.\n{{candidates}}",
             TITLE, "Pick among listed candidates for a stated taste."),
    Template("seq-rec-07", P2, I0, T0, REC, PLAIN,
             f"{_TASTE} Is {{item}} likely to please them? Answer yes or no.",
             YES_NO, "Judge one item against a stated taste."),
    Template("seq-rec-08", P12, I0, T2, REC, PLAIN,
             f"{_HISTORY} {_TASTE} Recommend the item they should get next.",
             TITLE, "Next item from history and stated taste (default for both)."),
    Template("seq-rec-09", P12, I0, T3, REC, PLAIN,
             f"{_HISTORY} {_TASTE} Choose the best next item for them from these candidates.\n{{candidates}}",
             TITLE, "Pick among listed candidates from history and stated taste."),
    Template("seq-rec-10", P1, I0, T2, REC, COT,
             f"{_HISTORY} Work out what they enjoy, then recommend one more item.",
             REASONING, "Reason about the taste behind the history, then name the item.",
             target_pattern="These purchases point to a liking for {preference}, so we recommend {target_title}."),
    Template("seq-rec-11", P1, I0, T3, REC, COT,
             f"{_HISTORY} First reason about their taste, then pick the most suitable item among these.\n"
             "{candidates}",
             REASONING, "Reason about the taste behind the history, then pick a listed candidate.",
             target_pattern="From this history we infer a taste for {preference}; the best fit is therefore "
                            "{target_title}."),
    Template("seq-rec-12", P1, I0, T2, REC, TURN,
             f"{_HISTORY} Describe this shopper's taste in one sentence.",
             WRITE_PREFERENCE, "Turned around: write the stated taste from the history."),
    Template("seq-rec-13", P2, I0, T2, REC, TURN,
             "A shopper has just chosen {target_title}. In one sentence, describe the kind of taste that "
             "leads to such a choice.",
             WRITE_PREFERENCE, "Turned around: write the taste that a chosen item reveals."),
    Template("seq-rec-14", P1, I0, T2, REC, TURN,
             "A shopper's newest purchase is {target_title}. Name an item they probably bought shortly "
             "before it.",
             PAST_ITEM, "Turned around: from the next item, infer the latest past item."),
    Template("seq-rec-15", P1, I0, T2, REC, PLAIN,
             f"{_SITUATION} {_HISTORY} Which item fits them best right now?",
             TITLE, "Next item from the history in a situation (default for history with context)."),
    Template("seq-rec-16", P2, I0, T2, REC, PLAIN,
             f"{_SITUATION} {_TASTE} Recommend an item that suits them in this moment.",
             TITLE, "Item for a stated taste in a situation (default for a preference with context)."),
    Template("seq-rec-17", P12, I0, T2, REC, PLAIN,
             f"{_SITUATION} {_HISTORY} {_TASTE} Which item should we recommend now?",
             TITLE, "Item from history and taste in a situation (default for both with context)."),
    Template("seq-rec-18", P1, I0, T3, REC, PLAIN,
             f"{_SITUATION} {_HISTORY} Select the candidate that fits them best at this moment.\n{{candidates}}",
             TITLE, "Pick among listed candidates from the history in a situation."),

    # ---- intention-related: product search (P0, I1 / I2) ----
    Template("prod-search-01", P0, I1, T2, SEARCH, PLAIN,
             "A shopper explains what they need: {intention}. Name the item that best meets this need.",
             TITLE, "Item for a vague need (default for a vague intention alone)."),
    Template("prod-search-02", P0, I2, T2, SEARCH, PLAIN,
             "Search request by category: {intention}. Return the item that fits this search best.",
             TITLE, "Item for a category search (default for a specific intention alone)."),
    Template("prod-search-03", P0, I1, T3, SEARCH, PLAIN,
             "A shopper explains what they need: {intention}. Which of these items meets the need best?\n"
             "{candidates}",
             TITLE, "Pick among listed candidates for a vague need."),
    Template("prod-search-04", P0, I2, T3, SEARCH, PLAIN,
             "Wanted: an item in the category {intention}. Choose the one that fits from the candidates "
             "below.\n{candidates}",
             TITLE, "Pick among listed candidates for a category search."),
    Template("prod-search-05", P0, I1, T0, SEARCH, PLAIN,
             "Request: {intention}. Does {item} satisfy this request? Answer yes or no.",
             YES_NO, "Judge one item against a vague need."),
    Template("prod-search-06", P0, I2, T1, SEARCH, PLAIN,
             "Searching within {intention}. Option A: {item_a}. Option B: {item_b}. "
             "Which option matches the search better? Reply with its title.",
             CHOICE, "Choose the better of two items for a category search."),
    Template("prod-search-07", P0, I1, T2, SEARCH, TURN,
             "Write the short request that a shopper looking for {target_title} might type.",
             WRITE_INTENTION, "Turned around: write a vague need for a given item."),
    Template("prod-search-08", P0, I2, T2, SEARCH, TURN,
             "Give the categories of {target_title}, from broadest to narrowest.",
             WRITE_INTENTION, "Turned around: write the category search for a given item."),
    Template("prod-search-09", P0, I1, T2, SEARCH, COT,
             "A shopper asks for the following: {intention}. Decide which kind of product this calls for, "
             "then name a matching item.",
             REASONING, "Reason about the product kind behind a vague need, then name the item.",
             target_pattern="The request points to the category {target_categories}, so we recommend "
                            "{target_title}."),
    Template("prod-search-10", P0, I1, T2, SEARCH, PLAIN,
             f"{_SITUATION} A shopper explains what they need: {{intention}}. Name an item that meets it.",
             TITLE, "Item for a vague need in a situation (default for a vague intention with context)."),
    Template("prod-search-11", P0, I2, T2, SEARCH, PLAIN,
             f"{_SITUATION} Search request by category: {{intention}}. Return the most fitting item.",
             TITLE, "Item for a category search in a situation (default for a specific intention with context)."),

    # ---- combined: personalized search (P1 / P2 / P1+P2 and I1 / I2) ----
    Template("pers-search-01", P1, I1, T2, PSEARCH, PLAIN,
             f"{_HISTORY} {_NEED} Name the item that fits both their history and this need.",
             TITLE, "Item for history and a vague need (default)."),
    Template("pers-search-02", P1, I2, T2, PSEARCH, PLAIN,
             f"{_HISTORY} {_CATEGORY} Which item there would they choose?",
             TITLE, "Item for history and a category search (default)."),
    Template("pers-search-03", P2, I1, T2, PSEARCH, PLAIN,
             f"{_TASTE} {_NEED} Suggest an item that serves both.",
             TITLE, "Item for a stated taste and a vague need (default)."),
    Template("pers-search-04", P2, I2, T2, PSEARCH, PLAIN,
             f"{_TASTE} {_CATEGORY} Suggest the item they would pick.",
             TITLE, "Item for a stated taste and a category search (default)."),
    Template("pers-search-05", P12, I1, T2, PSEARCH, PLAIN,
             f"{_HISTORY} {_TASTE} {_NEED} Recommend the best item for them.",
             TITLE, "Item for history, taste and a vague need (default)."),
    Template("pers-search-06", P12, I2, T2, PSEARCH, PLAIN,
             f"{_HISTORY} {_TASTE} {_CATEGORY} Recommend the best item for them.",
             TITLE, "Item for history, taste and a category search (default)."),
    Template("pers-search-07", P1, I1, T3, PSEARCH, PLAIN,
             f"{_HISTORY} {_NEED} Pick the candidate that fits them best.\n{{candidates}}",
             TITLE, "Pick among listed candidates for history and a vague need."),
    Template("pers-search-08", P1, I2, T3, PSEARCH, PLAIN,
             f"{_HISTORY} {_CATEGORY} Pick the candidate they would buy.\n{{candidates}}",
             TITLE, "Pick among listed candidates for history and a category search."),
    Template("pers-search-09", P2, I1, T3, PSEARCH, PLAIN,
             f"{_TASTE} {_NEED} Which of these candidates serves both?\n{{candidates}}",
             TITLE, "Pick among listed candidates for a stated taste and a vague need."),
    Template("pers-search-10", P2, I2, T3, PSEARCH, PLAIN,
             f"{_TASTE} {_CATEGORY} Which of these candidates would they pick?\n{{candidates}}",
             TITLE, "Pick among listed candidates for a stated taste and a category search."),
    Template("pers-search-11", P12, I1, T3, PSEARCH, PLAIN,
             f"{_HISTORY} {_TASTE} {_NEED} Choose the best candidate for them.\n{{candidates}}",
             TITLE, "Pick among listed candidates for history, taste and a vague need."),
    Template("pers-search-12", P12, I2, T3, PSEARCH, PLAIN,
             f"{_HISTORY} {_TASTE} {_CATEGORY} Choose the best candidate for them.\n{{candidates}}",
             TITLE, "Pick among listed candidates for history, taste and a category search."),
    Template("pers-search-13", P1, I1, T0, PSEARCH, PLAIN,
             f"{_HISTORY} {_NEED} Would {{item}} be the right choice for them? Answer yes or no.",
             YES_NO, "Judge one item against history and a vague need."),
    Template("pers-search-14", P1, I2, T1, PSEARCH, PLAIN,
             f"{_HISTORY} {_CATEGORY} Option A: {{item_a}}. Option B: {{item_b}}. "
             "Which one would they pick? Reply with its title.",
             CHOICE, "Choose the better of two items for history and a category search."),
    Template("pers-search-15", P1, I1, T2, PSEARCH, TURN,
             f"{_HISTORY} Their next purchase was {{target_title}}. Write the request they most likely had "
             "in mind.",
             WRITE_INTENTION, "Turned around: write the need behind the next item, given the history."),
    Template("pers-search-16", P1, I1, T2, PSEARCH, RELATED,
             f"{_HISTORY} Guess what this shopper will ask for next.",
             WRITE_INTENTION, "Relatedness: the next need from the history."),
    Template("pers-search-17", P1, I2, T2, PSEARCH, RELATED,
             "A shopper searched the category {intention} and chose {target_title}. Name an item they "
             "probably bought before.",
             PAST_ITEM, "Relatedness: a past item from the need and the choice."),
    Template("pers-search-18", P1, I1, T2, PSEARCH, COT,
             f"{_HISTORY} {_NEED} Reason about their taste, then recommend an item.",
             REASONING, "Reason about taste from history and a vague need, then name the item.",
             target_pattern="Their history points to a taste for {preference}, and the request fits it, so we "
                            "recommend {target_title}."),
    Template("pers-search-19", P1, I2, T3, PSEARCH, COT,
             f"{_HISTORY} {_CATEGORY} Think about their taste first, then choose among these.\n{{candidates}}",
             REASONING, "Reason about taste from history and a category search, then pick a candidate.",
             target_pattern="Given a taste for {preference} and a search in {intention}, we recommend "
                            "{target_title}."),
    Template("pers-search-20", P1, I1, T2, PSEARCH, PLAIN,
             f"{_SITUATION} {_HISTORY} {_NEED} Name the item that suits them here.",
             TITLE, "Item for history and a vague need in a situation (default)."),
    Template("pers-search-21", P1, I2, T2, PSEARCH, PLAIN,
             f"{_SITUATION} {_HISTORY} {_CATEGORY} Which item there suits them here?",
             TITLE, "Item for history and a category search in a situation (default)."),
    Template("pers-search-22", P2, I1, T2, PSEARCH, PLAIN,
             f"{_SITUATION} {_TASTE} {_NEED} Suggest an item that suits them here.",
             TITLE, "Item for a stated taste and a vague need in a situation (default)."),
    Template("pers-search-23", P2, I2, T2, PSEARCH, PLAIN,
             f"{_SITUATION} {_TASTE} {_CATEGORY} Suggest the item they would pick here.",
             TITLE, "Item for a stated taste and a category search in a situation (default)."),
    Template("pers-search-24", P12, I1, T2, PSEARCH, PLAIN,
             f"{_SITUATION} {_HISTORY} {_TASTE} {_NEED} Recommend the best item for them here.",
             TITLE, "Item for history, taste and a vague need in a situation (default)."),
    Template("pers-search-25", P12, I2, T2, PSEARCH, PLAIN,
             f"{_SITUATION} {_HISTORY} {_TASTE} {_CATEGORY} Recommend the best item for them here.",
             TITLE, "Item for history, taste and a category search in a situation (default)."),
)


def _build_registry(templates: tuple[Template, ...]) -> Mapping[str, Template]:
    registry: dict[str, Template] = {}
    for template in templates:
        if template.id in registry:
            raise TemplateDefinitionError(f"template id {template.id} is registered twice")
        registry[template.id] = template
    return MappingProxyType(registry)


REGISTRY: Mapping[str, Template] = _build_registry(_TEMPLATES)

# The template used when a request gives structured fields but no template id, keyed by
# (preference, intention, context given). All are T2 matching forms with a title target: the
# engine scores each candidate title as the target, so nothing needs listing (and no tournament).
DEFAULT_TEMPLATE_IDS: Mapping[tuple[Preference, Intention, bool], str] = MappingProxyType({
    (P1, I0, False): "seq-rec-01", (P1, I0, True): "seq-rec-15",
    (P2, I0, False): "seq-rec-05", (P2, I0, True): "seq-rec-16",
    (P12, I0, False): "seq-rec-08", (P12, I0, True): "seq-rec-17",
    (P0, I1, False): "prod-search-01", (P0, I1, True): "prod-search-10",
    (P0, I2, False): "prod-search-02", (P0, I2, True): "prod-search-11",
    (P1, I1, False): "pers-search-01", (P1, I1, True): "pers-search-20",
    (P1, I2, False): "pers-search-02", (P1, I2, True): "pers-search-21",
    (P2, I1, False): "pers-search-03", (P2, I1, True): "pers-search-22",
    (P2, I2, False): "pers-search-04", (P2, I2, True): "pers-search-23",
    (P12, I1, False): "pers-search-05", (P12, I1, True): "pers-search-24",
    (P12, I2, False): "pers-search-06", (P12, I2, True): "pers-search-25",
})


def _check_defaults() -> None:
    for (preference, intention, with_context), template_id in DEFAULT_TEMPLATE_IDS.items():
        template = REGISTRY[template_id]
        if (template.preference, template.intention, template.has_context) != (preference, intention, with_context) \
                or template.task is not TaskForm.MATCHING or not template.ranks_titles:
            raise TemplateDefinitionError(f"default template {template_id} does not fit its key")


_check_defaults()


def get_template(template_id: str) -> Template:
    """The registered template `template_id`; `UnknownTemplateError` names the closest ids."""
    if not isinstance(template_id, str):
        raise InputError("template", f"must be a template id string, got {type(template_id).__name__}")
    template = REGISTRY.get(template_id)
    if template is not None:
        return template
    # Common slips first (case, underscores, an unpadded number: "seq_rec-1" means "seq-rec-01"),
    # then the nearest spellings.
    normalised = re.sub(r"-(\d)$", r"-0\1", template_id.strip().lower().replace("_", "-"))
    close = [normalised] if normalised in REGISTRY else []
    close += [name for name in difflib.get_close_matches(template_id, list(REGISTRY), n=3, cutoff=0.6)
              if name not in close][: 3 - len(close)]
    families = sorted({name.rsplit("-", 1)[0] for name in REGISTRY})
    hint = f"closest ids: {', '.join(close)}" if close else (
        f"ids look like {', '.join(f + '-01' for f in families)}")
    raise UnknownTemplateError(
        "template", f"unknown template id {template_id!r}",
        f"{hint}; `instructrec instructions templates` lists all {len(REGISTRY)}")


def default_template(preference: Preference, intention: Intention, with_context: bool) -> Template:
    """The documented default for a request's fields (see DEFAULT_TEMPLATE_IDS)."""
    key = (preference, intention, with_context)
    if key not in DEFAULT_TEMPLATE_IDS:
        raise InputError("instruction", "no user need given: the request has no history, preference or intention",
                         "give a free-text instruction or at least one of history, preference, intention")
    return REGISTRY[DEFAULT_TEMPLATE_IDS[key]]


def describe_templates() -> list[dict]:
    """Every template's attributes, in registry order, for listings and JSON output."""
    return [template.describe() for template in REGISTRY.values()]
