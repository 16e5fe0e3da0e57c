"""Catalogue pretraining corpus: train-split data only, product-search valid/test items never a
target or an item text, and span corruption that loses no word."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

import instructrec_test_instruction_fixtures as fixtures  # registered by conftest.py
from instructrec.engine.errors import InputError
from instructrec.training.catalog_corpus import build_catalog_corpus, span_corrupt


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    prepared = fixtures.write_prepared(tmp_path_factory.mktemp("prepared"))
    out = tmp_path_factory.mktemp("corpus")
    report = build_catalog_corpus(prepared, out, history=3, seed=0)
    return report, pq.read_table(out / "train.parquet").to_pylist()


def _title(item: str) -> str:
    return fixtures.ITEMS[item][0]


def test_next_title_rows_are_exactly_the_train_transitions(corpus):
    _, rows = corpus
    held_out = {i for i, s in fixtures.SEARCH_SPLITS.items() if s != "train"}
    expected = set()
    for user, sequence in fixtures.SEQUENCES.items():
        train = [item for item, _ in sequence[:-2]]  # the last two are valid and test
        for t in range(1, len(train)):
            if train[t] not in held_out:
                past = "; ".join(_title(i) for i in train[max(0, t - 3):t])
                expected.add((f"Purchase history: {past}. Next purchase:", _title(train[t])))
    got = {(r["instruction"], r["target"]) for r in rows if r["template"] == "catalog-next-title"}
    assert got == expected and got


def test_held_out_search_items_are_never_targets_or_item_texts(corpus):
    report, rows = corpus
    for item, split in fixtures.SEARCH_SPLITS.items():
        if split == "train":
            continue
        title = _title(item)
        for r in rows:
            assert r["target"] != title
            if r["template"] != "catalog-next-title":
                assert title not in r["instruction"] and title not in r["target"]
    assert report["held_out_items"] == 2
    assert report["objectives"]["category-title"] == len(fixtures.ITEMS) - 2


def test_span_corruption_hides_spans_and_loses_no_word():
    rng = np.random.default_rng(0)
    words = "Turbo Kart Racer Deluxe Edition | Video Games > PC > Racing > Kart Games".split()
    for _ in range(50):
        source, target = span_corrupt(words, rng)
        spans = re.split(r"<extra_id_\d+>", target)[1:-1]  # text after each sentinel but the last
        restored = source
        for k, span in enumerate(spans):
            restored = restored.replace(f"<extra_id_{k}>", span.strip(), 1)
        assert " ".join(restored.split()) == " ".join(words)
        hidden = sum(len(s.split()) for s in spans)
        assert 1 <= hidden <= len(words) // 2
    assert span_corrupt(["too", "short"], rng) is None


def test_errors_name_the_field(tmp_path):
    with pytest.raises(InputError, match="data"):
        build_catalog_corpus(tmp_path / "nothing", tmp_path / "out")
    prepared = fixtures.write_prepared(tmp_path / "prepared")
    with pytest.raises(InputError, match="objectives"):
        build_catalog_corpus(prepared, tmp_path / "out", objectives=("masked-lm",))
    report = build_catalog_corpus(prepared, tmp_path / "out", objectives=("category-title",))
    assert json.loads((tmp_path / "out" / "corpus.json").read_text())["rows"] == report["rows"]


def test_cli_writes_the_corpus_and_links_valid(tmp_path):
    from instructrec.cli import main

    prepared = fixtures.write_prepared(tmp_path / "prepared")
    instructions = tmp_path / "instructions"
    instructions.mkdir()
    pq.write_table(pq.read_table(prepared / "items.parquet").slice(0, 1), instructions / "valid.parquet")
    out = tmp_path / "corpus"
    assert main(["instructions", "catalog", "--data", str(prepared), "--out", str(out), "--valid-from",
                 str(instructions), "--objectives", "next-title,category-title"]) == 0
    templates = set(pq.read_table(out / "train.parquet").column("template").to_pylist())
    assert templates == {"catalog-next-title", "catalog-category-title"}
    assert (out / "valid.parquet").resolve() == (instructions / "valid.parquet").resolve()
    assert main(["instructions", "catalog", "--data", str(tmp_path / "none"), "--out", str(out)]) == 2
