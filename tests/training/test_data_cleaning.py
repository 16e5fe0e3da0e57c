"""The cleaning rules, one by one, on the shapes the real 2018/2023 metadata has."""

from __future__ import annotations

import pytest

from instructrec.training.data.cleaning import (
    DESCRIPTION_MAX_CHARS, clean_categories_2018, clean_categories_2023, clean_description,
    clean_optional, clean_text, is_feature_sentence, title_problem, truncate)


@pytest.mark.parametrize("raw, clean", [
    ("Warcraft Battle Chest: Orcs &amp; Humans", "Warcraft Battle Chest: Orcs & Humans"),
    ("Rock &amp;amp; Roll", "Rock & Roll"),  # double escaped
    ("Co-Op &#8211; Coco&#8217;s &#8220;hunt&#8221;", "Co-Op – Coco’s “hunt”"),
    ("&lt;b&gt;Escaped tag&lt;/b&gt; Edition", "Escaped tag Edition"),
    ("<span class=\"a-size-large\">Halo 3</span>", "Halo 3"),
    ("Holds <b>coffee</b>.", "Holds coffee."),
    ("Line one<br/>line two<p>three</p>", "Line one line two three"),
    ("Tom <3 Jerry", "Tom <3 Jerry"),  # not a tag
    ("  spaced \t out\n title  ", "spaced out title"),
    ("bell\x07 and \x00null", "bell and null"),
    ("Pokémon Café – Ōkami 🎮", "Pokémon Café – Ōkami 🎮"),
    ("", ""), (None, ""), (42, "42"),
])
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


@pytest.mark.parametrize("title, problem", [
    ("Halo 3 - Xbox 360", None), ("Ico", None), ("1942", None), ("Ōkami", None),
    ("", "item_title_missing"),
    ("- - -", "item_title_unusable"),
    ("var aPageStart = (new Date()).getTime();", "item_title_unusable"),
    ('<span class="a-size-medium a-color-secondary a-text-normal', "item_title_unusable"),
    ("Halo 3 <div", "item_title_unusable"), ('Halo class="x"', "item_title_unusable"),
    ("Tom <3 Jerry", None), ("Pac-Man <Championship Edition", None), ("2 + 2 = 4 Math", None),
])
def test_title_problem(title, problem):
    assert title_problem(title) == problem


@pytest.mark.parametrize("label", [
    "Video Games", "PlayStation 4", "Retro Gaming & Microconsoles", "Retro Gaming; Microconsoles",
    "Faceplates, Protectors & Skins", "Gamepads & Standard Controllers", "Kindle eBooks",
    "Tools for Kids", "Nintendo 3DS & 2DS", "Men's",
])
def test_taxonomy_labels_are_kept(label):
    assert not is_feature_sentence(label, set())


@pytest.mark.parametrize("label", [
    "Officially licensed by Nintendo",  # lower-case words
    "For 1 player",
    "ESRB Rating: Teen",  # key: value
    "Includes our in house thermal compound, XBRdept Stars 900",
    "BEST Hardware kit! ALL others will FLEX your board and break your XBOX in time.",
    "Just Launched!",
    "Create, build and run the most realistic city you can imagine",
    "",
])
def test_feature_sentences_are_recognised(label):
    assert is_feature_sentence(label, set())


def test_category_path_is_cut_at_the_first_feature():
    raw = ["Video Games", "Xbox 360", "Accessories", "Accessory Kits",
           "BEST Hardware kit! ALL others will FLEX your board.", "Buy direct from XBRdepot!",
           "Cables"]  # a label-like element after a feature is dropped too
    assert clean_categories_2018(raw) == (["Video Games", "Xbox 360", "Accessories",
                                           "Accessory Kits"], 3)
    assert clean_categories_2018(["Video Games", "PC", "Games", "PC"]) == (
        ["Video Games", "PC", "Games"], 1)  # a repeat ends the path
    assert clean_categories_2018(["Sports &amp; Outdoors</span></span>", "Fan Shop"]) == (
        ["Sports & Outdoors", "Fan Shop"], 0)
    assert clean_categories_2018(None) == ([], 0)
    assert clean_categories_2018("Video Games") == (["Video Games"], 0)
    assert clean_categories_2018([["Video Games", "PC"], 3]) == (["Video Games", "PC"], 0)


def test_categories_2023():
    assert clean_categories_2023(["Video Games", "PC &amp; Mac", "Video Games"], "X") == [
        "Video Games", "PC & Mac"]
    assert clean_categories_2023([], "All Beauty") == ["All Beauty"]
    assert clean_categories_2023(None, None) == []


def test_description_and_optional_text():
    assert clean_description(["<p>One &amp; two.</p>", "", "Three"]) == "One & two. Three"
    assert clean_description([]) is None and clean_description(None) is None
    long = clean_description("word " * 1000)
    assert len(long) <= DESCRIPTION_MAX_CHARS and long.endswith("…")
    assert clean_optional("  ") is None and clean_optional(None) is None
    assert clean_optional("Nintendo &amp; Co") == "Nintendo & Co"
    assert truncate("short", 10) == "short"
    assert truncate("a few words that go on", 12) == "a few words…"
