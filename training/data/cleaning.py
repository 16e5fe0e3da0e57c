"""Cleaning rules for titles, categories and texts. Each rule is written out in docs/data.md, "Cleaning rules";
keep the two in step.

All functions are pure and work on one record, so the loaders stay streaming.
"""

from __future__ import annotations

import html
import re
from typing import Any

# A tag is `<` followed by a letter, `/` or `!` (comments): "Tom <3 Jerry" keeps its "<3".
# Inline tags vanish ("<b>coffee</b>." -> "coffee."); any other tag (<br>, <p>, <li>, ...) is a
# break between words and becomes a space.
_INLINE_TAG = re.compile(
    r"</?(?:a|abbr|b|bdi|big|em|font|i|mark|s|small|span|strike|strong|sub|sup|u)\b[^<>]*>",
    re.IGNORECASE)
_TAG = re.compile(r"<(?:[A-Za-z/!][^<>]*)>")
# Control characters other than whitespace, which JSON may carry but no text should.
_CONTROL_TABLE = dict.fromkeys([*range(0x00, 0x09), *range(0x0E, 0x1C), 0x7F], None)
# Double-escaped entities ("&amp;amp;") need one pass per level; three covers what the data has.
_MAX_UNESCAPE_PASSES = 3

# Script code that some 2018 metadata carries in place of a title.
_SCRIPT = re.compile(r"\bvar\s+\w+\s*=|\bfunction\s*\(|getTime\(\)|\bdocument\.\w+")
# Markup left over from scraping in place of a title, e.g. `<span class="a-size-medium
# a-color-secondary a-text-normal`: a tag cut before its `>` (text cleaning removes only whole
# tags, so it survives it) or an HTML attribute. A `<` before a digit or a word that is not an
# HTML tag name stays text ("Tom <3 Jerry").
_MARKUP_FRAGMENT = re.compile(
    r"<\s*/?(?:a|b|br|div|em|font|h[1-6]|i|img|input|li|link|meta|ol|p|script|span|strong|style|"
    r"table|td|tr|u|ul)(?:\s|/|$)"
    r"|\b(?:class|style|href|src|alt|id)\s*=\s*[\"']",
    re.IGNORECASE)

# Category feature-sentence rule (2018 metadata), see is_feature_sentence.
FEATURE_MAX_WORDS = 6
FEATURE_MAX_CHARS = 50
# Joining words that taxonomy labels use in lower case ("Tools for Kids", "Games & Accessories").
_LABEL_JOINERS = frozenset(
    "a an and at by for from in of on or the to vs with".split())
_WORD_LETTERS = re.compile(r"[^\W\d_]+")

DESCRIPTION_MAX_CHARS = 2000


def _strip_tags(text: str) -> str:
    return _TAG.sub(" ", _INLINE_TAG.sub("", text)) if "<" in text else text


def clean_text(value: Any) -> str:
    """HTML entities unescaped (repeatedly, for double escaping), tags removed, control
    characters dropped, whitespace runs collapsed to one space, ends stripped."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    if "&" in text or "<" in text:
        for _ in range(_MAX_UNESCAPE_PASSES):
            unescaped = html.unescape(_strip_tags(text))
            if unescaped == text:
                break
            text = unescaped
        text = _strip_tags(text)
    if not text.isprintable():  # newlines, tabs or control characters: rare in titles
        text = text.translate(_CONTROL_TABLE)
    # str.split() collapses every whitespace run (8x faster than a regex on review texts).
    return " ".join(text.split())


def title_problem(title: str) -> str | None:
    """Why a cleaned title is not usable, or None when it is."""
    if not title:
        return "item_title_missing"
    if not any(ch.isalnum() for ch in title):
        return "item_title_unusable"
    if _SCRIPT.search(title) or is_markup_fragment(title):
        return "item_title_unusable"
    return None


def is_markup_fragment(title: str) -> bool:
    """True when a cleaned title still holds HTML: an unclosed tag or an attribute."""
    return ("<" in title or "=" in title) and _MARKUP_FRAGMENT.search(title) is not None


def is_feature_sentence(label: str, earlier: set[str]) -> bool:
    """True when a cleaned 2018 `category` element is a product feature, not a taxonomy label.

    Taxonomy labels are short Title-Case noun phrases ("Gamepads & Standard Controllers"); the
    feature bullets some 2018 records append read as sentences. An element is a feature when it
    is empty, has more than 6 words or 50 characters, ends with . ! ? or :, holds a colon
    ("ESRB Rating: Teen"), has an all-lower-case word of two or more letters other than a joining
    word ("Officially licensed by Nintendo"), or repeats an earlier element of the same path.
    """
    if not label or label in earlier:
        return True
    if len(label) > FEATURE_MAX_CHARS or len(label.split()) > FEATURE_MAX_WORDS:
        return True
    if label[-1] in ".!?:" or ":" in label:
        return True
    for word in _WORD_LETTERS.findall(label):
        if len(word) >= 2 and word.islower() and word not in _LABEL_JOINERS:
            return True
    return False


def _as_string_list(value: Any) -> list[str]:
    """A category field as a flat list of strings (a lone string, or a list of lists as in the
    older releases, are accepted); non-string leaves are dropped."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    out: list[str] = []
    if isinstance(value, (list, tuple)):
        for element in value:
            if isinstance(element, str):
                out.append(element)
            elif isinstance(element, (list, tuple)):
                out.extend(e for e in element if isinstance(e, str))
    return out


def clean_categories_2018(value: Any) -> tuple[list[str], int]:
    """The 2018 `category` path, cleaned, cut at its first feature sentence.

    Feature bullets are appended after the taxonomy path, so everything from the first feature
    on is dropped. Returns (path, number of elements removed)."""
    raw = _as_string_list(value)
    path: list[str] = []
    seen: set[str] = set()
    for element in raw:
        label = clean_text(element)
        if is_feature_sentence(label, seen):
            break
        path.append(label)
        seen.add(label)
    return path, len(raw) - len(path)


def clean_categories_2023(categories: Any, main_category: Any) -> list[str]:
    """The 2023 `categories` path cleaned (HTML, empties and repeats removed); when it is empty,
    `main_category` alone. The 2023 release carries no feature bullets in its categories."""
    path: list[str] = []
    for element in _as_string_list(categories):
        label = clean_text(element)
        if label and label not in path:
            path.append(label)
    if not path:
        main = clean_text(main_category) if isinstance(main_category, str) else ""
        if main:
            path.append(main)
    return path


def truncate(text: str, max_chars: int) -> str:
    """At most max_chars characters, cut at a word boundary, with an ellipsis when cut."""
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars - 1]
    space = cut.rfind(" ")
    if space > max_chars // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:-") + "…"


def clean_description(value: Any) -> str | None:
    """A description (string, or list of paragraphs) cleaned, joined with spaces, at most 2000
    characters; None when nothing is left."""
    parts = [clean_text(p) for p in _as_string_list(value)]
    text = " ".join(p for p in parts if p)
    return truncate(text, DESCRIPTION_MAX_CHARS) if text else None


def clean_optional(value: Any) -> str | None:
    """A free-text field (brand, review text, summary) cleaned; None when absent or empty."""
    if value is None:
        return None
    text = clean_text(value)
    return text or None
