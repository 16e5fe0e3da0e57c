"""The annotator interface: what an instruction builder asks of a teacher (or its offline stand-in).

Three annotations feed the instruction templates:
- P2, an explicit preference: a short phrase about a user's taste that completes "a taste for ...",
  from the items they used before (titles, categories, and their own reviews where present);
- I1, a vague intention: a short phrase completing "looking for ..." that says what the user was
  after when they chose the target, without naming it, from their review of the target (from its
  metadata where there is no review);

Phrases rather than full sentences because the templates embed them mid-sentence ("Their taste
in brief: {preference}.", "These purchases point to a liking for {preference}, so ...").
- I2, a specific intention: the target's category labels joined (no model involved).
"""

from __future__ import annotations

import abc
import html
import re
from dataclasses import dataclass, field
from typing import Sequence

# A category "label" longer than this is a feature sentence that leaked into the category list
# (2,627 items of the 2018 Video Games metadata carry those); it is not a label a user would say.
MAX_CATEGORY_LABEL_CHARS = 50
MAX_CATEGORY_LABEL_WORDS = 6


@dataclass(frozen=True)
class ItemView:
    """What an annotator may see of one item, from one user's point of view.

    `review` is that user's own review of the item (None where the data has no review text);
    `description` and `brand` come from the item metadata."""

    item_id: str
    title: str
    categories: tuple[str, ...] = ()
    brand: str | None = None
    description: str | None = None
    review: str | None = None
    rating: float | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)


def clean_category_labels(categories: Sequence[str]) -> list[str]:
    """Category labels fit for a sentence: HTML entities decoded, whitespace collapsed, feature
    sentences and duplicates removed, original order kept."""
    labels: list[str] = []
    seen: set[str] = set()
    for raw in categories:
        if raw is None:
            continue
        label = re.sub(r"\s+", " ", html.unescape(str(raw))).strip()
        if not label or len(label) > MAX_CATEGORY_LABEL_CHARS:
            continue
        if len(label.split()) > MAX_CATEGORY_LABEL_WORDS or label.endswith("."):
            continue
        if label.lower() in seen:
            continue
        seen.add(label.lower())
        labels.append(label)
    return labels


def specific_intention_from_categories(categories: Sequence[str]) -> str:
    """I2: the item's category labels joined, e.g. "Video Games, PC, Accessories, Gaming Mice".
    Empty when the item has no usable label (the builder then skips I2 templates for it)."""
    return ", ".join(clean_category_labels(categories))


def split_sentences(text: str) -> list[str]:
    """Sentences of a review: HTML entities and tags removed, whitespace collapsed."""
    cleaned = re.sub(r"<[^>]+>", " ", html.unescape(text or ""))
    cleaned = re.sub(r"\s+", " ", cleaned).strip()
    if not cleaned:
        return []
    parts = re.split(r"(?<=[.!?])\s+", cleaned)
    return [part.strip() for part in parts if len(part.strip().split()) >= 3]


def has_sentence(review: str | None) -> bool:
    """Whether a review says anything an intention can be drawn from ("Ok" does not)."""
    return bool(split_sentences(review or ""))


class Annotator(abc.ABC):
    """Produces P2, I1 and I2 sentences. Implementations must be safe to call from one thread;
    the batch methods are where an implementation may parallelise."""

    #: Recorded in the `annotator` column of every instruction row this annotator helped build.
    name: str = "annotator"

    @abc.abstractmethod
    def explicit_preference(self, user_history: list[ItemView]) -> str:
        """P2: a phrase completing "a taste for ..." from the history (oldest first); no final period."""

    @abc.abstractmethod
    def vague_intention(self, target: ItemView, review: str | None) -> str:
        """I1: a phrase completing "looking for ..." that says what the user wanted when choosing
        `target`, without naming it; from `review` (their review of the target) where given,
        otherwise from the target's metadata. No final period."""

    def fit_catalog(self, items: Sequence[ItemView]) -> None:
        """Called once by the builder with every catalog item before any annotation, so that an
        annotator can learn catalog-wide facts (the offline one: which labels are too common to
        describe a taste). Default: nothing to learn."""

    def specific_intention(self, target: ItemView) -> str:
        """I2: the target's category labels joined. Deterministic for every annotator."""
        return specific_intention_from_categories(target.categories)

    # Batch forms: the builder calls these so that a networked annotator can work concurrently.
    def explicit_preferences(self, histories: Sequence[list[ItemView]]) -> list[str]:
        return [self.explicit_preference(list(history)) for history in histories]

    def vague_intentions(self, requests: Sequence[tuple[ItemView, str | None]]) -> list[str]:
        return [self.vague_intention(target, review) for target, review in requests]
