"""`prepare`: raw Amazon review logs to clean Parquet tables, splits and evaluation candidates.

Order of the steps (docs/data.md states the same):
1. read reviews, streaming: compact columns in memory (int ids, time, rating), texts spilled;
2. de-duplicate (user, item), keeping the earliest (time, then file order);
3. read meta for the reviewed items only; drop interactions whose item has no meta record or no
   usable title (before k-core, so the k-core guarantee holds on the final data);
4. iterative k-core;
5. chronological sequences (ties in time keep file order), leave-one-out splits;
6. product-search item splits, sampled negatives, tables and stats.json (written last).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from instructrec.training.data import cleaning, formats
from instructrec.training.data.errors import DataError, EmptyResultError, FormatDetectionError
from instructrec.training.data.kcore import k_core as k_core_filter
from instructrec.training.data.sampling import leave_one_out, sample_candidates, search_split
from instructrec.training.data.spill import TextSpill

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
SPLIT_NAMES = ("train", "valid", "test")

# Item review_text: the first 3 train-split reviews of the item that have text, each cut to
# 200 characters, joined with " | " (at most ~610 characters: a few cues, not a document).
ITEM_SNIPPETS = 3
ITEM_SNIPPET_CHARS = 200
ITEM_SNIPPET_SEPARATOR = " | "
# Rows per Parquet row group of the interactions and items tables: bounds the texts held while
# writing (16k rows of ~800-character reviews: ~30 MB with their Arrow copy).
WRITE_CHUNK_ROWS = 16_384

ITEMS_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("title", pa.string()), ("categories", pa.list_(pa.string())),
    ("brand", pa.string()), ("description", pa.string()), ("review_text", pa.string()),
    ("n_interactions", pa.int32()), ("main_category", pa.string()),
])
INTERACTIONS_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64()),
    ("rating", pa.float32()), ("review_text", pa.string()), ("summary", pa.string()),
    ("position", pa.int32()), ("split", pa.string()),
])
SEARCH_SPLITS_SCHEMA = pa.schema([("item_id", pa.string()), ("split", pa.string())])
CANDIDATES_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("split", pa.string()), ("target_item_id", pa.string()),
    ("negative_ids", pa.list_(pa.string())), ("candidate_ids", pa.list_(pa.string())),
])

# Every discard reason, present in stats.json even when zero. For reviews:
# lines read = interactions kept + the sum of the review_* counts.
REVIEW_DISCARDS = (
    "review_malformed_line", "review_duplicate_pair", "review_item_without_meta",
    "review_item_title_missing", "review_item_title_unusable", "review_k_core",
)
META_DISCARDS = ("meta_malformed_line", "meta_duplicate_item", "meta_item_not_reviewed")
# Past this share of the interactions removed by the k-core, prepare warns (log, stats.json
# `warnings`, the stats table) and names the --k-core values that keep more. A k-core suited to
# the data trims a tail: the reference 5-core of the 2018 Video Games reviews removes 23.6% of
# them (342,329 -> 261,407); on a category slice whose items mostly have fewer than 5 reviews
# the 5-core removed 99.9% (2,991 users -> 7) and every later step ran on what was left.
K_CORE_WARN_REMOVED_SHARE = 0.5


@dataclass
class PreparedData:
    """The tables a prepared directory holds (pyarrow) and its stats."""

    items: pa.Table
    interactions: pa.Table
    search_splits: pa.Table
    candidates: pa.Table
    stats: dict


def load_prepared(directory: PathLike) -> PreparedData:
    directory = Path(directory)
    stats_path = directory / "stats.json"
    if not stats_path.exists():
        raise DataError(f"{directory}: no stats.json; run `instructrec data prepare` into it first")
    return PreparedData(
        items=pq.read_table(directory / "items.parquet"),
        interactions=pq.read_table(directory / "interactions.parquet"),
        search_splits=pq.read_table(directory / "search_splits.parquet"),
        candidates=pq.read_table(directory / "candidates.parquet"),
        stats=json.loads(stats_path.read_text()),
    )


# ----------------------------------------------------------------------------- reading


def _as_paths(value: PathLike | Sequence[PathLike], what: str) -> list[Path]:
    values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    if not values:
        raise DataError(f"no {what} file given")
    paths = [Path(v) for v in values]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{what} file {path} does not exist or is not a file")
    return paths


def resolve_format(requested: str, reviews: list[Path], meta: list[Path]) -> str:
    if requested != "auto":
        if requested not in formats.FORMATS:
            raise DataError(f"unknown format {requested!r}; use auto, {', '.join(formats.FORMATS)}")
        return requested
    detected = {str(p): formats.detect_format(p) for p in [*reviews, *meta]}
    found = set(detected.values())
    if len(found) > 1:
        raise FormatDetectionError(
            f"the input files are of different formats ({detected}); pass files of one format")
    return found.pop()


def _check_kinds(reviews: list[Path], meta: list[Path]) -> None:
    """Refuse, before reading them, review files that look like item metadata and the reverse.
    (A 2023 review line even parses as a meta record: same `parent_asin` and `title` keys.)"""
    for paths, want in ((reviews, "reviews"), (meta, "meta")):
        for path in paths:
            problem = _kind_problem(path, want)
            if problem is not None:
                raise FormatDetectionError(problem)


def _kind_problem(path: Path, want: str) -> str | None:
    looks = formats.sniff(path)
    if looks is None or looks[1] == want:
        return None
    kind = "an item metadata" if looks[1] == "meta" else "a review"
    return (f"{path} looks like {kind} file ({looks[0]}) but was given as --{want}: are --reviews "
            "and --meta swapped?")


def _no_record_hint(paths: list[Path], want: str, fmt: str, requested: str) -> str:
    """Why files of kind `want` ("reviews" or "meta") gave nothing usable: the likely mistake,
    from what their first lines look like."""
    for path in paths:
        looks = formats.sniff(path)
        if looks is None:
            continue
        looks_fmt, looks_kind = looks
        if looks_kind != want:
            return _kind_problem(path, want)
        if looks_fmt != fmt:
            how = f"--format {requested} was given" if requested != "auto" else f"{fmt} was detected"
            return (f"{path} looks like an {looks_fmt} {want} file but {how}: pass --format "
                    f"{looks_fmt} (or auto)")
    return ("none of their lines has the fields of an " + fmt + " " + want + " record; see "
            "the malformed-line warnings above for the first reasons")


def _k_core_alternatives(users: np.ndarray, items: np.ndarray, k_core: int) -> dict[int, int]:
    """Interactions kept by each --k-core value below `k_core`, from k_core - 1 down to the first
    one that keeps at least half of them (1, no filter, keeps all)."""
    kept: dict[int, int] = {}
    for k in range(k_core - 1, 0, -1):
        kept[k] = len(k_core_filter(users, items, k)[0])
        if kept[k] >= (1 - K_CORE_WARN_REMOVED_SHARE) * len(users):
            break
    return kept


def _k_core_warning(k_core: int, before: int, after: int, before_users: int, after_users: int,
                    alternatives: dict[int, int]) -> str:
    share = 1 - after / before
    options = ", ".join(f"--k-core {k}{' (no filter)' if k == 1 else ''} keeps {n:,} ({n / before:.0%})"
                        for k, n in alternatives.items())
    best = next(reversed(alternatives))
    return (f"the {k_core}-core removed {share:.1%} of the interactions ({before:,} -> {after:,}; "
            f"users {before_users:,} -> {after_users:,}): most users or items of this data have fewer "
            f"than {k_core} interactions, so lower --k-core: {options}; --k-core {best} keeps most of it")


def _progress_bar(paths: list[Path], what: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True,
                desc=f"reading {what}", file=sys.stderr, disable=not enabled, leave=False)


@dataclass
class _Reviews:
    """Compact per-record columns; record r's texts live in spill at index r."""

    user_index: dict[str, int]
    item_index: dict[str, int]
    user: np.ndarray  # int32 [R]
    item: np.ndarray  # int32 [R]
    timestamp: np.ndarray  # int64 [R]
    rating: np.ndarray  # float32 [R], NaN for null
    spill: TextSpill
    nulled: Counter


