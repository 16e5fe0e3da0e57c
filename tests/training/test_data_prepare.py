"""`prepare` on the generated dataset: the output contract, sequences, splits without leakage,
negatives, determinism, and the accounting of every discarded record."""

from __future__ import annotations

import gzip
import json
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructrec.training.data import (
    CANDIDATES_SCHEMA, INTERACTIONS_SCHEMA, ITEMS_SCHEMA, SEARCH_SPLITS_SCHEMA, EmptyResultError,
    load_prepared, prepare, synth)
from instructrec.training.data.pipeline import ITEM_SNIPPETS, META_DISCARDS, REVIEW_DISCARDS

# The contract other layers code against (names and types; more columns may follow).
CONTRACT = {
    "items.parquet": [("item_id", pa.string()), ("title", pa.string()),
                      ("categories", pa.list_(pa.string())), ("brand", pa.string()),
                      ("description", pa.string()), ("review_text", pa.string()),
                      ("n_interactions", pa.int32())],
    "interactions.parquet": [("user_id", pa.string()), ("item_id", pa.string()),
                             ("timestamp", pa.int64()), ("rating", pa.float32()),
                             ("review_text", pa.string()), ("summary", pa.string()),
                             ("position", pa.int32()), ("split", pa.string())],
    "search_splits.parquet": [("item_id", pa.string()), ("split", pa.string())],
    "candidates.parquet": [("user_id", pa.string()), ("split", pa.string()),
                           ("target_item_id", pa.string()),
                           ("negative_ids", pa.list_(pa.string())),
                           ("candidate_ids", pa.list_(pa.string()))],
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    reviews, meta = synth(root / "raw", seed=0, malformed=True)
    stats = prepare(reviews, meta, root / "prepared", seed=0)
    data = load_prepared(root / "prepared")
    return root, stats, data


@pytest.fixture(scope="module")
def sequences(prepared):
    _, _, data = prepared
    by_user = defaultdict(list)
    for row in data.interactions.to_pylist():
        by_user[row["user_id"]].append(row)
    return by_user


def test_output_contract(prepared):
    root, _, _ = prepared
    for name, columns in CONTRACT.items():
        schema = pq.read_schema(root / "prepared" / name)
        assert [(f.name, f.type) for f in schema][:len(columns)] == columns, name
    assert list(ITEMS_SCHEMA.names[:7]) == [c for c, _ in CONTRACT["items.parquet"]]
    assert INTERACTIONS_SCHEMA.names == [c for c, _ in CONTRACT["interactions.parquet"]]
    assert SEARCH_SPLITS_SCHEMA.names == [c for c, _ in CONTRACT["search_splits.parquet"]]
    assert CANDIDATES_SCHEMA.names == [c for c, _ in CONTRACT["candidates.parquet"]]
    stats = json.loads((root / "prepared" / "stats.json").read_text())
    for key in ("users", "items", "interactions", "sparsity", "avg_seq_len", "discarded",
                "malformed", "format", "k_core", "seed", "malformed_examples"):
        assert key in stats


def test_stats_account_for_every_record(prepared):
    root, stats, data = prepared
    assert stats["users"] == len({r for r in data.interactions.column("user_id").to_pylist()})
    assert stats["items"] == data.items.num_rows
    assert stats["interactions"] == data.interactions.num_rows
    assert stats["sparsity"] == pytest.approx(
        1 - stats["interactions"] / (stats["users"] * stats["items"]))
    assert stats["avg_seq_len"] == pytest.approx(stats["interactions"] / stats["users"])
    discarded = stats["discarded"]
    assert set(discarded) == set(REVIEW_DISCARDS) | set(META_DISCARDS)
    assert stats["records_read"]["reviews"] == stats["interactions"] + sum(
        discarded[r] for r in REVIEW_DISCARDS)
    # The generated data exercises every rule (malformed lines because malformed=True).
    for reason in ("review_malformed_line", "review_duplicate_pair", "review_item_without_meta",
                   "review_item_title_missing", "review_item_title_unusable",
                   "meta_malformed_line", "meta_item_not_reviewed"):
        assert discarded[reason] > 0, reason
    assert sum(stats["malformed"].values()) == (discarded["review_malformed_line"]
                                                + discarded["meta_malformed_line"])
    assert all({"file", "line", "reason"} <= set(e) for e in stats["malformed_examples"])
    assert stats["cleaning"]["items_with_category_features_removed"] > 0
    assert stats["cleaning"]["titles_changed_by_html_cleaning"] > 0


def test_sequences_are_chronological_and_sorted(prepared, sequences):
    _, _, data = prepared
    users = data.interactions.column("user_id").to_pylist()
    assert users == sorted(users)
    for rows in sequences.values():
        assert [r["position"] for r in rows] == list(range(len(rows)))
        times = [r["timestamp"] for r in rows]
        assert times == sorted(times)
        assert len({r["item_id"] for r in rows}) == len(rows)  # de-duplicated


def test_k_core_holds(prepared, sequences):
    _, stats, data = prepared
    assert min(len(rows) for rows in sequences.values()) >= stats["k_core"] == 5
    counts = Counter(data.interactions.column("item_id").to_pylist())
    assert min(counts.values()) >= 5
    assert dict(zip(data.items.column("item_id").to_pylist(),
                    data.items.column("n_interactions").to_pylist())) == counts


def test_leave_one_out_without_leakage(sequences):
    for rows in sequences.values():
        splits = [r["split"] for r in rows]
        assert splits == ["train"] * (len(rows) - 2) + ["valid", "test"]
        train_time = max(r["timestamp"] for r in rows[:-2])
        assert train_time <= rows[-2]["timestamp"] <= rows[-1]["timestamp"]
        train_items = {r["item_id"] for r in rows[:-2]}
        assert rows[-2]["item_id"] not in train_items and rows[-1]["item_id"] not in train_items


def test_candidates(prepared, sequences):
    _, stats, data = prepared
    catalog = set(data.items.column("item_id").to_pylist())
    rows = data.candidates.to_pylist()
    assert len(rows) == 2 * stats["users"] == stats["candidates"]["rows"]
    assert [(r["user_id"], r["split"]) for r in rows] == [
        (u, s) for u in sorted(sequences) for s in ("valid", "test")]
    orders = Counter()
    for row in rows:
        seq = sequences[row["user_id"]]
        target = seq[-1 if row["split"] == "test" else -2]["item_id"]
        assert row["target_item_id"] == target
        seen = {r["item_id"] for r in seq}
        negatives = row["negative_ids"]
        assert len(negatives) == 9 == len(set(negatives))
        assert not seen & set(negatives), "a negative the user interacted with"
        assert set(negatives) <= catalog
        assert sorted(row["candidate_ids"]) == sorted([target, *negatives])
        orders[row["candidate_ids"].index(target)] += 1
    assert len(orders) >= 8  # the target's place is shuffled, not fixed


def test_search_splits(prepared):
    _, stats, data = prepared
    splits = data.search_splits.to_pylist()
    assert [r["item_id"] for r in splits] == data.items.column("item_id").to_pylist()
    counts = Counter(r["split"] for r in splits)
    n = len(splits)
    assert counts["train"] == round(0.8 * n) and counts["valid"] == round(0.1 * n)
    assert counts["test"] == n - counts["train"] - counts["valid"]
    assert stats["search_splits"] == dict(counts)


def test_items_are_clean(prepared):
    _, _, data = prepared
    for item in data.items.to_pylist():
        assert item["title"] and "&amp;" not in item["title"] and "<" not in item["title"]
        assert item["categories"][:1] == ["Video Games"] and len(item["categories"]) == 4
        if item["review_text"] is not None:
            assert item["review_text"].count(" | ") <= ITEM_SNIPPETS - 1
            assert len(item["review_text"]) <= 650


def test_item_review_text_comes_from_train_reviews_only(prepared, sequences):
    _, _, data = prepared
    held_out = {r["review_text"] for rows in sequences.values() for r in rows[-2:]
                if r["review_text"]}
    train = {r["review_text"] for rows in sequences.values() for r in rows[:-2] if r["review_text"]}
    only_held_out = held_out - train
    for item in data.items.to_pylist():
        for snippet in (item["review_text"] or "").split(" | "):
            assert snippet not in only_held_out


def test_sequential_pattern_is_learnable(prepared, sequences):
    """A first-order transition model (what SASRec can learn at least) beats popularity by far
    on the stored test candidates: the planted series pattern is there."""
    _, _, data = prepared
    transitions: dict[str, Counter] = defaultdict(Counter)
    popularity = Counter()
    for rows in sequences.values():
        train = [r["item_id"] for r in rows[:-2]]
        popularity.update(train)
        for a, b in zip(train, train[1:]):
            transitions[a][b] += 1
    hits = Counter()
    tests = [r for r in data.candidates.to_pylist() if r["split"] == "test"]
    for row in tests:
        last = sequences[row["user_id"]][-2]["item_id"]
        cands = row["candidate_ids"]
        hits["popularity"] += max(cands, key=popularity.__getitem__) == row["target_item_id"]
        hits["markov"] += max(cands, key=lambda c: (transitions[last][c], popularity[c])) == \
            row["target_item_id"]
    assert hits["markov"] / len(tests) > 0.4
    assert hits["markov"] > 2 * hits["popularity"]


def _tables(directory):
    data = load_prepared(directory)
    return {name: getattr(data, name) for name in ("items", "interactions", "search_splits",
                                                   "candidates")}, data.stats


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    reviews, meta = synth(tmp_path / "raw", users=80, items=48, seed=3)
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare(reviews, meta, tmp_path / name, seed=seed, k_core=3)
        runs[name] = _tables(tmp_path / name)
    tables_a, stats_a = runs["a"]
    tables_b, stats_b = runs["b"]
    tables_c, _ = runs["c"]
    for name in tables_a:
        assert tables_a[name].equals(tables_b[name]), name
    assert {k: v for k, v in stats_a.items() if k != "inputs"} == \
        {k: v for k, v in stats_b.items() if k != "inputs"}
    # The seed drives the random parts only.
    assert tables_a["interactions"].equals(tables_c["interactions"])
    assert tables_a["items"].equals(tables_c["items"])
    assert not tables_a["candidates"].equals(tables_c["candidates"])
    assert not tables_a["search_splits"].equals(tables_c["search_splits"])


def _write(path, records):
    with gzip.open(path, "wt") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


def test_duplicates_keep_the_earliest_and_ties_keep_file_order(tmp_path):
    reviews = _write(tmp_path / "r.json.gz", [
        {"reviewerID": "U", "asin": "C", "unixReviewTime": 50, "summary": "tie, first in file"},
        {"reviewerID": "U", "asin": "A", "unixReviewTime": 90, "summary": "later duplicate"},
        {"reviewerID": "U", "asin": "B", "unixReviewTime": 50, "summary": "tie, second in file"},
        {"reviewerID": "U", "asin": "A", "unixReviewTime": 10, "summary": "earliest"},
        {"reviewerID": "U", "asin": "D", "unixReviewTime": 70},
        {"reviewerID": "V", "asin": "A", "unixReviewTime": 1},
    ])
    meta = _write(tmp_path / "m.json.gz", [{"asin": a, "title": f"Item {a}"} for a in "ABCD"])
    stats = prepare(reviews, meta, tmp_path / "out", k_core=1, negatives=2)
    rows = load_prepared(tmp_path / "out").interactions.to_pylist()
    user_u = [(r["item_id"], r["summary"], r["split"]) for r in rows if r["user_id"] == "U"]
    assert user_u == [("A", "earliest", "train"), ("C", "tie, first in file", "train"),
                      ("B", "tie, second in file", "valid"), ("D", None, "test")]
    assert [(r["item_id"], r["split"]) for r in rows if r["user_id"] == "V"] == [("A", "train")]
    assert stats["discarded"]["review_duplicate_pair"] == 1
    assert stats["splits"] == {"train": 3, "valid": 1, "test": 1}
    candidates = load_prepared(tmp_path / "out").candidates.to_pylist()
    # U saw every item but none: no negatives can be drawn; V has one interaction: no instance.
    assert [(c["user_id"], c["split"], c["negative_ids"]) for c in candidates] == [
        ("U", "valid", []), ("U", "test", [])]
    assert stats["candidates"]["short_lists"] == 2


def test_two_interaction_users_get_train_and_test(tmp_path):
    reviews = _write(tmp_path / "r.json.gz", [
        {"reviewerID": "U", "asin": "A", "unixReviewTime": 1},
        {"reviewerID": "U", "asin": "B", "unixReviewTime": 2},
    ] + [{"reviewerID": "W", "asin": a, "unixReviewTime": 3} for a in "CDEFG"])
    meta = _write(tmp_path / "m.json.gz", [{"asin": a, "title": f"Item {a}"} for a in "ABCDEFG"])
    prepare(reviews, meta, tmp_path / "out", k_core=0, negatives=3)
    data = load_prepared(tmp_path / "out")
    assert [(r["item_id"], r["split"]) for r in data.interactions.to_pylist()
            if r["user_id"] == "U"] == [("A", "train"), ("B", "test")]
    row = [c for c in data.candidates.to_pylist() if c["user_id"] == "U"]
    assert [(c["split"], len(c["negative_ids"])) for c in row] == [("test", 3)]
    assert not set(row[0]["negative_ids"]) & {"A", "B"}


def test_a_too_strict_k_core_is_a_clear_error(tmp_path):
    reviews = _write(tmp_path / "r.json.gz", [
        {"reviewerID": "U", "asin": "A", "unixReviewTime": 1}])
    meta = _write(tmp_path / "m.json.gz", [{"asin": "A", "title": "Item"}])
    with pytest.raises(EmptyResultError, match="lower --k-core"):
        prepare(reviews, meta, tmp_path / "out", k_core=5)


def test_negative_sampling_is_uniform(tmp_path):
    """Every unseen item is about equally likely as a negative (chi-square-like bound)."""
    from instructrec.training.data.sampling import sample_candidates

    n_items, count = 50, 9
    users = np.zeros(4000, dtype=np.int64)
    seen = np.array([3, 7, 11], dtype=np.int64)  # user 0 saw items 3, 7, 11
    blocks = list(sample_candidates(users, np.full(4000, 3), seen, n_items, count, 0))
    assert [b.start for b, _, _ in blocks] == list(range(0, 4000, blocks[0][0].stop))
    negatives = np.concatenate([n for _, n, _ in blocks])
    candidates = np.concatenate([c for _, _, c in blocks])
    freq = np.bincount(negatives.ravel(), minlength=n_items)
    assert freq[[3, 7, 11]].sum() == 0
    unseen = np.delete(freq, [3, 7, 11])
    expected = 4000 * count / 47
    assert np.abs(unseen - expected).max() < 0.15 * expected
    assert all(len(set(row)) == count for row in negatives.tolist())
    expected_lists = np.sort(np.c_[np.full(4000, 3), negatives], axis=1)
    assert (np.sort(candidates, axis=1) == expected_lists).all()
