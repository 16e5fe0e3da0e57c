"""Offline annotator: P2 and I1 sentences assembled from the data itself, with no model and no
network. Deterministic: the same input gives the same sentence (ties broken alphabetically).

It is a stand-in for the teacher, good enough to exercise every template and to train on when no
teacher endpoint is at hand; its sentences are plainer than an LLM's.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from typing import Iterable, Sequence

from .base import Annotator, ItemView, clean_category_labels, split_sentences

# Words that carry no taste: articles, connectors, and the packaging words of product titles.
_STOPWORDS = frozenset("""
a an and the of for with in on to from by at or as is it its this that be are was not no new
edition version pack set bundle game games video pc xbox ps ps2 ps3 ps4 ps5 one 360 nintendo switch wii
ds 3ds playstation console consoles system standard deluxe complete collection collector collectors
digital code download online physical only vol volume part iii ii iv x s hd 2d 3d w pcs inch
""".split())

# Review sentences with these cues speak about what the writer likes or wanted.
_PREFERENCE_CUES = ("love", "enjoy", "favorite", "favourite", "fun", "like", "prefer", "great", "fan of",
                    "recommend", "best", "addict", "hate", "wish", "always", "never")
_INTENTION_CUES = ("for my", "gift", "present", "looking for", "needed", "wanted", "need", "want",
                   "replace", "birthday", "christmas", "son", "daughter", "kids", "wife", "husband",
                   "friend", "bought", "purchased", "ordered", "perfect for", "use it", "works with")

MAX_QUOTE_WORDS = 30


def shorten(sentence: str, max_words: int = MAX_QUOTE_WORDS) -> str:
    """At most `max_words` words, without the closing period (the template adds its own
    punctuation after the quote); a cut sentence ends with "..."."""
    words = sentence.split()
    if len(words) <= max_words:
        return sentence.rstrip(" ,;:.")
    return " ".join(words[:max_words]).rstrip(" ,;:.!?") + "..."


def first_cue_sentence(text: str | None, cues: Sequence[str]) -> str | None:
    """The first sentence of `text` containing one of `cues` (whole-word match), else None."""
    for sentence in split_sentences(text or ""):
        lowered = sentence.lower()
        if any(re.search(rf"\b{re.escape(cue)}", lowered) for cue in cues):
            return sentence
    return None


def _title_words(title: str) -> list[str]:
    words = re.findall(r"[A-Za-z][A-Za-z'\-]+", html.unescape(title or ""))
    return [w for w in words if len(w) > 2 and w.lower() not in _STOPWORDS]


def dominant_categories(history: Sequence[ItemView], limit: int = 3, generic: frozenset[str] = frozenset()) -> list[str]:
    """The most frequent category labels of the history, most specific first among equals.

    Labels that say nothing about taste are left out while other labels remain: the `generic`
    ones (too common in the catalog, see `generic_category_labels`) and, in a history of two or
    more items, a label every item carries (the root "Video Games")."""
    counts: Counter[str] = Counter()
    depth: dict[str, int] = {}
    for item in history:
        for position, label in enumerate(clean_category_labels(item.categories)):
            counts[label] += 1
            depth[label] = max(depth.get(label, 0), position)
    if not counts:
        return []
    informative = {label: n for label, n in counts.items()
                   if label not in generic and not (len(history) > 1 and n == len(history))}
    pool = informative or dict(counts)
    ranked = sorted(pool, key=lambda label: (-pool[label], -depth[label], label.lower()))
    return ranked[:limit]


def generic_category_labels(category_lists: Iterable[Sequence[str]], max_share: float = 0.25) -> frozenset[str]:
    """Labels carried by more than `max_share` of the catalog's items. In the 2018 Video Games
    catalog that is "Video Games" (99%) and "Games" (70%); the next, "Accessories", is at 20%
    and does say something about a shopper."""
    counts: Counter[str] = Counter()
    n_items = 0
    for categories in category_lists:
        n_items += 1
        counts.update(set(clean_category_labels(categories)))
    if n_items == 0:
        return frozenset()
    return frozenset(label for label, n in counts.items() if n / n_items > max_share)


def recurring_title_words(history: Sequence[ItemView], limit: int = 3) -> list[str]:
    """Words found in the titles of at least two different history items, most frequent first."""
    counts: Counter[str] = Counter()
    spelling: dict[str, str] = {}
    for title in dict.fromkeys(item.title for item in history):  # each distinct title once
        for word in dict.fromkeys(w.lower() for w in _title_words(title)):
            counts[word] += 1
        for word in _title_words(title):
            spelling.setdefault(word.lower(), word)
    recurring = [w for w, n in counts.items() if n >= 2]
    recurring.sort(key=lambda w: (-counts[w], w))
    return [spelling[w] for w in recurring[:limit]]


def join_words(words: Sequence[str]) -> str:
    words = list(words)
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


class OfflineAnnotator(Annotator):
    """`generic_labels`: category labels too common to describe a taste; `fit_catalog` sets them
    from the catalog (the builder calls it), or pass them here."""

    name = "offline"

    def __init__(self, generic_labels: Iterable[str] = ()):
        self.generic_labels = frozenset(generic_labels)

    def fit_catalog(self, items: Sequence[ItemView]) -> None:
        self.generic_labels = generic_category_labels(item.categories for item in items)

    def explicit_preference(self, user_history: list[ItemView]) -> str:
        # A phrase, not a sentence: templates embed it ("Their taste in brief: {preference}.",
        # "a liking for {preference}, so ...").
        if not user_history:
            return "nothing in particular yet"
        categories = dominant_categories(user_history, generic=self.generic_labels)
        words = recurring_title_words(user_history)
        phrase = f"{join_words(categories)} items" if categories else "a mix of items with no shared category"
        if words:
            phrase += f", especially titles about {join_words(words)}"
        # The newest review that says what they like is the closest thing to their own words.
        for item in reversed(user_history):
            quote = first_cue_sentence(item.review, _PREFERENCE_CUES)
            if quote:
                phrase += f' (in their words: "{shorten(quote)}")'
                break
        return phrase

    def vague_intention(self, target: ItemView, review: str | None) -> str:
        # A phrase completing "looking for ...", never naming the item.
        if review and split_sentences(review):
            quote = first_cue_sentence(review, _INTENTION_CUES) or split_sentences(review)[0]
            return f'something that fits "{shorten(quote)}"'
        labels = clean_category_labels(target.categories)
        if labels:
            # The broadest labels keep it vague; the leaf label would be the specific intention.
            area = labels[-2] if len(labels) >= 3 else labels[0]
            phrase = f"something in {area}"
        else:
            phrase = "something new"
        description = first_cue_sentence(target.description, ("for", "great", "perfect", "ideal", "designed"))
        if description:
            phrase += f', described as "{shorten(description, 15)}"'
        return phrase