def _read_reviews(paths: list[Path], fmt: str, malformed: formats.MalformedLog,
                  spill: TextSpill, progress: bool) -> _Reviews:
    parser = formats.REVIEW_PARSERS[fmt]
    user_index: dict[str, int] = {}
    item_index: dict[str, int] = {}
    users, items = array("i"), array("i")
    timestamps, ratings = array("q"), array("f")
    nulled: Counter = Counter()
    nan = float("nan")
    with _progress_bar(paths, "reviews", progress) as bar:
        for path in paths:
            for record in formats.read_records(path, parser, malformed, bar.update):
                users.append(user_index.setdefault(record.user, len(user_index)))
                items.append(item_index.setdefault(record.item, len(item_index)))
                timestamps.append(record.timestamp)
                ratings.append(nan if record.rating is None else record.rating)
                spill.append(record.text, record.summary)
                if record.nulled:
                    nulled.update(record.nulled)
    spill.finish()
    return _Reviews(
        user_index=user_index, item_index=item_index,
        user=np.frombuffer(users, dtype=np.int32), item=np.frombuffer(items, dtype=np.int32),
        timestamp=np.frombuffer(timestamps, dtype=np.int64),
        rating=np.frombuffer(ratings, dtype=np.float32), spill=spill, nulled=nulled)


