"""Instruction text: sanitised slot values, history and candidate lists, the source-token budget,
and the engine's entry points `render` (text and token ids), `build_instruction` and `lists_candidates`.

Formats (chosen here, used by training and inference alike so the model sees one layout):
- history: titles oldest to newest joined by "; " (no quotes: a quote glued to a title's first
  word changes how the T5 tokenizer splits that word, so a title would read differently in the
  history than as a candidate or target);
- candidates: a numbered list, one per line, "1. Title\\n2. Title" (the T5 tokenizer reads the
  line breaks as spaces; the numbers keep the items apart);
- slot values: line breaks and tabs become spaces, other control and invisible format characters
  are dropped, whitespace is collapsed, and braces become parentheses. T5's vocabulary has no
  braces (they encode as <unk>), and this way no value can ever carry a `{slot}` placeholder.

Budget: the source must fit `max_source_tokens` tokens of the model's tokenizer, counted as
`len(tokenizer(text).input_ids)` (including `</s>`). The oldest history items are dropped first,
at least the newest one is kept, and candidates are never cut; when that is not enough the
request fails with `BudgetExceededError`. A text longer than `MAX_CHARS_PER_TOKEN` characters per
budget token fails the same way without being tokenized (oldest history items are dropped to get
under that cap first), so no size of input costs more than a bounded tokenization to refuse.
`render` returns the token ids it counted, so the engine never tokenizes a fitted text twice.
No torch import here: the tokenizer is passed in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Iterable, Mapping, Protocol

from .errors import BudgetExceededError, InputError
from .templates import (
    MAX_HISTORY_ITEMS, PLACEHOLDER, Intention, Preference, Template, TargetKind, TaskForm,
    default_template, get_template,
)

__all__ = [
    "RenderedInstruction", "TokenizerLike", "sanitize_text", "format_history", "format_candidate_list",
    "render_template", "render", "build_instruction", "lists_candidates", "max_source_chars", "CANDIDATES_PLACEHOLDER",
    "HISTORY_SEPARATOR", "DEFAULT_MAX_SOURCE_TOKENS", "MAX_CHARS_PER_TOKEN", "INTENTION_KINDS",
]

logger = logging.getLogger(__name__)

CANDIDATES_PLACEHOLDER = "{candidates}"
HISTORY_SEPARATOR = "; "
# Flan-T5 was tuned with 512-token sources; the original method uses the same limit.
DEFAULT_MAX_SOURCE_TOKENS = 512
# Characters per token above which a text is refused without tokenizing it (see max_source_chars).
# Real text is far below: the 19,885 titles of ../shared/data (Video Games 2018 meta and the 2023
# sample, real Flan-T5 tokenizer) average 3.1 characters per token and reach 7.8 at most; the
# sanitiser has already collapsed runs of whitespace in every slot value, so 32 leaves 4x margin.
MAX_CHARS_PER_TOKEN = 32
INTENTION_KINDS = {"vague": Intention.VAGUE, "specific": Intention.SPECIFIC}


class TokenizerLike(Protocol):
    """A Hugging Face tokenizer, or anything called the same way."""

    def __call__(self, text: Any, add_special_tokens: bool = True) -> Any: ...


_BRACES_TO_PARENTHESES = str.maketrans("{}", "()")


def _clean_character(char: str) -> str:
    if char.isprintable():
        return char
    # Line breaks, tabs and other separators read as spaces, never gluing two words together;
    # the rest (control, invisible format, surrogate, private-use characters) is dropped.
    return " " if char.isspace() else ""


def sanitize_text(value: str) -> str:
    """One line of plain text: no control characters, no braces, single spaces, no edges."""
    if not value.isprintable():  # the rare slow path: most titles are printable already
        value = "".join(map(_clean_character, value))
    if "{" in value or "}" in value:
        value = value.translate(_BRACES_TO_PARENTHESES)
    return " ".join(value.split())


@dataclass(frozen=True)
class RenderedInstruction:
    source: str
    target: str | None  # None when the template's target slots were not all given
    dropped_history: int  # oldest history items left out (item cap and token budget together)
    source_tokens: int | None = None  # counted when a tokenizer was given
    source_ids: list[int] | None = None  # the ids counted (closing </s> included), with a tokenizer


# ---- slot values ------------------------------------------------------------------------------


def _is_given(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if hasattr(value, "__len__"):
        return len(value) > 0
    return True


def _clean_text(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InputError(field, f"must be text, got {type(value).__name__}")
    cleaned = sanitize_text(value)
    if not cleaned:
        raise InputError(field, "is empty once control characters and whitespace are removed",
                         "give readable text or leave the field null")
    return cleaned


def _clean_titles(field: str, values: Any) -> list[str]:
    if isinstance(values, (str, bytes, Mapping)):
        raise InputError(field, f"must be a list of titles, got {type(values).__name__}",
                         f"pass {field} as a list, e.g. ['Title one', 'Title two']")
    try:
        items = list(values)
    except TypeError:
        raise InputError(field, f"must be a list of titles, got {type(values).__name__}") from None
    if not items:
        raise InputError(field, "is empty", f"give at least one title or leave {field} null")
    titles = []
    for position, title in enumerate(items):
        if title is None:
            raise InputError(f"{field}[{position}]", "is null", "every title must be text")
        titles.append(_clean_text(f"{field}[{position}]", title))
    return titles


def _clean_label(value: Any) -> bool:
    # numpy/pyarrow booleans arrive from Parquet rows; they carry a boolean dtype.
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b":
        return bool(value)
    raise InputError("label", f"must be a boolean (True for a positive item), got {type(value).__name__}")


def format_history(titles: Iterable[str]) -> str:
    """Past items oldest to newest, e.g. "Alpha; Beta; Gamma"."""
    return HISTORY_SEPARATOR.join(_clean_titles("history", titles))


def format_candidate_list(titles: Iterable[str]) -> str:
    """Candidates numbered from 1, one per line: "1. Alpha\\n2. Beta"."""
    if titles is None:
        raise InputError("candidates", "are required to list candidates but none were given")
    return _numbered(_clean_titles("candidates", titles))


def _numbered(titles: list[str]) -> str:
    return "\n".join(f"{number}. {title}" for number, title in enumerate(titles, start=1))


def _substitute(pattern: str, values: Mapping[str, str]) -> str:
    # One pass over the pattern: substituted values are never scanned again for placeholders.
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], pattern)


# ---- rendering ---------------------------------------------------------------------------------


def _encode(tokenizer: TokenizerLike, text: str) -> list[int]:
    """The token ids of `text` as the model reads it (closing </s> included): what is counted."""
    if hasattr(tokenizer, "model_max_length"):
        # A Hugging Face tokenizer warns when a text exceeds model_max_length; counting an
        # untrimmed text is how the budget fit decides to trim it, so that warning is noise here.
        return list(tokenizer(text, verbose=False).input_ids)
    return list(tokenizer(text).input_ids)


def max_source_chars(max_source_tokens: int) -> int:
    """The longest text (in characters) that is tokenized to be counted at all; a longer one is over
    budget without tokenizing it, so no size of user text costs more than this to refuse."""
    return max_source_tokens * MAX_CHARS_PER_TOKEN


def _check_budget_argument(max_source_tokens: Any) -> None:
    if isinstance(max_source_tokens, bool) or not isinstance(max_source_tokens, int) or max_source_tokens < 1:
        raise InputError("max_source_tokens", f"must be a positive integer, got {max_source_tokens!r}")


def render_template(template: Template | str, slots: Mapping[str, Any], *, tokenizer: TokenizerLike | None = None,
                    max_source_tokens: int = DEFAULT_MAX_SOURCE_TOKENS,
                    max_history_items: int = MAX_HISTORY_ITEMS) -> RenderedInstruction:
    """Fill `template` from `slots` (extra keys are ignored, so one row's full record can be passed
    to every template). Every source slot is required; the target is made when all of the
    template's target slots are given, else it is None. With a tokenizer the source is fitted to
    `max_source_tokens` by dropping the oldest history items, and its token ids are returned."""
    if isinstance(template, str):
        template = get_template(template)
    _check_budget_argument(max_source_tokens)
    if isinstance(max_history_items, bool) or not isinstance(max_history_items, int) or max_history_items < 1:
        raise InputError("max_history_items", f"must be a positive integer, got {max_history_items!r}")
    values: dict[str, str] = {}
    history: list[str] = []
    candidates: list[str] | None = None
    for name in template.slots:
        value = slots.get(name)
        if not _is_given(value):
            raise InputError(name, f"is required by template {template.id} but is missing or empty",
                             f"give {name}, or choose a template without it: instructrec instructions templates")
        if name == "history":
            history = _clean_titles(name, value)
        elif name == "candidates":
            candidates = _clean_titles(name, value)
            values[name] = _numbered(candidates)
        else:
            values[name] = _clean_text(name, value)

    dropped = max(0, len(history) - max_history_items)
    if dropped:
        history = history[dropped:]
        logger.debug("template %s: kept the newest %d of %d history items", template.id, len(history),
                     len(history) + dropped)

    ids: list[int] | None = None
    if "history" in template.slots:
        before, after = template.source.split("{history}")
        source, dropped_for_budget, ids = _fit_history(template, values, _substitute(before, values),
                                                       _substitute(after, values), history, tokenizer,
                                                       max_source_tokens)
        dropped += dropped_for_budget
    else:
        source = _substitute(template.source, values)
        if tokenizer is not None:
            if len(source) > max_source_chars(max_source_tokens):
                raise _over_budget(template, values, [], f"{len(source):,} characters", max_source_tokens)
            ids = _encode(tokenizer, source)
            if len(ids) > max_source_tokens:
                raise _over_budget(template, values, [], f"{len(ids)} source tokens", max_source_tokens)
    target = _make_target(template, slots, values, candidates)
    return RenderedInstruction(source=source, target=target, dropped_history=dropped,
                               source_tokens=None if ids is None else len(ids), source_ids=ids)


def _fit_history(template: Template, values: Mapping[str, str], before: str, after: str, history: list[str],
                 tokenizer: TokenizerLike | None, budget: int) -> tuple[str, int, list[int] | None]:
    """The source with the longest suffix of `history` (newest items) that fits `budget`, the
    number of items dropped, and its token ids (None without a tokenizer).

    Tokenizing the full text per dropped item would cost up to 20 encodes per request. Instead
    the items are tokenized once (one batch call), their counts give the estimated total after
    dropping k items, and one or two exact counts confirm the estimate; the estimate is off only
    by the token or two where a list edge meets the surrounding words. Items are first dropped
    (oldest first) while the text is over the character cap, so a huge item is never tokenized.
    """

    def text(dropped: int) -> str:
        return before + HISTORY_SEPARATOR.join(history[dropped:]) + after

    if tokenizer is None:
        return text(0), 0, None
    most_droppable = len(history) - 1  # the newest item always stays: a P1 text needs a history
    first = 0
    while len(text(first)) > max_source_chars(budget) and first < most_droppable:
        first += 1
    if len(text(first)) > max_source_chars(budget):
        raise _over_budget(template, values, history[first:], f"{len(text(first)):,} characters", budget)
    ids = _encode(tokenizer, text(first))
    if len(ids) <= budget:
        return text(first), first, ids
    if first == most_droppable:
        raise _over_budget(template, values, history[first:], f"{len(ids)} source tokens", budget)
    # Each dropped item takes its title and the separator after it out of the text.
    pieces = [title + HISTORY_SEPARATOR.strip() for title in history[first:most_droppable]]
    piece_counts = [len(x) for x in tokenizer(pieces, add_special_tokens=False).input_ids]
    removed = dict(zip(range(first + 1, most_droppable + 1), accumulate(piece_counts)))  # tokens gone at k dropped
    total = len(ids)
    dropped = next((k for k in range(first + 1, most_droppable + 1) if total - removed[k] <= budget), most_droppable)

    known_over = first  # the largest drop count known not to fit
    ids = _encode(tokenizer, text(dropped))
    while len(ids) > budget and dropped < most_droppable:
        known_over = dropped
        dropped += 1
        ids = _encode(tokenizer, text(dropped))
    if len(ids) > budget:
        raise _over_budget(template, values, history[dropped:], f"{len(ids)} source tokens", budget)
    while dropped - 1 > known_over:  # keep one more item while it still fits
        fewer = _encode(tokenizer, text(dropped - 1))
        if len(fewer) > budget:
            break
        dropped, ids = dropped - 1, fewer
    logger.debug("template %s: dropped the %d oldest history items to fit %d source tokens",
                 template.id, dropped, budget)
    return text(dropped), dropped, ids


def _over_budget(template: Template, values: Mapping[str, str], kept_history: list[str], size: str,
                 budget: int) -> BudgetExceededError:
    """The error for a source of `size` ("636 source tokens", "40,000 characters") over `budget`,
    blaming the slot that takes most of the text: the listed candidates (fixed by smaller
    tournament groups), the one history item that is always kept, or a text field."""
    kept = " with only the newest history item kept" if len(kept_history) == 1 else ""
    sizes = {name: len(values[name]) for name in ("candidates", "preference", "intention", "context")
             if name in values}
    if "history" in template.slots:
        sizes["history"] = len(HISTORY_SEPARATOR.join(kept_history))
    field = max(sizes, key=lambda name: sizes[name], default="instruction")
    problem = f"template {template.id} needs {size}{kept}, over the budget of {budget} source tokens"
    if field == "candidates":
        return BudgetExceededError(
            "candidates", f"{problem}: its {values['candidates'].count(chr(10)) + 1} listed candidates are most "
                          "of the text",
            "list fewer candidates per instruction: the tournament's smaller group size avoids this, "
            "or raise max_source_tokens")
    if field == "history" and kept:
        return BudgetExceededError("history", f"{problem}: the newest history item alone is "
                                              f"{sizes['history']:,} characters long",
                                   "shorten that title or raise max_source_tokens")
    return BudgetExceededError(field, problem, f"shorten {field} or raise max_source_tokens")


def _make_target(template: Template, slots: Mapping[str, Any], source_values: Mapping[str, str],
                 candidates: list[str] | None) -> str | None:
    if not all(_is_given(slots.get(name)) for name in template.target_slots):
        return None
    values: dict[str, str] = {}
    for name in PLACEHOLDER.findall(template.resolved_target_pattern):
        if name == "answer":
            values[name] = "Yes" if _clean_label(slots["label"]) else "No"
        elif name == "latest_history_item":
            values[name] = _clean_titles("history", slots["history"])[-1]
        else:
            values[name] = source_values.get(name) or _clean_text(name, slots[name])
    title = values.get("target_title")
    if template.target_kind is TargetKind.CHOICE and title not in (source_values["item_a"], source_values["item_b"]):
        raise InputError("target_title", f"must be item_a or item_b for the pairwise template {template.id}",
                         "set target_title to the title of the preferred item")
    if template.task is TaskForm.RERANKING and title not in (candidates or ()):
        raise InputError("target_title", f"is not among the listed candidates of template {template.id}",
                         "include the target item in candidates")
    return _substitute(template.resolved_target_pattern, values)


# ---- engine entry points -----------------------------------------------------------------------


def _free_instruction(instruction: Any, candidates: Any, tokenizer: TokenizerLike | None,
                      max_source_tokens: int) -> tuple[str, list[int] | None]:
    if not isinstance(instruction, str):
        raise InputError("instruction", f"must be text, got {type(instruction).__name__}")
    if not instruction.strip():
        raise InputError("instruction", "is empty", "write the user's need, or leave it null and give structured fields")
    listed = CANDIDATES_PLACEHOLDER in instruction
    if listed:
        if not _is_given(candidates):
            raise InputError("candidates", "the instruction contains {candidates} but no candidates were given")
        # str.replace is one pass, and listed titles have no braces left after sanitising.
        instruction = instruction.replace(CANDIDATES_PLACEHOLDER, format_candidate_list(candidates))
    if tokenizer is None:
        return instruction, None
    too_long = len(instruction) > max_source_chars(max_source_tokens)
    ids = None if too_long else _encode(tokenizer, instruction)
    if too_long or len(ids) > max_source_tokens:  # type: ignore[arg-type]
        size = f"{len(instruction):,} characters" if too_long else f"{len(ids)} source tokens"  # type: ignore[arg-type]
        if listed:
            raise BudgetExceededError(
                "candidates", f"the instruction with its listed candidates needs {size}, "
                              f"over the budget of {max_source_tokens} source tokens",
                "list fewer candidates per instruction: the tournament's smaller group size avoids this, "
                "or raise max_source_tokens")
        raise BudgetExceededError(
            "instruction", f"needs {size}, over the budget of {max_source_tokens} source tokens",
            "shorten the instruction, free text is never truncated, or raise max_source_tokens")
    return instruction, ids


def _request_intention(intention: Any, intention_kind: Any) -> Intention:
    if intention_kind is not None and intention_kind not in INTENTION_KINDS:
        raise InputError("intention_kind", f"must be one of {sorted(INTENTION_KINDS)}, got {intention_kind!r}")
    if not _is_given(intention):
        if intention_kind is not None:
            raise InputError("intention_kind", "is given without an intention", "give the intention text too")
        return Intention.NONE
    # A free-text intention with no declared kind reads as a vague need: vague templates phrase
    # it as "what they are looking for", which fits any wording.
    return INTENTION_KINDS[intention_kind or "vague"]


def _resolve_template(*, template: Any, history: Any, preference: Any, intention: Any, intention_kind: Any,
                      context: Any) -> Template:
    """The template a structured request is formatted with: the given id, or the default."""
    given = {name for name, value in (("history", history), ("preference", preference),
                                      ("intention", intention), ("context", context)) if _is_given(value)}
    requested_intention = _request_intention(intention, intention_kind)
    if template is None:
        if not given - {"context"}:
            raise InputError("instruction", "no user need given: no instruction, history, preference or intention",
                             "give a free-text instruction or at least one of history, preference, intention")
        preference_kind = {
            (True, True): Preference.HISTORY_AND_EXPLICIT, (True, False): Preference.HISTORY,
            (False, True): Preference.EXPLICIT, (False, False): Preference.NONE,
        }["history" in given, "preference" in given]
        return default_template(preference_kind, requested_intention, "context" in given)

    chosen = get_template(template)
    if not chosen.ranks_titles:
        needs = sorted(set(chosen.slots) - {"history", "preference", "intention", "context", "candidates"})
        reason = (f"its source needs {', '.join(needs)}, which a request does not carry" if needs
                  else f"its target is {chosen.target_kind.value}, not an item title")
        raise InputError("template", f"template {chosen.id} is for building training data: {reason}",
                         "choose a template whose ranks_titles is true (instructrec instructions templates)")
    unused = sorted(given - set(chosen.slots))
    if unused:
        raise InputError(unused[0], f"is given but template {chosen.id} has no slot for it "
                                    f"(it uses {', '.join(chosen.slots)})",
                         f"leave {unused[0]} null or choose a template that uses it")
    if intention_kind is not None and requested_intention is not chosen.intention:
        raise InputError("intention_kind", f"is {intention_kind!r} but template {chosen.id} "
                                           f"takes a {chosen.intention.name.lower()} intention",
                         "match intention_kind to the template or leave it null")
    return chosen


def render(*, instruction: str | None = None, history: Iterable[str] | None = None,
           preference: str | None = None, intention: str | None = None, intention_kind: str | None = None,
           context: str | None = None, template: str | None = None, candidates: Iterable[str] | None = None,
           tokenizer: TokenizerLike | None = None,
           max_source_tokens: int = DEFAULT_MAX_SOURCE_TOKENS) -> tuple[str, list[int] | None]:
    """The source text for one request (or one tournament group), and with a tokenizer the token
    ids it was counted with (closing </s> included), which are the model's input as they are.

    - `instruction` (free text): `{candidates}` in it becomes the numbered list of `candidates`;
      nothing else is changed or truncated. Cannot be combined with `template` or structured fields.
    - Structured fields: formatted with `template` when given, else with the default for the
      fields present (`DEFAULT_TEMPLATE_IDS`: a T2 matching form, candidates not listed, since the
      engine scores every candidate title as the target). `intention_kind` is "vague" or
      "specific"; null reads as vague. `candidates` are listed only by templates whose text lists
      them (T3); otherwise they are not used here.
    With a tokenizer, a text over `max_source_tokens` (after dropping the oldest history items)
    raises BudgetExceededError; a text over `max_source_chars(max_source_tokens)` characters does
    so without being tokenized.
    """
    _check_budget_argument(max_source_tokens)
    if instruction is not None:
        if template is not None:
            raise InputError("template", "cannot be combined with a free-text instruction",
                             "give either instruction, or structured fields with an optional template")
        extra = [name for name, value in (("history", history), ("preference", preference),
                                          ("intention", intention), ("intention_kind", intention_kind),
                                          ("context", context)) if _is_given(value)]
        if extra:
            raise InputError(extra[0], "cannot be combined with a free-text instruction, which already states the need",
                             f"leave {extra[0]} null, or leave instruction null to format the structured fields")
        return _free_instruction(instruction, candidates, tokenizer, max_source_tokens)

    chosen = _resolve_template(template=template, history=history, preference=preference, intention=intention,
                               intention_kind=intention_kind, context=context)
    slots = {"history": history, "preference": preference, "intention": intention, "context": context,
             "candidates": candidates}
    rendered = render_template(chosen, slots, tokenizer=tokenizer, max_source_tokens=max_source_tokens)
    return rendered.source, rendered.source_ids


def build_instruction(**fields: Any) -> str:
    """The source text of `render` (same arguments) without its token ids."""
    return render(**fields)[0]


def lists_candidates(*, instruction: str | None = None, template: str | None = None,
                     history: Iterable[str] | None = None, preference: str | None = None,
                     intention: str | None = None, intention_kind: str | None = None,
                     context: str | None = None) -> bool:
    """Whether the request's text lists its candidates (free text with `{candidates}`, or a T3
    template), so that many candidates must be split into tournament groups. The defaults for
    structured fields never list them. The structured fields do not change the answer; they are
    accepted so that a request's fields can be passed as they are."""
    if instruction is not None:
        if template is not None:
            raise InputError("template", "cannot be combined with a free-text instruction",
                             "give either instruction, or structured fields with an optional template")
        if not isinstance(instruction, str):
            raise InputError("instruction", f"must be text, got {type(instruction).__name__}")
        return CANDIDATES_PLACEHOLDER in instruction
    if template is not None:
        return get_template(template).lists_candidates
    return False
