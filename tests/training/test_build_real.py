"""Instruction building on the real data under ../shared/data (skipped where it is absent):
the 2018 Video Games log (prepared once per module with the data layer, then built for a seeded
subset of users) and the 2023 review sample, the only real review text, where the vague
intention must come from the target's own review."""

from __future__ import annotations

import html
import re
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from instructrec.engine.templates import REGISTRY
from instructrec.training.annotation import OfflineAnnotator
from instructrec.training.build import build_instructions

pytestmark = pytest.mark.shared_data


def _read(directory: Path, name: str) -> list[dict]:
    return pq.read_table(directory / name).to_pylist()


@pytest.fixture(scope="module")
def video_games(tmp_path_factory, tokenizer, shared_dataset):
    source = shared_dataset("amazon18-video-games")
    from instructrec.training.data import prepare

    prepared = tmp_path_factory.mktemp("vg-prepared")
    prepare(source / "Video_Games_5.json.gz", source / "meta_Video_Games.json.gz", prepared, seed=0)
    out = tmp_path_factory.mktemp("vg-instructions")
    # A seeded 200-user subset (of 29,609) keeps the build to seconds; everything else is real.
    report = build_instructions(prepared, out, annotator=OfflineAnnotator(), per_user=3, seed=0,
                                tokenizer=tokenizer, max_users=200, max_items=60)
    return prepared, out, report


def test_video_games_build_respects_splits_and_budget(video_games, tokenizer):
    prepared, out, report = video_games
    interactions = _read(prepared, "interactions.parquet")
    items = {r["item_id"]: r["title"] for r in _read(prepared, "items.parquet")}
    split_of = {(r["user_id"], r["item_id"]): r["split"] for r in interactions}
    held_out, train_titles = defaultdict(set), defaultdict(set)
    for r in interactions:
        if r["split"] != "train":
            held_out[r["user_id"]].add(r["item_id"])
        else:
            train_titles[r["user_id"]].add(items[r["item_id"]])
    rows = {split: _read(out, f"{split}.parquet") for split in ("train", "valid", "test")}
    assert report["rows"] == {split: len(rows[split]) for split in rows}
    assert report["rows"]["train"] >= 200 * 3

    for row in rows["train"]:
        assert len(tokenizer(row["instruction"]).input_ids) <= 512
        if row["user_id"] is None:
            continue
        assert split_of[(row["user_id"], row["target_item_id"])] == "train"
        # Held-out items never appear. By title: a held-out title may only show up when another
        # item carrying the same title (the catalog has duplicate titles) is in the user's train
        # history or is a shown candidate, never a held-out item of this user.
        explained = train_titles[row["user_id"]] | {items[i] for i in row["candidate_ids"] or []}
        for item in held_out[row["user_id"]]:
            # As a whole history entry: after ": " or "; ", before "; " or the closing ". ".
            entry = re.compile(r"(?:: |; )" + re.escape(items[item]) + r"(?:; |\.(?: |$))")
            if entry.search(row["instruction"]):
                assert items[item] in explained, (row["template"], items[item])
        for item in row["candidate_ids"] or []:
            assert item == row["target_item_id"] or (row["user_id"], item) not in split_of

    stored = {(r["user_id"], r["split"]): r["candidate_ids"] for r in _read(prepared, "candidates.parquet")}
    for split in ("valid", "test"):
        user_rows = [r for r in rows[split] if r["user_id"] is not None]
        assert {r["user_id"] for r in user_rows} and len({r["user_id"] for r in user_rows}) <= 200
        for row in user_rows:
            assert row["candidate_ids"] == stored[(row["user_id"], split)]
            assert row["target_item_id"] in row["candidate_ids"]
            assert row["target"] == items[row["target_item_id"]]
    # Every skipped row is counted, and the Table-2 figures add up.
    for split in rows:
        stats = report["splits"][split]
        assert stats["instructions"] == len(rows[split])
        assert stats["with_preference"] == sum(r["preference"] != "P0" for r in rows[split])
        assert sum(stats["instructions_by_group"].values()) == len(rows[split])
    assert set(report["splits"]["train"]["by_task"]) == {"T0", "T1", "T2", "T3"}
    assert set(REGISTRY) >= {r["template"] for r in rows["train"]}


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)).lower()).strip()


def test_reviews_2023_vague_intention_comes_from_the_target_review(tmp_path, shared_dataset):
    source = shared_dataset("amazon23-review-sample")
    from instructrec.training.data import prepare

    reviews = sorted(p for p in source.glob("*.jsonl.gz") if not p.name.startswith("meta_"))
    meta = sorted(source.glob("meta_*.jsonl.gz"))
    prepared = tmp_path / "prepared"
    # About 30 users per category: a k-core would leave nearly nothing, so none is applied.
    prepare(reviews, meta, prepared, k_core=0, seed=0)
    out = tmp_path / "instructions"
    report = build_instructions(prepared, out, annotator=OfflineAnnotator(), per_user=2, seed=0,
                                templates="pers-search-01,pers-search-07,pers-search-15,prod-search-01,prod-search-03")
    interactions = _read(prepared, "interactions.parquet")
    review_of = {(r["user_id"], r["item_id"]): r["review_text"] for r in interactions}
    item_reviews = {True: defaultdict(list), False: defaultdict(list)}  # keyed by "train rows"
    for r in interactions:
        if r["review_text"]:
            item_reviews[False][r["item_id"]].append(r["review_text"])
            if r["split"] == "train":
                item_reviews[True][r["item_id"]].append(r["review_text"])

    quoted = 0
    vague_rows = [r for split in ("train", "valid", "test") for r in _read(out, f"{split}.parquet")
                  if r["intention"] == "I1"]
    assert vague_rows and report["rows"]["train"] > 0
    for row in vague_rows:
        text = row["target"] if row["strategy"] == "turn_around" else row["instruction"]
        match = re.search(r'something that fits "(.+?)(?:\.\.\.)?"', text)
        if row["user_id"] is not None:
            review = review_of[(row["user_id"], row["target_item_id"])]
            sources = [review] if review else []
        else:
            # Product-search training rows may only read train-split reviews of the item.
            sources = item_reviews[row["split"] == "train"][row["target_item_id"]]
        if match is None:
            # No review sentence of three words or more: the intention came from the metadata.
            for review in sources:
                assert all(len(part.split()) < 3 for part in re.split(r"(?<=[.!?])\s+", review)), (text, review)
            assert "something in" in text or "something new" in text
            continue
        quote = _normalise(match.group(1))
        assert any(quote in _normalise(s) for s in sources), (quote, sources)
        quoted += 1
    # Most targets of this sample carry a usable review.
    assert quoted >= 0.6 * len(vague_rows)