@dataclass
class _Catalog:
    """Meta of the reviewed items, by review-side item index."""

    records: dict[int, formats.MetaRecord]
    problem: dict[int, str]  # item index -> discard reason (title missing / unusable)
    discarded: Counter
    cleaning: Counter
    read: int  # records parsed (malformed lines not included)


def _read_meta(paths: list[Path], fmt: str, item_index: dict[str, int],
               malformed: formats.MalformedLog, progress: bool) -> _Catalog:
    parser = formats.META_PARSERS[fmt]
    records: dict[int, formats.MetaRecord] = {}
    problem: dict[int, str] = {}
    discarded: Counter = Counter()
    counters: Counter = Counter()
    read = 0
    with _progress_bar(paths, "meta", progress) as bar:
        for path in paths:
            for record in formats.read_records(path, parser, malformed, bar.update):
                read += 1
                index = item_index.get(record.item)
                if index is None:
                    discarded["meta_item_not_reviewed"] += 1
                    continue
                if index in records or index in problem:
                    discarded["meta_duplicate_item"] += 1
                    continue
                counters["titles_changed_by_html_cleaning"] += record.title_changed
                if record.category_elements_removed:
                    counters["items_with_category_features_removed"] += 1
                    counters["category_elements_removed"] += record.category_elements_removed
                reason = cleaning.title_problem(record.title)
                if reason is not None:
                    problem[index] = reason
                    counters["titles_markup_fragment"] += cleaning.is_markup_fragment(record.title)
                else:
                    records[index] = record
    return _Catalog(records, problem, discarded, counters, read)


# ----------------------------------------------------------------------------- filtering


