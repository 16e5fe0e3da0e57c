"""The prepared directory as the instruction builder reads it: items, per-user chronological
sequences with their splits, the stored evaluation candidates and the product-search item split
(the tables `instructrec data prepare` writes; training/data/pipeline.py)."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from instructrec.engine.errors import InputError

PathLike = str | os.PathLike
SPLITS = ("train", "valid", "test")


@dataclass(slots=True)
class ItemRecord:
    item_id: str
    title: str
    categories: tuple[str, ...]
    brand: str | None
    description: str | None


@dataclass(slots=True)
class Interaction:
    item_id: str
    timestamp: int
    review: str | None
    position: int
    split: str


@dataclass
class PreparedTables:
    items: dict[str, ItemRecord]
    item_ids: list[str]  # sorted: the sampling universe
    sequences: dict[str, list[Interaction]]  # per user, by position
    candidates: list[tuple[str, str, str, list[str]]]  # (user, split, target, candidate_ids)
    search_split: dict[str, str]


_REQUIRED_TABLES = {
    "items.parquet": ("item_id", "title", "categories"),
    "interactions.parquet": ("user_id", "item_id", "timestamp", "position", "split"),
    "search_splits.parquet": ("item_id", "split"),
    "candidates.parquet": ("user_id", "split", "target_item_id", "candidate_ids"),
}


def load_tables(data_dir: PathLike) -> PreparedTables:
    import pyarrow.parquet as pq

    data_dir = Path(data_dir)
    tables = {}
    for name, needed in _REQUIRED_TABLES.items():
        path = data_dir / name
        if not path.exists():
            raise InputError("data", f"{path} does not exist",
                             "point --data at a directory written by `instructrec data prepare`")
        columns = pq.read_schema(path).names
        missing = [c for c in needed if c not in columns]
        if missing:
            raise InputError("data", f"{path} lacks columns {missing}",
                             "rebuild it with the current `instructrec data prepare`")
        wanted = list(needed) + [c for c in ("brand", "description", "review_text") if c in columns]
        tables[name] = pq.read_table(path, columns=wanted).to_pydict()

    raw = tables["items.parquet"]
    items = {}
    for index, item_id in enumerate(raw["item_id"]):
        items[item_id] = ItemRecord(
            item_id=item_id, title=raw["title"][index] or "",
            categories=tuple(raw["categories"][index] or ()),
            brand=(raw.get("brand") or [None] * len(raw["item_id"]))[index],
            description=(raw.get("description") or [None] * len(raw["item_id"]))[index])

    raw = tables["interactions.parquet"]
    reviews = raw.get("review_text") or [None] * len(raw["user_id"])
    sequences: dict[str, list[Interaction]] = defaultdict(list)
    for user, item, stamp, review, position, split in zip(raw["user_id"], raw["item_id"], raw["timestamp"],
                                                          reviews, raw["position"], raw["split"]):
        if item not in items:
            raise InputError("data", f"interactions.parquet names item {item!r} that items.parquet lacks",
                             "rebuild the directory with `instructrec data prepare`")
        sequences[user].append(Interaction(item, int(stamp), review, int(position), split))
    for sequence in sequences.values():
        sequence.sort(key=lambda interaction: interaction.position)

    raw = tables["candidates.parquet"]
    candidates = list(zip(raw["user_id"], raw["split"], raw["target_item_id"], raw["candidate_ids"]))
    raw = tables["search_splits.parquet"]
    search_split = dict(zip(raw["item_id"], raw["split"]))
    return PreparedTables(items=items, item_ids=sorted(items), sequences=dict(sequences),
                          candidates=candidates, search_split=search_split)
