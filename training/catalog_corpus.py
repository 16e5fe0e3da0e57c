"""Catalogue pretraining corpus: what a pretrained Flan-T5 would already know about a catalogue,
taught to a randomly initialised T5 before instruction tuning.

No pretrained weights exist on the machines this project runs on, so a model starts knowing
nothing of item titles, of which items follow which, or of how a category path reads as a title.
This corpus teaches those three things with short sequences (cheap on a CPU), from the TRAINING
split only:

- `next-title`: the newest `history` titles of a user's train interactions -> the next title.
  Every position of every train sequence (SASRec's training signal, with titles for ids).
- `category-title` / `title-category`: an item's category path <-> its title, both ways.
- `span-corruption`: T5's objective over "title | category path" texts: about 15% of the words, in
  spans of mean length 3, replaced by sentinels <extra_id_N>; the target lists the spans.

Leakage rules (so that evaluation stays honest):
- Interactions of the valid and test splits are never read.
- Items of the product-search valid and test splits are never a target and never the subject of an
  item text (their category -> title mapping is exactly what product search evaluates); their
  titles may still appear in a history source, as they do in instruction rows.

Rows carry the instruction dataset's columns (`instruction`, `target`, `template`), so
`instructrec train` trains on the corpus like on any instruction set.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from instructrec.engine.errors import InputError
from instructrec.engine.formatting import HISTORY_SEPARATOR, sanitize_text

__all__ = ["OBJECTIVES", "build_catalog_corpus", "span_corrupt"]

log = logging.getLogger(__name__)

OBJECTIVES = ("next-title", "category-title", "title-category", "span-corruption")
DEFAULT_HISTORY = 10
# T5's span corruption: 15% noise density, mean noise span length 3 (Raffel et al., sec. 3.1.4).
NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0
CATEGORY_SEPARATOR = " > "
# Sentinels the Flan-T5 vocabulary holds (<extra_id_0> .. <extra_id_99>).
MAX_SENTINELS = 100


def span_corrupt(words: Sequence[str], rng: np.random.Generator) -> tuple[str, str] | None:
    """(source, target) of T5 span corruption over `words`, or None when the text is too short
    (under 4 words) to hide a span and keep context."""
    n = len(words)
    if n < 4:
        return None
    n_noise = max(1, int(round(n * NOISE_DENSITY)))
    n_spans = max(1, min(MAX_SENTINELS, int(round(n_noise / MEAN_SPAN))))
    n_noise = max(n_noise, n_spans)
    # Random span starts, in order, non-overlapping: split noise and kept words into n_spans runs.
    noise_lengths = _random_partition(n_noise, n_spans, rng)
    kept_lengths = _random_partition(n - n_noise, n_spans, rng)
    source: list[str] = []
    target: list[str] = []
    position = 0
    for span, (kept, noise) in enumerate(zip(kept_lengths, noise_lengths)):
        source += words[position:position + kept]
        position += kept
        sentinel = f"<extra_id_{span}>"
        source.append(sentinel)
        target.append(sentinel)
        target += words[position:position + noise]
        position += noise
    source += words[position:]
    target.append(f"<extra_id_{len(noise_lengths)}>")
    return " ".join(source), " ".join(target)


def _random_partition(total: int, parts: int, rng: np.random.Generator) -> list[int]:
    """`total` split into `parts` positive-or-zero lengths at random cut points (the first part of a
    kept partition may be 0, so a span can start the text)."""
    if parts <= 1:
        return [total]
    cuts = np.sort(rng.choice(np.arange(1, total + parts), size=parts - 1, replace=False))
    bounds = np.concatenate([[0], cuts, [total + parts]])
    return [int(x) - 1 for x in np.diff(bounds)]


def build_catalog_corpus(data_dir: Path, out_dir: Path, *, history: int = DEFAULT_HISTORY,
                         objectives: Sequence[str] = OBJECTIVES, span_copies: int = 2, seed: int = 0,
                         valid_from: Path | None = None) -> dict:
    """Write OUT/train.parquet (and OUT/corpus.json with counts) from a prepared data folder.

    valid_from: an instruction folder whose valid.parquet is linked as OUT/valid.parquet, so that
    training on the corpus validates on the real ranking task."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        raise InputError("objectives", f"unknown objective(s) {unknown}", f"use some of {', '.join(OBJECTIVES)}")
    if history < 1:
        raise InputError("history", f"must be at least 1, got {history}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    for name in ("items.parquet", "interactions.parquet", "search_splits.parquet"):
        if not (data_dir / name).is_file():
            raise InputError("data", f"{data_dir / name} does not exist",
                             "point --data at a folder written by `instructrec data prepare`")
    items = pq.read_table(data_dir / "items.parquet", columns=["item_id", "title", "categories"]).to_pydict()
    title = {i: sanitize_text(t or "") for i, t in zip(items["item_id"], items["title"])}
    category = {i: CATEGORY_SEPARATOR.join(sanitize_text(c) for c in (cs or ()) if c and c.strip())
                for i, cs in zip(items["item_id"], items["categories"])}
    search = pq.read_table(data_dir / "search_splits.parquet").to_pydict()
    held_out = {i for i, s in zip(search["item_id"], search["split"]) if s != "train"}

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5ca7]))
    rows: dict[str, list] = defaultdict(list)
    counts: Counter = Counter()

    def add(objective: str, source: str, target: str) -> None:
        rows["instruction"].append(source)
        rows["target"].append(target)
        rows["template"].append(f"catalog-{objective}")
        counts[objective] += 1

    if "next-title" in objectives:
        inter = pq.read_table(data_dir / "interactions.parquet",
                              columns=["user_id", "item_id", "position", "split"]).to_pydict()
        sequences: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for user, item, position, split in zip(inter["user_id"], inter["item_id"], inter["position"], inter["split"]):
            if split == "train":
                sequences[user].append((position, item))
        for user in sorted(sequences):
            seq = [item for _, item in sorted(sequences[user])]
            for t in range(1, len(seq)):
                if seq[t] in held_out or not title.get(seq[t]):
                    counts["next-title skipped (search valid/test target)" if seq[t] in held_out
                           else "next-title skipped (no title)"] += 1
                    continue
                past = [title[i] for i in seq[max(0, t - history):t] if title.get(i)]
                if past:
                    add("next-title", "Purchase history: " + HISTORY_SEPARATOR.join(past) + ". Next purchase:",
                        title[seq[t]])
    subjects = [i for i in sorted(title) if i not in held_out and title[i]]
    for item in subjects:
        if category[item] and "category-title" in objectives:
            add("category-title", f"Category: {category[item]}. Product title:", title[item])
        if category[item] and "title-category" in objectives:
            add("title-category", f"Product: {title[item]}. Category:", category[item])
        if "span-corruption" in objectives:
            words = (title[item] + (" | " + category[item] if category[item] else "")).split()
            for _ in range(span_copies):
                pair = span_corrupt(words, rng)
                if pair is not None:
                    add("span-corruption", *pair)
    if not rows["instruction"]:
        raise InputError("data", f"{data_dir} gives no corpus rows for objectives {list(objectives)}",
                         "check that the folder holds train interactions and titled items")
    order = rng.permutation(len(rows["instruction"]))
    table = pa.table({k: pa.array([v[i] for i in order], pa.string()) for k, v in rows.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out_dir / "train.parquet")
    if valid_from is not None:
        valid = Path(valid_from) / "valid.parquet"
        if not valid.is_file():
            raise InputError("valid_from", f"{valid} does not exist", "pass an `instructions build` folder")
        link = out_dir / "valid.parquet"
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(valid.resolve())
    report = {"rows": table.num_rows, "objectives": dict(counts), "history": history, "seed": seed,
              "held_out_items": len(held_out), "data": str(data_dir)}
    (out_dir / "corpus.json").write_text(json.dumps(report, indent=2))
    log.info("catalog corpus: %d rows (%s) -> %s", table.num_rows,
             ", ".join(f"{k} {v}" for k, v in counts.items()), out_dir)
    return report
