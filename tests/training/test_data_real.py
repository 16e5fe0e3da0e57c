"""On the real data in ../shared/data (skipped with a reason where it is absent): the default
preparation of Amazon 2018 Video Games reproduces the reference counts of its README, and the
Amazon 2023 sample loads with its review texts."""

from __future__ import annotations

import pytest

from instructrec.training.data import load_prepared, prepare

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def video_games(tmp_path_factory, shared_dataset):
    root = shared_dataset("amazon18-video-games")
    out = tmp_path_factory.mktemp("video-games-2018")
    stats = prepare(root / "Video_Games_5.json.gz", root / "meta_Video_Games.json.gz", out)
    return stats, load_prepared(out)


def test_video_games_2018_matches_the_reference_counts(video_games):
    stats, data = video_games
    # ../shared/data/README.md: after (user, item) de-duplication and an iterative 5-core.
    assert (stats["users"], stats["items"], stats["interactions"]) == (29_609, 11_642, 261_407)
    assert stats["records_read"] == {"reviews": 342_329, "meta": 17_332}
    discarded = stats["discarded"]
    # Every reviewed item has a usable title, so dropping title-less items before the k-core
    # removes nothing here and the reference counts hold.
    assert discarded["review_item_without_meta"] == discarded["review_item_title_missing"] == 0
    assert discarded["review_item_title_unusable"] == 0
    assert discarded["review_k_core"] == 342_329 - 261_407
    # The 5-core trims a tail (23.6% of the interactions): no warning.
    assert stats["warnings"] == [] and stats["k_core_removed"]["share_of_interactions"] == 0.2364
    assert stats["cleaning"]["titles_markup_fragment"] == 0
    assert data.candidates.num_rows == 2 * 29_609


def test_video_games_2018_metadata_is_cleaned(video_games):
    stats, data = video_games
    titles = data.items.column("title").to_pylist()
    assert not any("&amp;" in t for t in titles)
    assert stats["cleaning"]["items_with_category_features_removed"] > 2_000
    longest = max(len(label) for path in data.items.column("categories").to_pylist()
                  for label in path)
    assert longest <= 50
    # Feature bullets cut, taxonomy paths kept: most items keep "Video Games > X > Y" (94.6%;
    # 87 items have no category at all in the metadata).
    depths = [len(path) for path in data.items.column("categories").to_pylist()]
    assert sum(d >= 3 for d in depths) / len(depths) > 0.93


def test_amazon2023_sample_loads_with_review_texts(tmp_path, shared_dataset):
    root = shared_dataset("amazon23-review-sample")
    reviews = sorted(p for p in root.glob("*.jsonl.gz") if not p.name.startswith("meta_"))
    meta = sorted(root.glob("meta_*.jsonl.gz"))
    stats = prepare(reviews, meta, tmp_path, k_core=1)  # ~8 reviews a user: no k-core
    assert stats["format"] == "amazon2023" and stats["records_read"]["reviews"] == 2_764
    assert sum(stats["malformed"].values()) == 0
    data = load_prepared(tmp_path)
    texts = data.interactions.column("review_text").to_pylist()
    assert stats["users"] > 300 and stats["interactions"] > 2_500
    assert sum(t is not None for t in texts) / len(texts) > 0.95
    assert sum(t is not None for t in data.items.column("review_text").to_pylist()) > 1_500
    assert all(data.items.column("title").to_pylist())
    assert set(data.interactions.column("split").to_pylist()) == {"train", "valid", "test"}


def test_amazon2023_sample_under_the_default_k_core_names_the_k_core_that_keeps_it(tmp_path, shared_dataset):
    """Most items of the sample have one review: the default 5-core keeps nothing, and the error
    says which --k-core keeps the data instead of only that nothing is left."""
    from instructrec.training.data.errors import EmptyResultError

    root = shared_dataset("amazon23-review-sample")
    reviews = sorted(p for p in root.glob("*.jsonl.gz") if not p.name.startswith("meta_"))
    meta = sorted(root.glob("meta_*.jsonl.gz"))
    with pytest.raises(EmptyResultError, match=r"--k-core 1 \(no filter\) keeps 2,\d{3} \(100%\)"):
        prepare(reviews, meta, tmp_path)
