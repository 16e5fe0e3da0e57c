"""Readers for the Amazon Reviews 2018 and 2023 file formats.

A file is read line by line (gzip or plain, recognised by its magic bytes), one JSON object a
line; each line becomes one normalised tuple or one malformed-line report. Nothing here holds
more than a line, so the callers decide what to keep.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from instructrec.training.data import cleaning
from instructrec.training.data.errors import (
    DataError, FormatDetectionError, MalformedLineError)

log = logging.getLogger(__name__)

AMAZON_2018 = "amazon2018"
AMAZON_2023 = "amazon2023"
FORMATS = (AMAZON_2018, AMAZON_2023)

_GZIP_MAGIC = b"\x1f\x8b"
# Lines inspected by detect_format; the first few decodable ones settle it.
_DETECT_LINES = 50


class ReviewRecord(NamedTuple):
    user: str
    item: str
    timestamp: int  # unix seconds
    rating: float | None
    text: str | None
    summary: str | None
    # Optional fields present with an unusable value (set to None, counted, never fatal).
    nulled: tuple[str, ...]


class MetaRecord(NamedTuple):
    item: str
    title: str  # cleaned; may be empty (the caller decides what an unusable title means)
    categories: list[str]
    brand: str | None
    description: str | None
    main_category: str | None
    category_elements_removed: int  # feature sentences cut from a 2018 `category`
    title_changed: bool  # cleaning changed the title (HTML entities or tags)


class RecordError(Exception):
    """A line is valid JSON but not a usable record; the message is the reason."""


# ----------------------------------------------------------------------------- line reading


def iter_lines(path: Path, progress: Callable[[int], None] | None = None
               ) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, stripped line) for every non-blank line. `progress` is called with
    the number of compressed bytes consumed since its last call, every 64k lines or so."""
    with open(path, "rb") as raw:
        stream: io.BufferedIOBase
        if raw.peek(2)[:2] == _GZIP_MAGIC:
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        else:
            stream = raw
        reported = 0
        number = 0
        try:
            for number, line in enumerate(stream, start=1):
                if progress is not None and (number & 0xFFFF) == 0:
                    position = raw.tell()
                    progress(position - reported)
                    reported = position
                line = line.strip()
                if line:
                    yield number, line
        except (EOFError, OSError, zlib.error) as exc:
            # A truncated or corrupt archive is a broken file, not a malformed line.
            raise DataError(f"{path}: unreadable after line {number}: {exc}") from exc
        if progress is not None:
            progress(os.path.getsize(path) - reported)


def decode_object(line: bytes) -> dict:
    """One line as a JSON object; RecordError with the reason otherwise."""
    try:
        # Decoding first skips json's encoding sniffing of bytes (~10% of the parse here).
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RecordError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise RecordError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise RecordError("invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # a number of more than 4,300 digits: Python refuses to convert it
        raise RecordError(f"invalid JSON: {str(exc)[:80]}") from None
    if not isinstance(value, dict):
        raise RecordError(f"expected a JSON object, got {type(value).__name__}")
    return value


@dataclass
class MalformedLog:
    """Counts malformed lines per file, keeps the first few as examples, logs a handful, and
    under `strict` raises the first one."""

    strict: bool = False
    max_examples: int = 20
    max_logged_per_file: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)

    def report(self, path: Path, line: int, reason: str) -> None:
        error = MalformedLineError(path, line, reason)
        if self.strict:
            raise error
        self.counts[str(path)] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(error.as_dict())
        if self.counts[str(path)] <= self.max_logged_per_file:
            log.warning("skipping malformed line %s", error)
        elif self.counts[str(path)] == self.max_logged_per_file + 1:
            log.warning("%s: more malformed lines; all are counted in stats.json", path)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# ----------------------------------------------------------------------------- field helpers


