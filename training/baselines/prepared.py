"""Baseline inputs from a prepared data directory (the data layer's Parquet contract).

Train sequences are each user's `split == "train"` interactions by `position`; a valid request's
history is the train items, a test request's history is train + valid (leave-one-out), and the
candidates are `candidates.parquet`'s `candidate_ids` in their stored order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from instructrec.engine.errors import InputError
from instructrec.training.baselines.common import ItemCatalog, LabeledRequest, RankingRequest, TrainingData


@dataclass(frozen=True)
class PreparedBaselineData:
    train: TrainingData
    valid: list[LabeledRequest]
    test: list[LabeledRequest]


def _read(data_dir: Path, name: str, columns: list[str]) -> dict:
    path = data_dir / name
    if not path.exists():
        raise InputError("data_dir", f"{path} is missing", "run `instructrec.training.data.prepare` first")
    table = pq.read_table(path, columns=columns)
    return {c: table.column(c).to_pylist() for c in columns}


def load_prepared(data_dir: str | Path) -> PreparedBaselineData:
    data_dir = Path(data_dir)
    items = _read(data_dir, "items.parquet", ["item_id", "title", "categories"])
    catalog = ItemCatalog.from_records(items["item_id"], items["title"], items["categories"])
    rows = _read(data_dir, "interactions.parquet", ["user_id", "item_id", "position", "split"])
    by_user: dict[str, list[tuple[int, str, str]]] = {}
    for user, item, position, split in zip(rows["user_id"], rows["item_id"], rows["position"], rows["split"]):
        by_user.setdefault(user, []).append((position, item, split))
    train_seq, valid_seq = {}, {}
    for user, events in by_user.items():
        events.sort()
        train_seq[user] = [item for _, item, split in events if split == "train"]
        valid_seq[user] = [item for _, item, split in events if split == "valid"]
    cands = _read(data_dir, "candidates.parquet", ["user_id", "split", "target_item_id", "candidate_ids"])
    requests: dict[str, list[LabeledRequest]] = {"valid": [], "test": []}
    for user, split, target, candidates in zip(cands["user_id"], cands["split"], cands["target_item_id"],
                                               cands["candidate_ids"]):
        if split not in requests:
            raise InputError("candidates.split", f"unknown split {split!r}", "use 'valid' or 'test'")
        history = train_seq.get(user, []) + (valid_seq.get(user, []) if split == "test" else [])
        requests[split].append(LabeledRequest(RankingRequest(user, tuple(history), tuple(candidates)), target))
    return PreparedBaselineData(TrainingData(train_seq, catalog), requests["valid"], requests["test"])
