"""Formatting: sanitised values, list layouts, the source-token budget (real Flan-T5 tokenizer),
the engine's entry points build_instruction / lists_candidates, and their errors."""

from __future__ import annotations

import itertools

import pytest

from instructrec.engine.errors import BudgetExceededError, InputError, UnknownTemplateError
from instructrec.engine.formatting import (
    build_instruction, format_candidate_list, format_history, lists_candidates, render, render_template,
    sanitize_text,
)
from instructrec.engine.templates import REGISTRY

# 20 distinct titles of different lengths, oldest first.
HISTORY = [f"Title {index:02d} " + " ".join(["Adventure Saga"] * (1 + index % 3)) + " Edition"
           for index in range(20)]


class CountingTokenizer:
    """The real tokenizer, counting its calls (the budget fit must not re-encode per dropped item)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = 0

    def __call__(self, text, add_special_tokens=True):
        self.calls += 1
        return self.tokenizer(text, add_special_tokens=add_special_tokens)


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text).input_ids)


# ---- sanitising and list layouts ---------------------------------------------------------------


@pytest.mark.parametrize("raw, clean", [
    ("Line one\nline two\ttabbed", "Line one line two tabbed"),
    ("  spaced   out  ", "spaced out"),
    ("Bell\x07 and null\x00s", "Bell and nulls"),
    ("Zero\u200bwidth and\u00a0no-break", "Zerowidth and no-break"),
    ("Deluxe {candidates} Pack", "Deluxe (candidates) Pack"),
    ("carriage\r\nreturn\x1fsep", "carriage return sep"),
    ("Café Über Straße", "Café Über Straße"),
])
def test_sanitize_text(raw, clean):
    assert sanitize_text(raw) == clean


def test_list_layouts():
    assert format_history(["Old Game", "Newer\nGame", "Newest Game"]) == "Old Game; Newer Game; Newest Game"
    assert format_candidate_list(["Alpha", "Beta {x}", "Gamma"]) == "1. Alpha\n2. Beta (x)\n3. Gamma"
    with pytest.raises(InputError) as caught:
        format_candidate_list([])
    assert caught.value.field == "candidates"
    with pytest.raises(InputError) as caught:
        format_candidate_list(["Alpha", None])
    assert caught.value.field == "candidates[1]"
    with pytest.raises(InputError) as caught:
        format_history("Alpha")  # a bare string is not a list of titles
    assert caught.value.field == "history"
    with pytest.raises(InputError) as caught:
        format_history(["Alpha", "\x00\n "])
    assert caught.value.field == "history[1]"


def test_a_title_cannot_inject_a_placeholder():
    rendered = render_template("seq-rec-02", {
        "history": ["Bonus {candidates} Disc", "Plain Game"],
        "candidates": ["{candidates}", "Second {history}"],
        "target_title": "{candidates}",
    })
    assert rendered.source.endswith(
        "oldest to newest: Bonus (candidates) Disc; Plain Game. Which of the following items will they most likely "
        "choose next? Answer with its title.\n1. (candidates)\n2. Second (history)")
    assert rendered.target == "(candidates)"
    free = build_instruction(instruction="Pick one of {candidates} please", candidates=["{candidates}", "B"])
    assert free == "Pick one of 1. (candidates)\n2. B please"


# ---- token budget ------------------------------------------------------------------------------


def reference_fit(tokenizer, template_id: str, slots: dict, budget: int) -> int:
    """Independent reference: drop the oldest items one at a time, re-rendering without a budget."""
    history = slots["history"]
    for dropped in range(len(history)):
        text = render_template(template_id, {**slots, "history": history[dropped:]}).source
        if count(tokenizer, text) <= budget:
            return dropped
    raise AssertionError("nothing fits")


@pytest.mark.parametrize("template_id, budget", [
    ("seq-rec-01", 60), ("seq-rec-01", 97), ("seq-rec-01", 150), ("pers-search-07", 120),
    ("pers-search-24", 200), ("seq-rec-18", 171),
])
def test_budget_drops_the_oldest_history_first(tokenizer, template_id, budget):
    slots = {"history": HISTORY, "intention": "a co-op game for two", "preference": "long story-driven quests",
             "context": "a long train ride", "candidates": ["Sky Pirates", "Deep Sea Quest", "Farm Days"]}
    full = render_template(template_id, slots)
    assert count(tokenizer, full.source) > budget  # the case needs dropping
    counting = CountingTokenizer(tokenizer)
    rendered = render_template(template_id, slots, tokenizer=counting, max_source_tokens=budget)
    expected_dropped = reference_fit(tokenizer, template_id, slots, budget)
    assert rendered.dropped_history == expected_dropped > 0
    assert rendered.source == render_template(template_id, {**slots, "history": HISTORY[expected_dropped:]}).source
    assert rendered.source_tokens == count(tokenizer, rendered.source) <= budget
    kept = "; ".join(HISTORY[expected_dropped:])
    assert kept in rendered.source and HISTORY[expected_dropped - 1] not in rendered.source
    if "candidates" in slots and REGISTRY[template_id].lists_candidates:
        assert rendered.source.endswith("1. Sky Pirates\n2. Deep Sea Quest\n3. Farm Days")
    # One full count, one batch of item counts, then a couple of confirming counts.
    assert counting.calls <= 5


def test_budget_costs_one_tokenizer_call_when_everything_fits(tokenizer):
    counting = CountingTokenizer(tokenizer)
    rendered = render_template("seq-rec-01", {"history": HISTORY}, tokenizer=counting)
    assert counting.calls == 1 and rendered.dropped_history == 0
    assert rendered.source_tokens == count(tokenizer, rendered.source) <= 512


def test_history_is_capped_at_the_newest_twenty():
    history = [f"Game {index}" for index in range(25)]
    rendered = render_template("seq-rec-01", {"history": history})
    assert rendered.dropped_history == 5
    assert "oldest to newest: Game 5; Game 6;" in rendered.source and "Game 24." in rendered.source
    assert "Game 4;" not in rendered.source


def test_candidates_alone_over_budget_is_a_clear_error(tokenizer):
    candidates = [f"Candidate {index} " + "Extended Collector Bundle " * 4 for index in range(40)]
    with pytest.raises(BudgetExceededError) as caught:
        build_instruction(history=HISTORY, template="seq-rec-02", candidates=candidates, tokenizer=tokenizer)
    error = caught.value
    assert error.field == "candidates" and error.kind == "over_budget"
    assert "group size" in str(error) and "512" in str(error)
    # The same candidates split into groups of 5 fit, keeping the newest history.
    grouped = build_instruction(history=HISTORY, template="seq-rec-02", candidates=candidates[:5], tokenizer=tokenizer)
    assert count(tokenizer, grouped) <= 512 and HISTORY[-1] in grouped
    with pytest.raises(BudgetExceededError) as caught:
        build_instruction(instruction="Choose: {candidates}", candidates=candidates, tokenizer=tokenizer)
    assert caught.value.field == "candidates"


def test_long_text_over_budget_names_the_field(tokenizer):
    with pytest.raises(BudgetExceededError) as caught:
        build_instruction(preference="likes " + "very " * 600 + "long games", tokenizer=tokenizer)
    assert caught.value.field == "preference"
    with pytest.raises(BudgetExceededError) as caught:
        build_instruction(instruction="word " * 600, tokenizer=tokenizer)
    assert caught.value.field == "instruction"
    with pytest.raises(InputError) as caught:
        build_instruction(history=HISTORY, tokenizer=tokenizer, max_source_tokens=0)
    assert caught.value.field == "max_source_tokens"


# ---- build_instruction -------------------------------------------------------------------------

# The documented defaults, written out by hand: (history, preference, intention_kind, context) -> id.
EXPECTED_DEFAULTS = {
    (True, False, None, False): "seq-rec-01", (True, False, None, True): "seq-rec-15",
    (False, True, None, False): "seq-rec-05", (False, True, None, True): "seq-rec-16",
    (True, True, None, False): "seq-rec-08", (True, True, None, True): "seq-rec-17",
    (False, False, "vague", False): "prod-search-01", (False, False, "vague", True): "prod-search-10",
    (False, False, "specific", False): "prod-search-02", (False, False, "specific", True): "prod-search-11",
    (True, False, "vague", False): "pers-search-01", (True, False, "vague", True): "pers-search-20",
    (True, False, "specific", False): "pers-search-02", (True, False, "specific", True): "pers-search-21",
    (False, True, "vague", False): "pers-search-03", (False, True, "vague", True): "pers-search-22",
    (False, True, "specific", False): "pers-search-04", (False, True, "specific", True): "pers-search-23",
    (True, True, "vague", False): "pers-search-05", (True, True, "vague", True): "pers-search-24",
    (True, True, "specific", False): "pers-search-06", (True, True, "specific", True): "pers-search-25",
}
FIELDS = {"history": ["Old Game", "New Game"], "preference": "cozy farming games", "intention": "a relaxing game",
          "context": "late evening"}


@pytest.mark.parametrize("has_history, has_preference, intention_kind, has_context",
                         list(itertools.product([True, False], [True, False], [None, "vague", "specific"],
                                                [False, True])))
def test_defaults_for_each_field_combination(has_history, has_preference, intention_kind, has_context):
    request = {
        "history": FIELDS["history"] if has_history else None,
        "preference": FIELDS["preference"] if has_preference else None,
        "intention": FIELDS["intention"] if intention_kind else None,
        "intention_kind": intention_kind,
        "context": FIELDS["context"] if has_context else None,
    }
    key = (has_history, has_preference, intention_kind, has_context)
    if key not in EXPECTED_DEFAULTS:  # no need stated at all (context alone is not one)
        with pytest.raises(InputError) as caught:
            build_instruction(**request, candidates=["A", "B"])
        assert caught.value.field == "instruction"
        return
    text = build_instruction(**request, candidates=["Listed Never", "Listed Either"])
    slots = {name: value for name, value in request.items() if name != "intention_kind"}
    assert text == render_template(EXPECTED_DEFAULTS[key], slots).source
    assert "Listed Never" not in text  # the defaults are matching forms: candidates are scored, not listed
    assert not lists_candidates(**request)


def test_default_text_for_history_alone():
    assert build_instruction(history=["Old Game", "New Game"]) == (
        "Past purchases of this shopper, oldest to newest: Old Game; New Game. "
        "Based on this sequence, name the item they are most likely to want next.")


def test_intention_without_kind_reads_as_vague():
    assert build_instruction(intention="a relaxing game") == build_instruction(
        intention="a relaxing game", intention_kind="vague")
    with pytest.raises(InputError) as caught:
        build_instruction(intention="x", intention_kind="precise")
    assert caught.value.field == "intention_kind"
    with pytest.raises(InputError) as caught:
        build_instruction(history=["A"], intention_kind="vague")
    assert caught.value.field == "intention_kind"


def test_explicit_template_lists_candidates():
    text = build_instruction(history=["Old Game", "New Game"], intention="a relaxing game",
                             template="pers-search-07", candidates=["Farm Days", "Sky Pirates"])
    assert text == ("Past purchases of this shopper, oldest to newest: Old Game; New Game. "
                    "What they are looking for now: a relaxing game. Pick the candidate that fits them best.\n"
                    "1. Farm Days\n2. Sky Pirates")


def test_free_instruction():
    assert build_instruction(instruction="Something for my {niece}", candidates=["A"]) == "Something for my {niece}"
    assert build_instruction(instruction="Best of {candidates} for {me}", candidates=["A", "B"]) == (
        "Best of 1. A\n2. B for {me}")
    with pytest.raises(InputError) as caught:
        build_instruction(instruction="Pick from {candidates}")
    assert caught.value.field == "candidates"
    with pytest.raises(InputError) as caught:
        build_instruction(instruction="   ")
    assert caught.value.field == "instruction"


def test_lists_candidates():
    assert lists_candidates(instruction="Pick from {candidates}")
    assert not lists_candidates(instruction="Something fun")
    assert lists_candidates(template="seq-rec-02") and lists_candidates(template="pers-search-19")
    assert not lists_candidates(template="seq-rec-01")
    assert not lists_candidates(history=["A"], intention="x")
    assert {tid for tid in REGISTRY if lists_candidates(template=tid)} == {
        tid for tid, template in REGISTRY.items() if "{candidates}" in template.source}
    with pytest.raises(UnknownTemplateError):
        lists_candidates(template="seq-rec-99")
    with pytest.raises(InputError) as caught:
        lists_candidates(instruction="x", template="seq-rec-02")
    assert caught.value.field == "template"


@pytest.mark.parametrize("request_fields, field", [
    ({"instruction": "x", "template": "seq-rec-01"}, "template"),
    ({"instruction": "x", "history": ["A"]}, "history"),
    ({}, "instruction"),
    ({"context": "at home"}, "instruction"),
    ({"template": "pers-search-01", "history": ["A"]}, "intention"),  # the template's slot is null
    ({"template": "seq-rec-02", "history": ["A"]}, "candidates"),
    ({"template": "seq-rec-01", "history": ["A"], "context": "at home"}, "context"),  # no slot for it
    ({"template": "seq-rec-03", "history": ["A"]}, "template"),  # pointwise: training only
    ({"template": "seq-rec-10", "history": ["A"]}, "template"),  # reasoning target: training only
    ({"template": "prod-search-02", "intention": "x", "intention_kind": "vague"}, "intention_kind"),
    ({"history": ["A", None]}, "history[1]"),
    ({"history": "A single string"}, "history"),
    ({"preference": 3}, "preference"),
])
def test_build_instruction_errors_name_the_field(request_fields, field):
    with pytest.raises(InputError) as caught:
        build_instruction(**request_fields)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_unknown_template_in_a_request():
    with pytest.raises(UnknownTemplateError) as caught:
        build_instruction(history=["A"], template="pers-search-7")
    assert "pers-search-07" in str(caught.value)


# ---- over-budget messages and the character cap -------------------------------------------------


def _balanced(message: str) -> bool:
    depth = 0
    for char in message:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


@pytest.mark.parametrize("fields", [
    dict(template="seq-rec-02", candidates=["Tetris", "Doom"]),  # lists its candidates
    dict(preference="likes racing games"),  # a text field beside the history
    dict(),  # the history alone
])
def test_an_over_long_history_item_is_blamed_not_the_candidates(tokenizer, fields):
    history = ["Old Game", "Adventure " * 300 + "Saga"]  # the newest item, which is always kept
    with pytest.raises(BudgetExceededError) as caught:
        build_instruction(history=history, tokenizer=tokenizer, max_source_tokens=128, **fields)
    error = caught.value
    assert error.field == "history" and error.kind == "over_budget"
    message = str(error)
    assert "candidates" not in message and "newest history item" in message
    assert _balanced(message) and message.endswith(")")


def test_every_over_budget_message_closes_its_parentheses(tokenizer):
    candidates = [f"Candidate {index} " + "Extended Collector Bundle " * 4 for index in range(40)]
    cases = [dict(history=HISTORY, template="seq-rec-02", candidates=candidates),
             dict(instruction="Choose: {candidates}", candidates=candidates),
             dict(instruction="word " * 600), dict(preference="likes " + "very " * 600 + "long games")]
    for fields in cases:
        with pytest.raises(BudgetExceededError) as caught:
            build_instruction(tokenizer=tokenizer, **fields)
        assert _balanced(str(caught.value)) and str(caught.value).endswith(")"), str(caught.value)


def test_text_over_the_character_cap_is_refused_without_tokenizing(tokenizer):
    """A free-text instruction of any size costs no tokenization to refuse; a huge old history
    item is dropped before anything is tokenized, and the newest items still make the request."""
    counting = CountingTokenizer(tokenizer)
    huge = "word " * 200_000  # 1 MB
    with pytest.raises(BudgetExceededError) as caught:
        build_instruction(instruction=huge, tokenizer=counting)
    assert caught.value.field == "instruction" and "1,000,000 characters" in str(caught.value)
    assert counting.calls == 0
    text, ids = render(history=[huge, "Tetris", "Halo 3"], tokenizer=counting)
    assert text == build_instruction(history=["Tetris", "Halo 3"]) and counting.calls <= 2
    assert ids == tokenizer(text).input_ids  # the ids it counted are the model's input
    with pytest.raises(BudgetExceededError) as caught:
        render(history=["Tetris", huge], tokenizer=counting)  # the newest item itself
    assert caught.value.field == "history" and "characters" in str(caught.value)


def test_render_returns_the_ids_it_counted(tokenizer):
    counting = CountingTokenizer(tokenizer)
    text, ids = render(history=HISTORY, tokenizer=counting, max_source_tokens=97)
    assert ids == tokenizer(text).input_ids and len(ids) <= 97
    assert render(history=HISTORY) == (build_instruction(history=HISTORY), None)  # no tokenizer, no ids


def test_counting_an_over_budget_history_prints_no_tokenizer_length_warning(tokenizer_dir, capfd):
    # The budget fit counts the untrimmed text first; Hugging Face would warn that a text longer
    # than model_max_length "will result in indexing errors", which never happens here (the text is
    # trimmed before the model sees it). A fresh tokenizer: the warning is printed once per instance.
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(tokenizer_dir)
    long_history = [f"{title} Remastered Collector Bundle with Soundtrack, Art Book and Season Pass" for title in HISTORY]
    text, ids = render(history=long_history, template="seq-rec-01", tokenizer=fresh, max_source_tokens=512)
    assert len(ids) <= 512 and ids == list(fresh(text, verbose=False).input_ids)
    assert "Title 00 " not in text and "Title 19 " in text  # over budget untrimmed: the oldest was dropped
    assert "sequence length is longer than" not in capfd.readouterr().err
