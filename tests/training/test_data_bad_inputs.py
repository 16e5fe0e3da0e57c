"""`data prepare` on inputs that are wrong in the ways real runs found: times outside any
calendar, numeric ids, scraped markup in place of a title, a k-core that wipes out the data, a
forced format that does not fit, swapped review and meta files, an --out that is a file. Each
one is a counted line, a warning with the fix, or a one-line error naming the likely cause."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from instructrec.cli import main
from instructrec.training.data import DataError, load_prepared, prepare
from instructrec.training.data.errors import EmptyResultError, FormatDetectionError


def write(path, lines):
    """One JSON object a line (a str is written as it is), gzip."""
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for line in lines:
            handle.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def good_reviews(users="UVW", items="ABC"):
    return [{"reviewerID": u, "asin": a, "unixReviewTime": 1_400_000_000 + 86_400 * k}
            for u in users for k, a in enumerate(items)]


def titled_meta(items="ABC"):
    return [{"asin": a, "title": f"Item {a}", "category": ["Video Games"]} for a in items]


def test_times_outside_any_calendar_are_counted_malformed_lines(tmp_path):
    huge = 2 ** 70  # past int64
    bad = [
        {"reviewerID": "U", "asin": "A", "unixReviewTime": huge},
        {"reviewerID": "U", "asin": "B", "unixReviewTime": 1e300},
        {"reviewerID": "U", "asin": "C", "unixReviewTime": "9" * 30},
        {"reviewerID": "U", "asin": "A", "unixReviewTime": -(2 ** 63) - 1},
        # Fits int64 but is no date (year > 9999): the instruction context could not name it.
        {"reviewerID": "U", "asin": "A", "unixReviewTime": 2 ** 62},
        '{"reviewerID": "U", "asin": "A", "unixReviewTime": ' + "9" * 5000 + "}",
    ]
    reviews = write(tmp_path / "r.json.gz", good_reviews() + bad)
    meta = write(tmp_path / "m.json.gz", titled_meta())
    stats = prepare(reviews, meta, tmp_path / "out", k_core=1, negatives=0)
    assert stats["discarded"]["review_malformed_line"] == len(bad)
    assert stats["interactions"] == 9 and stats["records_read"]["reviews"] == 9 + len(bad)
    reasons = [e["reason"] for e in stats["malformed_examples"]]
    assert sum("out of range" in r for r in reasons) == 5 and "invalid JSON" in reasons[-1]

    # The 2023 format: `timestamp` in milliseconds, the same bounds in seconds.
    reviews = write(tmp_path / "r.jsonl.gz", [
        {"user_id": "U", "parent_asin": "A", "timestamp": 1_600_000_000_000},
        {"user_id": "U", "parent_asin": "B", "timestamp": huge},
        {"user_id": "U", "parent_asin": "B", "timestamp": 1e300}])
    meta = write(tmp_path / "m.jsonl.gz", [{"parent_asin": a, "title": f"Item {a}", "main_category": "Games"}
                                           for a in "AB"])
    stats = prepare(reviews, meta, tmp_path / "out23", k_core=1, negatives=0)
    assert stats["discarded"]["review_malformed_line"] == 2 and stats["interactions"] == 1


def test_a_numeric_id_is_a_malformed_line_as_the_docs_say(tmp_path):
    reviews = write(tmp_path / "r.json.gz", good_reviews() + [
        {"reviewerID": 12345, "asin": "A", "unixReviewTime": 1_400_000_000},
        {"reviewerID": "U", "asin": 700026657, "unixReviewTime": 1_400_000_000}])
    meta = write(tmp_path / "m.json.gz", titled_meta())
    stats = prepare(reviews, meta, tmp_path / "out", k_core=1, negatives=0)
    assert stats["discarded"]["review_malformed_line"] == 2
    assert [e["reason"] for e in stats["malformed_examples"]] == [
        "field 'reviewerID' must be a string, got int", "field 'asin' must be a string, got int"]
    assert "12345" not in load_prepared(tmp_path / "out").interactions.column("user_id").to_pylist()


def test_scraped_markup_in_place_of_a_title_is_an_unusable_title(tmp_path):
    reviews = write(tmp_path / "r.json.gz", good_reviews(items="ABCD"))
    meta = write(tmp_path / "m.json.gz", [
        {"asin": "A", "title": '<span class="a-size-medium a-color-secondary a-text-normal'},
        {"asin": "B", "title": "Tom <3 Jerry"},  # a heart, not a tag
        {"asin": "C", "title": 'Halo 3 <div style="display:none'},
        {"asin": "D", "title": "<b>Halo</b> 4"},  # a whole tag: cleaned, the title is fine
    ])
    stats = prepare(reviews, meta, tmp_path / "out", k_core=1, negatives=0)
    items = load_prepared(tmp_path / "out").items
    titles = dict(zip(items.column("item_id").to_pylist(), items.column("title").to_pylist()))
    assert sorted(titles) == ["B", "D"] and titles["B"] == "Tom <3 Jerry" and titles["D"] == "Halo 4"
    assert stats["discarded"]["review_item_title_unusable"] == 2 * 3  # two items x three users
    assert stats["cleaning"]["titles_markup_fragment"] == 2


def k_core_slice():
    """200 users with 3 reviews each over a ring of 200 items (every item 3 reviews), plus a dense
    block of 6 users x 6 items: the 5-core and the 4-core keep only the block (36 of 636
    interactions), the 3-core keeps everything."""
    lines = [{"reviewerID": f"s{u:03d}", "asin": f"r{(u + j) % 200:03d}", "unixReviewTime": 1_400_000_000 + j}
             for u in range(200) for j in range(3)]
    lines += [{"reviewerID": f"d{u}", "asin": f"b{i}", "unixReviewTime": 1_400_000_000 + i}
              for u in range(6) for i in range(6)]
    items = [f"r{i:03d}" for i in range(200)] + [f"b{i}" for i in range(6)]
    return lines, [{"asin": a, "title": f"Item {a}"} for a in items]


def test_a_k_core_that_removes_most_of_the_data_warns_and_names_the_values_that_keep_it(tmp_path, caplog):
    lines, meta_lines = k_core_slice()
    reviews, meta = write(tmp_path / "r.json.gz", lines), write(tmp_path / "m.json.gz", meta_lines)
    with caplog.at_level(logging.WARNING):
        stats = prepare(reviews, meta, tmp_path / "out", k_core=5, negatives=0)
    assert stats["interactions"] == 36 and stats["users"] == 6
    assert stats["k_core_removed"]["interactions"] == 600
    assert stats["k_core_removed"]["share_of_interactions"] == round(600 / 636, 4)
    assert stats["k_core_alternatives"] == {"4": 36, "3": 636}
    [warning] = stats["warnings"]
    assert "removed 94.3% of the interactions" in warning and "users 206 -> 6" in warning
    assert "--k-core 3 keeps 636 (100%)" in warning and "--k-core 3 keeps most of it" in warning
    assert warning in caplog.text

    # The same, through the command: exit 0, and the warning is in the printed stats table.
    out = tmp_path / "cli"
    assert main(["data", "prepare", "--reviews", str(reviews), "--meta", str(meta), "--out", str(out),
                 "--negatives", "0", "--no-progress"]) == 0
    assert json.loads((out / "stats.json").read_text())["warnings"] == [warning]

    # A k-core that trims a tail stays quiet.
    stats = prepare(reviews, meta, tmp_path / "out3", k_core=3, negatives=0)
    assert stats["warnings"] == [] and stats["k_core_alternatives"] == {}


def test_a_k_core_that_removes_everything_names_the_values_that_keep_data(tmp_path):
    lines, meta_lines = k_core_slice()
    reviews, meta = write(tmp_path / "r.json.gz", lines[:600]), write(tmp_path / "m.json.gz", meta_lines)
    with pytest.raises(EmptyResultError, match="--k-core 3 keeps 600 .100%.") as caught:
        prepare(reviews, meta, tmp_path / "out", k_core=4)
    assert "lower --k-core" in str(caught.value)


def test_a_forced_format_that_does_not_fit_is_named(tmp_path):
    reviews = write(tmp_path / "r.json.gz", good_reviews())
    meta = write(tmp_path / "m.json.gz", titled_meta())
    with pytest.raises(EmptyResultError) as caught:
        prepare(reviews, meta, tmp_path / "out", format="amazon2023")
    message = str(caught.value)
    assert "no readable review" in message
    assert "looks like an amazon2018 reviews file but --format amazon2023 was given" in message
    assert "pass --format amazon2018" in message


def test_swapped_review_and_meta_files_are_named(tmp_path):
    reviews = write(tmp_path / "r.json.gz", good_reviews())
    meta = write(tmp_path / "m.json.gz", titled_meta())
    with pytest.raises(FormatDetectionError, match="are --reviews and --meta swapped") as caught:
        prepare(meta, reviews, tmp_path / "out")
    assert f"{meta} looks like an item metadata file (amazon2018) but was given as --reviews" in str(caught.value)

    # 2023: a review line even parses as a meta record (parent_asin, title), so the review file
    # passed as --meta too would quietly become the catalog.
    reviews23 = write(tmp_path / "r.jsonl.gz", [
        {"user_id": "U", "parent_asin": "A", "timestamp": 1_600_000_000_000, "title": "Great", "text": "Fun"}])
    with pytest.raises(FormatDetectionError, match=f"{reviews23} looks like a review file .amazon2023. but was "
                                                   "given as --meta"):
        prepare(reviews23, reviews23, tmp_path / "out23", k_core=1)


def test_meta_of_another_category_is_named(tmp_path):
    reviews = write(tmp_path / "r.json.gz", good_reviews())
    meta = write(tmp_path / "m.json.gz", titled_meta(items="XYZ"))
    with pytest.raises(EmptyResultError, match="none of its 3 records is of a reviewed item: are the "
                                               "reviews and the meta of the same category"):
        prepare(reviews, meta, tmp_path / "out", k_core=1)


def test_out_that_is_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    reviews = write(tmp_path / "r.json.gz", good_reviews())
    meta = write(tmp_path / "m.json.gz", titled_meta())
    target = tmp_path / "taken"
    target.write_text("not a directory")
    with pytest.raises(DataError, match="is a file; pass a directory"):
        prepare(reviews, meta, target, k_core=1)
    assert main(["data", "prepare", "--reviews", str(reviews), "--meta", str(meta), "--out", str(target),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {target} is a file" in err and "Traceback" not in err
    assert target.read_text() == "not a directory"