def _first_of_each_pair(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray,
                        n_items: int) -> np.ndarray:
    """Indices of the records that are the earliest (time, then file order) of their
    (user, item) pair, in file order."""
    pair = users.astype(np.int64) * n_items + items
    order = np.lexsort((timestamps, pair))  # stable: equal times keep file order
    pair = pair[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair[1:] != pair[:-1]
    return np.sort(order[first])


def _drop_items_without_title(kept: np.ndarray, item_of_record: np.ndarray, n_items: int,
                              catalog: _Catalog, discarded: Counter) -> np.ndarray:
    """The records of `kept` whose item has meta and a usable title; counts the others."""
    reasons = ["review_item_without_meta", "review_item_title_missing",
               "review_item_title_unusable"]
    code = np.zeros(n_items, dtype=np.int8)  # 0 usable, k > 0: reasons[k - 1]
    code[:] = 1
    code[list(catalog.records)] = 0
    for index, problem in catalog.problem.items():
        code[index] = reasons.index("review_" + problem) + 1
    record_code = code[item_of_record[kept]]
    for k, count in enumerate(np.bincount(record_code, minlength=len(reasons) + 1)[1:]):
        discarded[reasons[k]] += int(count)
    return kept[record_code == 0]


@dataclass
class _Sequences:
    """The final interactions in output order (by user id, then time, then file order)."""

    records: np.ndarray  # record index into the review columns
    users: np.ndarray  # final user index = rank of the user id
    items: np.ndarray  # final item index = rank of the item id
    positions: np.ndarray
    labels: np.ndarray  # 0 train, 1 valid, 2 test
    user_names: list[str]  # sorted ids
    item_names: list[str]
    item_records: list[int]  # review-side item index of each final item, in item_names order


def _ranked(index_of: dict[str, int], present: np.ndarray
            ) -> tuple[np.ndarray, list[str], list[int]]:
    """For the ids whose index is in `present`: index -> rank of the id (-1 elsewhere), the
    sorted ids, and the index of each sorted id."""
    strings = list(index_of)
    indices = sorted(present.tolist(), key=strings.__getitem__)
    rank = np.full(len(strings), -1, dtype=np.int64)
    rank[indices] = np.arange(len(indices))
    return rank, [strings[i] for i in indices], indices


def _sequences(data: _Reviews, kept: np.ndarray) -> _Sequences:
    user_rank, user_names, _ = _ranked(data.user_index, np.unique(data.user[kept]))
    item_rank, item_names, item_records = _ranked(data.item_index, np.unique(data.item[kept]))
    users = user_rank[data.user[kept]]
    order = np.lexsort((kept, data.timestamp[kept], users))
    records, users = kept[order], users[order]
    lengths = np.bincount(users, minlength=len(user_names))
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    positions = np.arange(len(records)) - starts[users]
    return _Sequences(records=records, users=users, items=item_rank[data.item[records]],
                      positions=positions, labels=leave_one_out(lengths, positions, users),
                      user_names=user_names, item_names=item_names, item_records=item_records)


# ----------------------------------------------------------------------------- writing


def _snippet_rows(seq: _Sequences, spill: TextSpill, timestamps: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The rows of `seq` whose review goes into their item's review_text (the first
    ITEM_SNIPPETS train-split reviews with text, by time then file order), grouped by item,
    and bounds such that item k's rows are rows[bounds[k]:bounds[k + 1]]. Train-split reviews
    only, so no held-out review reaches an item's text."""
    has_text = np.frombuffer(spill.text_lengths, dtype=np.int32)[seq.records] > 0
    pick = np.flatnonzero((seq.labels == 0) & has_text)
    order = pick[np.lexsort((seq.records[pick], timestamps[pick], seq.items[pick]))]
    grouped = seq.items[order]
    first = np.searchsorted(grouped, grouped)  # start of each row's item group
    rows = order[np.arange(len(order)) - first < ITEM_SNIPPETS]
    bounds = np.searchsorted(seq.items[rows], np.arange(len(seq.item_names) + 1))
    return rows, bounds


def _write_interactions(path: Path, reviews: _Reviews, seq: _Sequences) -> None:
    split_names = np.array(SPLIT_NAMES, dtype=object)
    with pq.ParquetWriter(path, INTERACTIONS_SCHEMA) as writer:
        for start in range(0, len(seq.records), WRITE_CHUNK_ROWS):
            chunk = slice(start, start + WRITE_CHUNK_ROWS)
            rec = seq.records[chunk]
            texts = [reviews.spill.get(r) for r in rec.tolist()]
            rating = reviews.rating[rec]
            user_ids = [seq.user_names[u] for u in seq.users[chunk].tolist()]
            item_ids = [seq.item_names[i] for i in seq.items[chunk].tolist()]
            table = pa.table({
                "user_id": pa.array(user_ids, pa.string()),
                "item_id": pa.array(item_ids, pa.string()),
                "timestamp": pa.array(reviews.timestamp[rec], pa.int64()),
                "rating": pa.array(rating, pa.float32(), mask=np.isnan(rating)),
                "review_text": pa.array([t for t, _ in texts], pa.string()),
                "summary": pa.array([m for _, m in texts], pa.string()),
                "position": pa.array(seq.positions[chunk], pa.int32()),
                "split": pa.array(split_names[seq.labels[chunk]].tolist(), pa.string()),
            }, schema=INTERACTIONS_SCHEMA)
            writer.write_table(table)


def _ragged(values: np.ndarray, names: pa.Array) -> pa.ListArray:
    """A [rows, width] index matrix padded with -1 at row ends, as list<string> of names."""
    lengths = (values >= 0).sum(axis=1)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), names.take(pa.array(values[values >= 0])))


