"""The offline annotator: deterministic, readable sentences drawn from the data, checked against
hand-worked cases."""

from __future__ import annotations

from instructrec.training.annotation import ItemView, OfflineAnnotator, specific_intention_from_categories
from instructrec.training.annotation.offline import (
    dominant_categories, generic_category_labels, recurring_title_words, split_sentences)

HISTORY = [
    ItemView("i1", "Legend of the Sky Racer", ("Video Games", "PC", "Racing")),
    ItemView("i2", "Sky Racer Turbo &amp; Friends", ("Video Games", "Xbox", "Racing"),
             review="Arrived quickly. I love fast racing games with split screen. Box was dented."),
    ItemView("i3", "Dungeon Quest", ("Video Games", "PC", "Role-Playing")),
    ItemView("i4", "Street Racer Night", ("Video Games", "PC", "Racing",
                                         "This racing game includes twelve tracks and four game modes for up to four players.")),
]


def test_dominant_categories_hand_counted():
    # Video Games is in all four items (root, dropped); Racing 3, PC 3, Xbox 1, Role-Playing 1.
    # Equal counts: the deeper label first (Racing at depth 2 before PC at depth 1).
    assert dominant_categories(HISTORY) == ["Racing", "PC", "Role-Playing"]


def test_generic_labels_come_from_the_catalog_and_are_skipped():
    # Catalog of 12: "Video Games" in 12, "PC" in 5 (42% > 25%); Racing, Switch, Puzzle, Mobile and
    # Sports in 3 each (exactly 25%, not more); the rest fewer.
    catalog = [item.categories for item in HISTORY] + [("Video Games", "PC", "Strategy")] * 2 + \
        [("Video Games", "Switch", "Puzzle")] * 3 + [("Video Games", "Mobile", "Sports")] * 3
    generic = generic_category_labels(catalog)
    assert generic == {"Video Games", "PC"}
    assert dominant_categories(HISTORY, generic=generic) == ["Racing", "Role-Playing", "Xbox"]
    annotator = OfflineAnnotator()
    annotator.fit_catalog([ItemView(f"c{i}", "t", tuple(c)) for i, c in enumerate(catalog)])
    assert annotator.explicit_preference(HISTORY).startswith("Racing, Role-Playing and Xbox items")
    # When every label is generic, they are still used rather than saying nothing.
    only_generic = [ItemView("a", "Alpha", ("Video Games", "PC")), ItemView("b", "Beta", ("Video Games", "PC"))]
    assert dominant_categories(only_generic, generic=generic) == ["PC", "Video Games"]


def test_recurring_title_words_hand_counted():
    # "racer" is in three distinct titles, "sky" in two; "legend", "turbo", ... in one each.
    assert recurring_title_words(HISTORY) == ["Racer", "Sky"]


def test_explicit_preference_readable_and_grounded():
    # A phrase that reads inside the templates: "Their taste in brief: {preference}."
    sentence = OfflineAnnotator().explicit_preference(HISTORY)
    assert sentence == ('Racing, PC and Role-Playing items, especially titles about Racer and Sky '
                        '(in their words: "I love fast racing games with split screen")')
    # The feature sentence that leaked into the category list of i4 is not a label.
    assert "twelve tracks" not in sentence


def test_explicit_preference_without_reviews_or_shared_words():
    history = [ItemView("a", "Chess Master", ("Toys", "Board Games")), ItemView("b", "Puzzle Box", ("Toys", "Puzzles"))]
    sentence = OfflineAnnotator().explicit_preference(history)
    assert sentence == "Board Games and Puzzles items"


def test_deterministic_same_input_same_output():
    first = OfflineAnnotator()
    second = OfflineAnnotator()
    target = ItemView("t", "Mouse", ("Video Games", "PC", "Accessories", "Gaming Mice"), description="Designed for long sessions.")
    review = "Works great. Bought it for my son who plays every evening."
    for _ in range(3):
        assert first.explicit_preference(HISTORY) == second.explicit_preference(list(HISTORY))
        assert first.vague_intention(target, review) == second.vague_intention(target, review)
        assert first.vague_intention(target, None) == second.vague_intention(target, None)


def test_vague_intention_from_review_quotes_an_intention_sentence():
    target = ItemView("t", "Mouse", ("Video Games", "PC", "Accessories", "Gaming Mice"))
    review = "Works great. Bought it for my son who plays every evening. Five stars."
    sentence = OfflineAnnotator().vague_intention(target, review)
    # "Works great." has no intention cue; the second sentence does ("bought", "for my", "son").
    assert sentence == 'something that fits "Bought it for my son who plays every evening"'
    assert "Mouse" not in sentence


def test_vague_intention_from_metadata_when_no_review():
    target = ItemView("t", "Logi Mouse X", ("Video Games", "PC", "Accessories", "Gaming Mice"),
                      description="Designed for long gaming sessions. Six buttons.")
    sentence = OfflineAnnotator().vague_intention(target, None)
    assert sentence == 'something in Accessories, described as "Designed for long gaming sessions"'
    # Vague: neither the title nor the leaf label (that is what I2 says).
    assert "Gaming Mice" not in sentence and "Logi" not in sentence


def test_specific_intention_joins_clean_labels():
    target = ItemView("t", "Mouse", ("Video Games", "PC", "Accessories", "Gaming Mice",
                                     "Six programmable buttons and an adjustable weight system for precise control."))
    assert OfflineAnnotator().specific_intention(target) == "Video Games, PC, Accessories, Gaming Mice"
    assert specific_intention_from_categories(["Toys &amp; Games", "Toys &amp; Games", ""]) == "Toys & Games"
    assert specific_intention_from_categories([]) == ""


def test_split_sentences_strips_markup_and_fragments():
    # Tags and entities go; fragments under three words are not sentences worth quoting.
    assert split_sentences("Great <br/>game for kids &amp; me.  Too short!  ok") == ["Great game for kids & me."]


def test_empty_history_is_stated_not_invented():
    assert OfflineAnnotator().explicit_preference([]) == "nothing in particular yet"