def _required_id(obj: dict, key: str) -> str:
    value = obj.get(key)
    if type(value) is str and value and not value[0].isspace() and not value[-1].isspace():
        return value  # the common case, checked first: this runs twice per record
    if value is None:
        raise RecordError(f"missing required field {key!r}")
    if not isinstance(value, str):
        # Numbers are refused too: both releases write every id as a string, and an id that went
        # through a number has lost its leading zeros (4 of the 17,332 Video Games asins start
        # with "0"), so it would silently stop matching its meta record.
        raise RecordError(f"field {key!r} must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise RecordError(f"field {key!r} is empty")
    return text


def _integer(value: Any) -> int | None:
    """An integer from an int, an integral float or a digit string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


# Times a review may carry, in unix seconds: those a calendar date can express (years 1 to 9999).
# Every later step needs one: the int64 `timestamp` column, and the instruction context that
# names the weekday and month of a purchase. Real logs sit far inside (the 2018 Video Games
# reviews span 1,400,000,000 to 1,456,764,800); a value outside is a damaged line.
MIN_TIMESTAMP = int(datetime(1, 1, 1, tzinfo=timezone.utc).timestamp())
MAX_TIMESTAMP = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp())


def _timestamp(value: Any, key: str, per_second: int = 1) -> int:
    """Unix seconds from the integer `value` (in 1/per_second units of a second); RecordError
    when it is not an integer or not a time a calendar can express."""
    number = _integer(value)
    if number is None:
        raise RecordError(f"field {key!r} is not an integer: {value!r:.40}")
    seconds = number // per_second
    if not MIN_TIMESTAMP <= seconds <= MAX_TIMESTAMP:
        raise RecordError(f"field {key!r} is out of range (not a date between years 1 and 9999): "
                          f"{value!r:.40}")
    return seconds


def _rating(obj: dict, key: str, nulled: list[str]) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        try:
            rating = float(value)
        except (TypeError, ValueError):
            rating = float("nan")
        if rating == rating and 0.0 <= rating <= 5.0:
            return rating
    nulled.append(key)
    return None


def _text(obj: dict, key: str, nulled: list[str]) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        nulled.append(key)
        return None
    return cleaning.clean_optional(value)


def _review_time_2018(text: Any) -> int | None:
    """The 2018 `reviewTime` ("09 7, 2015", month day, year), as unix seconds at UTC midnight."""
    if not isinstance(text, str):
        return None
    try:
        parsed = datetime.strptime(text.strip(), "%m %d, %Y")
    except ValueError:
        return None
    return int(parsed.replace(tzinfo=timezone.utc).timestamp())


# ----------------------------------------------------------------------------- record parsers


def parse_review_2018(obj: dict) -> ReviewRecord:
    user = _required_id(obj, "reviewerID")
    item = _required_id(obj, "asin")
    if "unixReviewTime" in obj:
        timestamp = _timestamp(obj["unixReviewTime"], "unixReviewTime")
    else:
        timestamp = _review_time_2018(obj.get("reviewTime"))
        if timestamp is None:
            raise RecordError(
                "missing required field 'unixReviewTime' (and no usable 'reviewTime')")
    nulled: list[str] = []
    rating = _rating(obj, "overall", nulled)
    text = _text(obj, "reviewText", nulled)
    summary = _text(obj, "summary", nulled)
    return ReviewRecord(user, item, timestamp, rating, text, summary, tuple(nulled))


def parse_review_2023(obj: dict) -> ReviewRecord:
    user = _required_id(obj, "user_id")
    # parent_asin groups the variants (colours, sizes) of one product; asin when it is absent.
    item = _required_id(obj, "parent_asin" if obj.get("parent_asin") is not None else "asin")
    if "timestamp" not in obj:
        raise RecordError("missing required field 'timestamp'")
    timestamp = _timestamp(obj["timestamp"], "timestamp", per_second=1000)
    nulled: list[str] = []
    rating = _rating(obj, "rating", nulled)
    text = _text(obj, "text", nulled)
    summary = _text(obj, "title", nulled)
    return ReviewRecord(user, item, timestamp, rating, text, summary, tuple(nulled))


def _raw_title(obj: dict) -> str:
    title = obj.get("title")
    return title if isinstance(title, str) else ""


def parse_meta_2018(obj: dict) -> MetaRecord:
    item = _required_id(obj, "asin")
    raw_title = _raw_title(obj)
    title = cleaning.clean_text(raw_title)
    categories, removed = cleaning.clean_categories_2018(obj.get("category"))
    return MetaRecord(
        item=item, title=title, categories=categories,
        brand=cleaning.clean_optional(obj.get("brand")),
        description=cleaning.clean_description(obj.get("description")),
        main_category=cleaning.clean_optional(obj.get("main_cat")),
        category_elements_removed=removed,
        title_changed=title != raw_title.strip(),
    )


def parse_meta_2023(obj: dict) -> MetaRecord:
    item = _required_id(obj, "parent_asin")
    raw_title = _raw_title(obj)
    title = cleaning.clean_text(raw_title)
    main_category = obj.get("main_category")
    brand = obj.get("store")
    details = obj.get("details")
    if brand is None and isinstance(details, dict):
        brand = details.get("Brand") or details.get("brand")
    return MetaRecord(
        item=item, title=title,
        categories=cleaning.clean_categories_2023(obj.get("categories"), main_category),
        brand=cleaning.clean_optional(brand),
        description=cleaning.clean_description(obj.get("description")),
        main_category=(cleaning.clean_optional(main_category)
                       if isinstance(main_category, str) else None),
        category_elements_removed=0,
        title_changed=title != raw_title.strip(),
    )


REVIEW_PARSERS: dict[str, Callable[[dict], ReviewRecord]] = {
    AMAZON_2018: parse_review_2018, AMAZON_2023: parse_review_2023}
META_PARSERS: dict[str, Callable[[dict], MetaRecord]] = {
    AMAZON_2018: parse_meta_2018, AMAZON_2023: parse_meta_2023}


def read_records(path: Path, parser: Callable[[dict], Any], malformed: MalformedLog,
                 progress: Callable[[int], None] | None = None) -> Iterator[Any]:
    """Parsed records of one file; a line that fails goes to `malformed` and is skipped."""
    for number, line in iter_lines(path, progress):
        try:
            yield parser(decode_object(line))
        except RecordError as exc:
            malformed.report(path, number, str(exc))


# ----------------------------------------------------------------------------- detection

# Keys that only the 2023 release uses (its reviews also carry `asin`, so a 2023 key wins), and
# keys of the 2018 release.
_KEYS_2023 = frozenset({"user_id", "parent_asin", "text", "main_category", "categories", "store"})
_KEYS_2018 = frozenset({"reviewerID", "asin", "unixReviewTime", "overall", "reviewText",
                        "category", "main_cat"})


# Keys that tell a review file from an item metadata file, per release (both kinds carry `asin`
# and, in 2023, `title` and `parent_asin`, so those decide nothing).
_KIND_KEYS = {
    (AMAZON_2018, "reviews"): frozenset({"reviewerID", "unixReviewTime", "reviewTime", "overall",
                                         "reviewText", "reviewerName"}),
    (AMAZON_2018, "meta"): frozenset({"category", "main_cat", "also_buy", "also_view", "feature",
                                      "rank", "brand"}),
    (AMAZON_2023, "reviews"): frozenset({"user_id", "timestamp", "rating", "text",
                                         "helpful_vote", "verified_purchase"}),
    (AMAZON_2023, "meta"): frozenset({"main_category", "categories", "store", "details",
                                      "average_rating", "rating_number", "features"}),
}


def sniff(path: Path) -> tuple[str, str] | None:
    """(format, "reviews" | "meta") that the keys of a file's first decodable lines look like,
    or None when they match neither kind of either release. Used to explain a file that gave no
    record (swapped --reviews and --meta, or a forced --format that does not fit)."""
    votes: Counter = Counter()
    try:
        for count, (_, line) in enumerate(iter_lines(path)):
            if count >= _DETECT_LINES:
                break
            try:
                keys = set(decode_object(line))
            except RecordError:
                continue
            scores = {kind: len(keys & wanted) for kind, wanted in _KIND_KEYS.items()}
            best = max(scores.values())
            if best:
                votes.update(kind for kind, score in scores.items() if score == best)
    except (OSError, DataError):
        return None
    return votes.most_common(1)[0][0] if votes else None


def detect_format(path: Path) -> str:
    """amazon2018 or amazon2023, from the keys of the first decodable lines; the file name
    (.jsonl for 2023, .json for 2018) decides only when no line can be decoded."""
    votes = Counter()
    try:
        for count, (_, line) in enumerate(iter_lines(path)):
            if count >= _DETECT_LINES or sum(votes.values()) >= 5:
                break
            try:
                keys = set(decode_object(line))
            except RecordError:
                continue
            if keys & _KEYS_2023:
                votes[AMAZON_2023] += 1
            elif keys & _KEYS_2018:
                votes[AMAZON_2018] += 1
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if len(votes) == 1:
        return next(iter(votes))
    if not votes:
        name = path.name.lower().removesuffix(".gz")
        if name.endswith(".jsonl"):
            return AMAZON_2023
        if name.endswith(".json"):
            return AMAZON_2018
    raise FormatDetectionError(
        f"{path}: cannot tell amazon2018 from amazon2023 (keys seen: {dict(votes) or 'none'}); "
        "pass --format explicitly")