def _write_candidates(path: Path, seq: _Sequences, negatives: int, seed: int) -> tuple[int, int]:
    """One row per valid/test instance (in interactions order: by user, valid before test),
    written block by block. Returns (rows, lists that came out short because their user had
    seen almost every item)."""
    held_out = np.flatnonzero(seq.labels > 0)
    n_items = len(seq.item_names)
    seen_keys = np.unique(seq.users.astype(np.int64) * n_items + seq.items)
    users = pa.array(seq.user_names, pa.string())
    names = pa.array(seq.item_names, pa.string())
    split_names = np.array(SPLIT_NAMES, dtype=object)
    short = 0
    with pq.ParquetWriter(path, CANDIDATES_SCHEMA) as writer:
        for block, drawn, candidates in sample_candidates(
                seq.users[held_out], seq.items[held_out], seen_keys, n_items, negatives, seed):
            rows = held_out[block]
            writer.write_table(pa.table({
                "user_id": users.take(pa.array(seq.users[rows])),
                "split": pa.array(split_names[seq.labels[rows]].tolist(), pa.string()),
                "target_item_id": names.take(pa.array(seq.items[rows])),
                "negative_ids": _ragged(drawn, names),
                "candidate_ids": _ragged(candidates, names),
            }, schema=CANDIDATES_SCHEMA))
            short += int((drawn < 0).any(axis=1).sum())
    return len(held_out), short


def _split_counts(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labels, minlength=3)
    return {name: int(counts[k]) for k, name in enumerate(SPLIT_NAMES)}


def _write_items(path: Path, seq: _Sequences, catalog: _Catalog, spill: TextSpill,
                 timestamps: np.ndarray) -> None:
    """items.parquet in chunks of items, review_text built per chunk (memory stays bounded by
    the chunk, not the catalog)."""
    rows, bounds = _snippet_rows(seq, spill, timestamps)
    counts = np.bincount(seq.items, minlength=len(seq.item_names))
    with pq.ParquetWriter(path, ITEMS_SCHEMA) as writer:
        for start in range(0, len(seq.item_names), WRITE_CHUNK_ROWS):
            stop = min(start + WRITE_CHUNK_ROWS, len(seq.item_names))
            metas = [catalog.records[i] for i in seq.item_records[start:stop]]
            review_texts = []
            for item in range(start, stop):
                parts = [cleaning.truncate(spill.get(int(seq.records[row]))[0], ITEM_SNIPPET_CHARS)
                         for row in rows[bounds[item]:bounds[item + 1]].tolist()]
                review_texts.append(ITEM_SNIPPET_SEPARATOR.join(parts) if parts else None)
            writer.write_table(pa.table({
                "item_id": seq.item_names[start:stop],
                "title": [m.title for m in metas],
                "categories": [m.categories for m in metas],
                "brand": [m.brand for m in metas],
                "description": [m.description for m in metas],
                "review_text": review_texts,
                "n_interactions": pa.array(counts[start:stop], pa.int32()),
                "main_category": [m.main_category for m in metas],
            }, schema=ITEMS_SCHEMA))


