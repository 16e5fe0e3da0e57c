"""The 2018 and 2023 loaders on small generated files: gzip and plain, malformed lines, missing
optional fields, HTML in titles, unicode, format detection, --strict."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from instructrec.training.data import (
    DataError, FormatDetectionError, MalformedLineError, prepare)
from instructrec.training.data.formats import detect_format


def write_lines(path: Path, lines: list, gz: bool) -> Path:
    text = "".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                   for line in lines)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# Three users, three items; user U3 has only optional-field-less reviews.
REVIEWS_2018 = [
    {"reviewerID": "U1", "asin": "I1", "unixReviewTime": 100, "overall": 5.0,
     "reviewText": "Bought this for my son &amp; he <b>loves</b> it 🎮", "summary": "Great"},
    {"reviewerID": "U1", "asin": "I2", "unixReviewTime": 200, "overall": 4.0,
     "reviewText": "Solid sequel", "summary": "Good"},
    '{"reviewerID": "U1", "asin": "I3", "unixReviewTime": 30',  # truncated JSON
    {"reviewerID": "U1", "asin": "I3", "unixReviewTime": 300},
    {"reviewerID": "U2", "asin": "I2", "unixReviewTime": 150, "overall": "n/a"},  # bad rating
    {"reviewerID": "U2", "asin": "I3", "reviewTime": "01 2, 1970"},  # no unixReviewTime
    ["not", "an", "object"],
    {"reviewerID": "U2", "asin": "I1", "unixReviewTime": 400, "reviewText": 12},  # bad text
    {"asin": "I1", "unixReviewTime": 5},  # no user
    {"reviewerID": "Zoë", "asin": "I1", "unixReviewTime": 10, "summary": "Très bien"},
    {"reviewerID": "Zoë", "asin": "I2", "unixReviewTime": 20},
    {"reviewerID": "Zoë", "asin": "I3", "unixReviewTime": 30},
]
META_2018 = [
    {"asin": "I1", "title": "Sword &amp; Sorcery <i>Deluxe</i> - PC",
     "category": ["Video Games", "PC", "Games", "For 1-4 players",
                  "Explore a world twice the size of the original game, with a new story."],
     "brand": "Northwind", "description": ["<p>Big &amp; bold.</p>", "Second line"]},
    {"asin": "I2", "title": "Ōkami Trails – Édition Spéciale", "category": ["Video Games"]},
    "{broken meta",
    {"asin": "I3", "title": "Café Racer 2"},  # no category, brand or description
]

REVIEWS_2023 = [
    {"user_id": "U1", "parent_asin": "P1", "asin": "P1-red", "timestamp": 1_600_000_000_123,
     "rating": 5.0, "title": "Loved it", "text": "Works great<br />with my controller."},
    {"user_id": "U1", "parent_asin": "P2", "timestamp": 1_600_000_100_000, "rating": 3.0},
    {"user_id": "U1", "parent_asin": "P3", "timestamp": 1_600_000_200_000, "text": "naïve fun"},
    {"user_id": "U2", "asin": "P1", "timestamp": 1_600_000_050_000},  # asin when no parent_asin
    {"user_id": "U2", "parent_asin": "P2", "timestamp": "soon"},  # malformed
    {"user_id": "U2", "parent_asin": "P3", "timestamp": 1_600_000_300_000},
]
META_2023 = [
    {"parent_asin": "P1", "title": "HORI Wheel &amp; Pedals", "main_category": "Video Games",
     "categories": ["Video Games", "Nintendo Switch", "Accessories"], "store": "HORI",
     "details": {"Brand": "ignored"}},
    {"parent_asin": "P2", "title": "Mug", "main_category": "Home", "store": None,
     "details": {"Brand": "MugCo"}, "description": ["Holds <b>coffee</b>."]},
    {"parent_asin": "P3", "title": "Plüsch Toy", "main_category": None, "categories": []},
]


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_amazon2018_end_to_end(tmp_path, gz):
    suffix = ".json.gz" if gz else ".json"
    reviews = write_lines(tmp_path / f"reviews{suffix}", REVIEWS_2018, gz)
    meta = write_lines(tmp_path / f"meta{suffix}", META_2018, gz)
    stats = prepare(reviews, meta, tmp_path / "out", k_core=1, negatives=2)

    assert stats["format"] == "amazon2018"
    assert stats["malformed"] == {str(reviews): 3, str(meta): 1}
    lines = {(e["file"], e["line"]) for e in stats["malformed_examples"]}
    assert lines == {(str(reviews), 3), (str(reviews), 7), (str(reviews), 9), (str(meta), 3)}
    assert stats["records_read"] == {"reviews": 12, "meta": 4}
    assert stats["nulled_fields"] == {"overall": 1, "reviewText": 1}
    assert stats["interactions"] == 9 and stats["users"] == 3 and stats["items"] == 3

    items = {r["item_id"]: r for r in pq.read_table(tmp_path / "out" / "items.parquet").to_pylist()}
    assert items["I1"]["title"] == "Sword & Sorcery Deluxe - PC"
    assert items["I1"]["categories"] == ["Video Games", "PC", "Games"]
    assert items["I1"]["brand"] == "Northwind"
    assert items["I1"]["description"] == "Big & bold. Second line"
    assert items["I2"]["title"] == "Ōkami Trails – Édition Spéciale"
    assert items["I3"]["categories"] == [] and items["I3"]["brand"] is None
    assert items["I3"]["description"] is None

    rows = pq.read_table(tmp_path / "out" / "interactions.parquet").to_pylist()
    by_key = {(r["user_id"], r["item_id"]): r for r in rows}
    first = by_key[("U1", "I1")]
    assert first["review_text"] == "Bought this for my son & he loves it 🎮"
    assert first["rating"] == 5.0 and first["summary"] == "Great"
    assert by_key[("U2", "I2")]["rating"] is None  # "n/a" was nulled, the interaction kept
    assert by_key[("U2", "I1")]["review_text"] is None
    assert by_key[("U2", "I3")]["timestamp"] == 86_400  # reviewTime "01 2, 1970"
    assert by_key[("Zoë", "I1")]["summary"] == "Très bien"
    assert by_key[("U1", "I3")]["review_text"] is None and by_key[("U1", "I3")]["rating"] is None


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_amazon2023_end_to_end(tmp_path, gz):
    suffix = ".jsonl.gz" if gz else ".jsonl"
    reviews = write_lines(tmp_path / f"Cat{suffix}", REVIEWS_2023, gz)
    meta = write_lines(tmp_path / f"meta_Cat{suffix}", META_2023, gz)
    stats = prepare(reviews, meta, tmp_path / "out", k_core=1, negatives=1)
    assert stats["format"] == "amazon2023"
    assert stats["malformed"] == {str(reviews): 1}
    assert stats["malformed_examples"][0]["line"] == 5

    rows = pq.read_table(tmp_path / "out" / "interactions.parquet").to_pylist()
    by_key = {(r["user_id"], r["item_id"]): r for r in rows}
    assert set(by_key) == {("U1", "P1"), ("U1", "P2"), ("U1", "P3"), ("U2", "P1"), ("U2", "P3")}
    assert by_key[("U1", "P1")]["timestamp"] == 1_600_000_000  # ms to seconds
    assert by_key[("U1", "P1")]["review_text"] == "Works great with my controller."
    assert by_key[("U1", "P1")]["summary"] == "Loved it"
    assert by_key[("U1", "P3")]["review_text"] == "naïve fun"
    assert by_key[("U1", "P2")]["review_text"] is None

    items = {r["item_id"]: r for r in pq.read_table(tmp_path / "out" / "items.parquet").to_pylist()}
    assert items["P1"]["title"] == "HORI Wheel & Pedals"
    assert items["P1"]["categories"] == ["Video Games", "Nintendo Switch", "Accessories"]
    assert items["P1"]["brand"] == "HORI" and items["P1"]["main_category"] == "Video Games"
    assert items["P2"]["categories"] == ["Home"]  # main_category when categories is absent
    assert items["P2"]["brand"] == "MugCo" and items["P2"]["description"] == "Holds coffee."
    assert items["P3"]["categories"] == [] and items["P3"]["title"] == "Plüsch Toy"


def test_detect_format_reads_keys_not_names(tmp_path):
    plain_2023 = write_lines(tmp_path / "reviews.json", REVIEWS_2023[:1], gz=False)  # has asin
    gz_2018 = write_lines(tmp_path / "meta.jsonl", META_2018, gz=True)  # gzip under a plain name
    assert detect_format(plain_2023) == "amazon2023"
    assert detect_format(gz_2018) == "amazon2018"
    assert detect_format(write_lines(tmp_path / "junk.jsonl", ["{oops"], gz=False)) == "amazon2023"
    with pytest.raises(FormatDetectionError, match="--format"):
        detect_format(write_lines(tmp_path / "junk.txt", ["{oops"], gz=False))


def test_mixed_formats_are_refused(tmp_path):
    reviews = write_lines(tmp_path / "r.json", REVIEWS_2018, gz=False)
    meta = write_lines(tmp_path / "m.jsonl", META_2023, gz=False)
    with pytest.raises(FormatDetectionError, match="different formats"):
        prepare(reviews, meta, tmp_path / "out", k_core=1)


def test_explicit_format_overrides_detection(tmp_path):
    reviews = write_lines(tmp_path / "r.json", REVIEWS_2018, gz=False)
    meta = write_lines(tmp_path / "m.json", META_2018, gz=False)
    # Read as 2023, no 2018 line has user_id: every review line is malformed, nothing is left.
    with pytest.raises(DataError, match="no readable review"):
        prepare(reviews, meta, tmp_path / "out", format="amazon2023", k_core=1)
    with pytest.raises(DataError, match="unknown format"):
        prepare(reviews, meta, tmp_path / "out", format="amazon2014")


def test_strict_stops_at_the_first_malformed_line(tmp_path):
    reviews = write_lines(tmp_path / "r.json.gz", REVIEWS_2018, gz=True)
    meta = write_lines(tmp_path / "m.json.gz", META_2018, gz=True)
    with pytest.raises(MalformedLineError) as caught:
        prepare(reviews, meta, tmp_path / "out", k_core=1, strict=True)
    assert caught.value.path == str(reviews) and caught.value.line == 3
    assert "invalid JSON" in caught.value.reason
    assert f"{reviews}:3:" in str(caught.value)
    assert not (tmp_path / "out" / "stats.json").exists()
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


def test_corrupt_gzip_names_the_file(tmp_path):
    good = write_lines(tmp_path / "r.json.gz", REVIEWS_2018 * 50, gz=True).read_bytes()
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(good[: len(good) // 2])
    meta = write_lines(tmp_path / "m.json", META_2018, gz=False)
    with pytest.raises(DataError, match="broken.json.gz: unreadable after line"):
        prepare(broken, meta, tmp_path / "out", format="amazon2018", k_core=1)


def test_missing_file_is_a_data_error(tmp_path):
    meta = write_lines(tmp_path / "m.json", META_2018, gz=False)
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "nope.json", meta, tmp_path / "out")


def test_several_review_files_are_read_in_order(tmp_path):
    first = write_lines(tmp_path / "a.json", REVIEWS_2018[:2], gz=False)
    second = write_lines(tmp_path / "b.json.gz", REVIEWS_2018[9:], gz=True)
    meta = write_lines(tmp_path / "m.json", META_2018, gz=False)
    stats = prepare([first, second], [meta], tmp_path / "out", k_core=1, negatives=1)
    assert stats["records_read"]["reviews"] == 5
    assert stats["interactions"] == 5 and stats["inputs"]["reviews"] == [str(first), str(second)]
