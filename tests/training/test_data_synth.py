"""The generated dataset: deterministic per seed, in the 2018 format, exercising every field and
cleaning rule the loaders handle."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter

import pytest

from instructrec.training.data import synth
from instructrec.training.data.cleaning import clean_categories_2018, clean_text
from instructrec.training.data.formats import detect_format


def _lines(path):
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth-files")
    reviews, meta = synth(root, seed=0)
    return ([json.loads(line) for line in _lines(reviews)],
            [json.loads(line) for line in _lines(meta)], reviews, meta)


def test_deterministic_per_seed(tmp_path):
    a = synth(tmp_path / "a", users=40, items=30, seed=7)
    b = synth(tmp_path / "b", users=40, items=30, seed=7)
    c = synth(tmp_path / "c", users=40, items=30, seed=8)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes()


def test_files_are_in_the_2018_format(generated):
    reviews, meta, reviews_path, meta_path = generated
    assert detect_format(reviews_path) == detect_format(meta_path) == "amazon2018"
    fields = Counter(key for r in reviews for key in r)
    for key in ("reviewerID", "asin", "unixReviewTime", "reviewTime", "overall", "reviewText",
                "summary", "reviewerName", "verified", "vote"):
        assert fields[key] > 0, key
    # Optional fields are sometimes absent, and a few records carry only reviewTime.
    for key in ("unixReviewTime", "overall", "reviewText", "summary"):
        assert fields[key] < len(reviews), key
    meta_fields = Counter(key for m in meta for key in m)
    for key in ("asin", "title", "category", "brand", "description"):
        assert 0 < meta_fields[key], key
    assert meta_fields["brand"] < len(meta) and meta_fields["description"] < len(meta)


def test_default_size_and_realism(generated):
    reviews, meta, _, _ = generated
    assert len({r["reviewerID"] for r in reviews}) == 300
    assert 195 <= len(meta) <= 205  # 200 items, one without meta, two unreviewed
    assert all(re.fullmatch(r"A[A-Z0-9]{13}", r["reviewerID"]) for r in reviews)
    paths = {" > ".join(clean_categories_2018(m["category"])[0]) for m in meta}
    assert any(p.startswith("Video Games > PC > Accessories > ") for p in paths)
    assert any(p.startswith("Video Games > ") and "> Games >" in p for p in paths)
    texts = " ".join(r.get("reviewText", "") for r in reviews)
    for cue in ("for my son", "gift", "huge fan of", "upgraded from", "next one"):
        assert cue in texts, cue


def test_every_cleaning_rule_is_exercised(generated):
    reviews, meta, _, _ = generated
    titles = [m.get("title") for m in meta]
    assert any("&amp;" in (t or "") or "&#" in (t or "") for t in titles)
    assert any("<" in (t or "") for t in titles)
    assert any(t is None for t in titles)
    assert any(t is not None and not clean_text(t) for t in titles)
    assert any(any(ord(ch) > 127 for ch in (t or "")) for t in titles)
    assert sum(clean_categories_2018(m["category"])[1] > 0 for m in meta) >= 5
    assert any("<" in " ".join(m.get("description", [])) for m in meta)
    pairs = Counter((r["reviewerID"], r["asin"]) for r in reviews)
    assert any(count > 1 for count in pairs.values())
    assert len({r["asin"] for r in reviews} - {m["asin"] for m in meta}) == 1  # no meta
    assert len({m["asin"] for m in meta} - {r["asin"] for r in reviews}) == 2  # unreviewed


def test_malformed_lines_only_when_asked(tmp_path, generated):
    _, _, reviews_path, _ = generated
    assert all(line.startswith("{") and line.endswith("}") for line in _lines(reviews_path))
    reviews, meta = synth(tmp_path, seed=0, malformed=True)
    bad = 0
    for line in _lines(reviews):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        bad += (not isinstance(record, dict) or not record.get("asin")
                or not record.get("reviewerID"))
    assert bad >= 4


def test_rejects_a_too_small_catalog(tmp_path):
    with pytest.raises(ValueError, match="items >= 8"):
        synth(tmp_path, items=3)