# ----------------------------------------------------------------------------- entry point


def prepare(reviews: PathLike | Sequence[PathLike], meta: PathLike | Sequence[PathLike],
            out_dir: PathLike, *, format: str = "auto", k_core: int = 5, seed: int = 0,
            negatives: int = 9, strict: bool = False, progress: bool = False) -> dict:
    """Prepare review + meta files (one path or several of one format) into `out_dir`.

    Writes items.parquet, interactions.parquet, search_splits.parquet, candidates.parquet and
    stats.json (last); returns the stats. `strict` makes the first malformed line an error.
    """
    if k_core < 0:
        raise DataError(f"k_core must be >= 0, got {k_core}")
    if negatives < 0:
        raise DataError(f"negatives must be >= 0, got {negatives}")
    review_paths = _as_paths(reviews, "reviews")
    meta_paths = _as_paths(meta, "meta")
    fmt = resolve_format(format, review_paths, meta_paths)
    _check_kinds(review_paths, meta_paths)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; pass a directory (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"--out {out}: cannot create the directory ({exc.strerror or exc})") from exc
    # stats.json marks a complete preparation: a stale one must not survive a failed rerun.
    (out / "stats.json").unlink(missing_ok=True)
    started = time.perf_counter()
    review_malformed = formats.MalformedLog(strict=strict)
    meta_malformed = formats.MalformedLog(strict=strict)
    scratch = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    spill = TextSpill(scratch / "texts.bin")
    try:
        data = _read_reviews(review_paths, fmt, review_malformed, spill, progress)
        n_read = len(data.user)
        log.info("read %d reviews (%d users, %d items) in %.1fs", n_read, len(data.user_index),
                 len(data.item_index), time.perf_counter() - started)
        if n_read == 0:
            raise EmptyResultError(
                f"no readable review in {[str(p) for p in review_paths]}: "
                f"{_no_record_hint(review_paths, 'reviews', fmt, format)}")
        discarded = Counter({reason: 0 for reason in (*REVIEW_DISCARDS, *META_DISCARDS)})
        discarded["review_malformed_line"] = review_malformed.total

        # 2. (user, item) de-duplication, keeping the earliest.
        kept = _first_of_each_pair(data.user, data.item, data.timestamp, len(data.item_index))
        discarded["review_duplicate_pair"] = n_read - len(kept)

        # 3. Items without meta or without a usable title.
        catalog = _read_meta(meta_paths, fmt, data.item_index, meta_malformed, progress)
        discarded.update(catalog.discarded)
        discarded["meta_malformed_line"] = meta_malformed.total
        kept = _drop_items_without_title(kept, data.item, len(data.item_index), catalog, discarded)

        if len(kept) == 0 and not catalog.records:
            if catalog.read and discarded["meta_item_not_reviewed"] == catalog.read:
                hint = (f"none of its {catalog.read:,} records is of a reviewed item: are the reviews "
                        "and the meta of the same category?")
            else:
                hint = _no_record_hint(meta_paths, "meta", fmt, format)
            raise EmptyResultError(
                f"no reviewed item has a usable meta record in {[str(p) for p in meta_paths]} "
                f"(discarded: {dict(discarded)}): {hint}")

        # 4. Iterative k-core.
        before_users = len(np.unique(data.user[kept]))
        before_items = len(np.unique(data.item[kept]))
        core, rounds = k_core_filter(data.user[kept], data.item[kept], k_core)
        discarded["review_k_core"] = len(kept) - len(core)
        warnings: list[str] = []
        alternatives: dict[int, int] = {}
        if len(kept) and discarded["review_k_core"] > K_CORE_WARN_REMOVED_SHARE * len(kept):
            alternatives = _k_core_alternatives(data.user[kept], data.item[kept], k_core)
            after_users = len(np.unique(data.user[kept[core]]))
            warnings.append(_k_core_warning(k_core, len(kept), len(core), before_users, after_users,
                                            alternatives))
        before_interactions = len(kept)
        kept = kept[core]
        if len(kept) == 0:
            raise EmptyResultError(
                f"no interaction is left after de-duplication, the title filter and a "
                f"{k_core}-core (discarded: {dict(discarded)}); "
                + (warnings[0] if warnings else "lower --k-core or check the meta file"))
        for warning in warnings:
            log.warning("%s", warning)

        # 5. Chronological sequences, leave-one-out.
        seq = _sequences(data, kept)

        # 6. Tables.
        _write_interactions(out / "interactions.parquet", data, seq)
        _write_items(out / "items.parquet", seq, catalog, data.spill, data.timestamp[seq.records])
        search_labels = search_split(len(seq.item_names), seed)
        pq.write_table(pa.table({
            "item_id": seq.item_names,
            "split": [SPLIT_NAMES[k] for k in search_labels.tolist()],
        }, schema=SEARCH_SPLITS_SCHEMA), out / "search_splits.parquet")
        n_candidates, short = _write_candidates(out / "candidates.parquet", seq, negatives, seed)
        if short:
            log.warning("%d candidate lists have fewer than %d negatives: their users "
                        "interacted with nearly every item", short, negatives)

        n_users, n_items, n_inter = len(seq.user_names), len(seq.item_names), len(seq.records)
        malformed = {**review_malformed.counts, **meta_malformed.counts}
        stats = {
            "users": n_users,
            "items": n_items,
            "interactions": n_inter,
            "sparsity": 1.0 - n_inter / (n_users * n_items),
            "avg_seq_len": n_inter / n_users,
            "splits": _split_counts(seq.labels),
            "search_splits": _split_counts(search_labels),
            "candidates": {"rows": n_candidates, "negatives": negatives,
                           "short_lists": short},
            "records_read": {"reviews": n_read + review_malformed.total,
                             "meta": catalog.read + meta_malformed.total},
            "discarded": dict(discarded),
            "k_core_removed": {"users": before_users - n_users, "items": before_items - n_items,
                               "interactions": before_interactions - n_inter, "rounds": rounds,
                               "share_of_interactions": round(1 - n_inter / before_interactions, 4)},
            # Interactions each smaller --k-core keeps; only when this one removed most of them.
            "k_core_alternatives": {str(k): n for k, n in alternatives.items()},
            "warnings": warnings,
            "malformed": malformed,
            "malformed_examples": (review_malformed.examples + meta_malformed.examples)[:20],
            "nulled_fields": dict(sorted(data.nulled.items())),
            "cleaning": {key: int(catalog.cleaning[key]) for key in (
                "titles_changed_by_html_cleaning", "titles_markup_fragment",
                "items_with_category_features_removed", "category_elements_removed")},
            "format": fmt,
            "k_core": k_core,
            "seed": seed,
            "inputs": {"reviews": [str(p) for p in review_paths],
                       "meta": [str(p) for p in meta_paths]},
        }
        (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
        log.info("prepared %d users, %d items, %d interactions into %s in %.1fs",
                 n_users, n_items, n_inter, out, time.perf_counter() - started)
        return stats
    finally:
        spill.close()
        shutil.rmtree(scratch, ignore_errors=True)
