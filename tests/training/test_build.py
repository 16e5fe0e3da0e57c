"""Instruction dataset building on a small hand-made prepared directory (the four tables of the
data layer's contract, written directly so every count can be checked by hand)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from instructrec.engine.errors import InputError, UnknownTemplateError
from instructrec.engine.templates import REGISTRY
from instructrec.training.annotation import OfflineAnnotator
from instructrec.training.build import OUTPUT_COLUMNS, build_instructions, output_schema

import instructrec_test_instruction_fixtures as fixtures  # registered by conftest.py

ITEMS, SEQUENCES, SEARCH_SPLITS, CANDIDATES = fixtures.ITEMS, fixtures.SEQUENCES, fixtures.SEARCH_SPLITS, fixtures.CANDIDATES
write_prepared = fixtures.write_prepared


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def built(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    report = build_instructions(prepared, out, annotator=OfflineAnnotator(), per_user=6, seed=3)
    return out, report, {split: pq.read_table(out / f"{split}.parquet").to_pylist() for split in ("train", "valid", "test")}


def split_of(user: str, item: str) -> str:
    sequence = [i for i, _ in SEQUENCES[user]]
    position = sequence.index(item)
    return "test" if position == len(sequence) - 1 else "valid" if position == len(sequence) - 2 else "train"


def test_schema_is_the_contract(built):
    out, _, rows = built
    for split in ("train", "valid", "test"):
        table = pq.read_table(out / f"{split}.parquet")
        assert table.schema.equals(output_schema())
        assert tuple(table.column_names) == OUTPUT_COLUMNS
        assert all(r["split"] == split and r["annotator"] == "offline" for r in rows[split])
        for r in rows[split]:
            template = REGISTRY[r["template"]]
            assert (r["preference"], r["intention"], r["task"], r["strategy"], r["scenario"]) == (
                template.preference.value, template.intention.value, template.task.value, template.strategy.value,
                template.scenario.value)
            assert r["instruction"] and r["target"]


def test_train_rows_never_touch_valid_or_test_interactions(built):
    _, _, rows = built
    user_rows = [r for r in rows["train"] if r["user_id"] is not None]
    assert {r["user_id"] for r in user_rows} == {"u1", "u2", "u3"}
    for row in user_rows:
        user = row["user_id"]
        assert split_of(user, row["target_item_id"]) == "train"
        held_out = [ITEMS[i][0] for i, _ in SEQUENCES[user] if split_of(user, i) != "train"]
        for title in held_out:
            assert title not in row["instruction"], (row["template"], title)
            assert title not in row["target"]
        # Negatives shown to the user are items they never interacted with.
        own = {i for i, _ in SEQUENCES[user]}
        for item in row["candidate_ids"] or []:
            assert item == row["target_item_id"] or item not in own
        # Reviews of held-out items are not quoted either.
        for item, review in SEQUENCES[user]:
            if review and split_of(user, item) != "train":
                assert review.rstrip(".") not in row["instruction"] + row["target"]


def test_train_targets_have_history_and_first_item_is_never_a_target(built):
    _, _, rows = built
    # u2 has two train items: only the second (i07) can be a target; u1: i02, i03; u3: i10, i11, i01.
    targets = {(r["user_id"], r["target_item_id"]) for r in rows["train"] if r["user_id"]}
    assert targets == {("u1", "i02"), ("u1", "i03"), ("u2", "i07"), ("u3", "i10"), ("u3", "i11"), ("u3", "i01")}
    # per_user=6 rows each (targets repeat with other templates when a user has fewer than 6).
    assert Counter(r["user_id"] for r in rows["train"] if r["user_id"]) == {"u1": 6, "u2": 6, "u3": 6}


def test_reranking_targets_are_among_listed_candidates(built):
    _, _, rows = built
    t3 = [r for split in rows.values() for r in split if r["task"] == "T3"]
    assert t3
    for row in t3:
        assert row["target_item_id"] in row["candidate_ids"]
        assert len(row["candidates"]) == len(row["candidate_ids"]) == 4  # as the stored lists
        for number, title in enumerate(row["candidates"], start=1):
            assert f"{number}. {title}" in row["instruction"]
        title = ITEMS[row["target_item_id"]][0]
        assert row["target"] == title or row["target"].rstrip(".").endswith(title)


def test_eval_rows_use_the_stored_candidate_lists(built):
    _, report, rows = built
    stored = {(u, s): (t, c) for u, s, t, c in CANDIDATES}
    for split in ("valid", "test"):
        user_rows = [r for r in rows[split] if r["user_id"] is not None]
        # Default evaluation templates, listed (T3) and not (T2), for 3 users.
        assert Counter(r["template"] for r in user_rows) == {
            "seq-rec-02": 3, "pers-search-07": 3, "pers-search-08": 3, "seq-rec-01": 3, "pers-search-01": 3,
            "pers-search-02": 3}
        for row in user_rows:
            target, candidate_ids = stored[(row["user_id"], split)]
            assert row["target_item_id"] == target and row["candidate_ids"] == candidate_ids
            assert row["candidates"] == [ITEMS[i][0] for i in candidate_ids]
            assert row["target"] == ITEMS[target][0]
    # u1's test history is everything before i05, valid included; its valid history stops before i04.
    test_row = next(r for r in rows["test"] if r["user_id"] == "u1" and r["template"] == "seq-rec-02")
    assert "Turbo Kart Racer; Night Street Racer; Dragon Quest Saga; Rally Racer Pro." in test_row["instruction"]
    valid_row = next(r for r in rows["valid"] if r["user_id"] == "u1" and r["template"] == "seq-rec-02")
    assert "Turbo Kart Racer; Night Street Racer; Dragon Quest Saga." in valid_row["instruction"]
    assert "Rally Racer Pro" not in valid_row["instruction"].split("\n")[0]


def test_product_search_rows_follow_search_splits(built):
    _, _, rows = built
    search = {split: [r for r in rows[split] if r["scenario"] == "product_search"] for split in rows}
    assert all(r["user_id"] is None for split in search.values() for r in split)
    assert {r["target_item_id"] for r in search["valid"]} == {"i12"}
    assert {r["target_item_id"] for r in search["test"]} == {"i13"}
    assert Counter(r["template"] for r in search["test"]) == {"prod-search-03": 1, "prod-search-04": 1,
                                                              "prod-search-01": 1, "prod-search-02": 1}
    # Every evaluation template of an item lists the same candidates in the same order (the T2
    # rows store them too): each template and each method must rank one list.
    for split in ("valid", "test"):
        lists = {tuple(r["candidate_ids"]) for r in search[split]}
        assert len(lists) == 1 and len(next(iter(lists))) == 4, (split, lists)  # the stored lists have 4
        only = next(iter(lists))
        assert only.count(search[split][0]["target_item_id"]) == 1
        listing = [r for r in search[split] if REGISTRY[r["template"]].lists_candidates]
        assert listing and all(r["candidates"] == [ITEMS[i][0] for i in only] for r in listing)
    train_items = {r["target_item_id"] for r in search["train"]}
    assert train_items == {i for i, s in SEARCH_SPLITS.items() if s == "train"}
    # i12's I1 comes from its only review (u3's, test split: fine for an evaluation row).
    vague = next(r for r in search["valid"] if r["template"] == "prod-search-03")
    assert "\"Needed a precise mouse for strategy games\"" in vague["instruction"]
    specific = next(r for r in search["valid"] if r["template"] == "prod-search-04")
    assert "Video Games, PC, Accessories, Gaming Mice" in specific["instruction"]


def test_pointwise_rows_are_balanced(prepared, tmp_path):
    report = build_instructions(prepared, tmp_path, annotator=OfflineAnnotator(), per_user=8, seed=0,
                                templates="seq-rec-03,seq-rec-07,pers-search-13,prod-search-05")
    rows = pq.read_table(tmp_path / "train.parquet").to_pylist()
    answers = Counter(r["target"] for r in rows)
    assert set(answers) == {"Yes", "No"} and abs(answers["Yes"] - answers["No"]) <= 1
    assert report["splits"]["train"]["yes_targets"] == answers["Yes"]
    for row in rows:
        (asked,) = row["candidate_ids"]
        own = {i for i, _ in SEQUENCES[row["user_id"]]} if row["user_id"] else {row["target_item_id"]}
        if row["target"] == "Yes":
            assert asked == row["target_item_id"]
        else:
            assert asked != row["target_item_id"] and asked not in own
        assert ITEMS[asked][0] in row["instruction"]
    # No evaluation template selected: valid/test hold no rows, and say so.
    assert report["rows"]["valid"] == report["rows"]["test"] == 0


def test_strategies_make_their_targets(prepared, tmp_path):
    build_instructions(prepared, tmp_path, annotator=OfflineAnnotator(), per_user=6, seed=1,
                       templates="seq-rec-14,prod-search-08,seq-rec-10,pers-search-15")
    rows = pq.read_table(tmp_path / "train.parquet").to_pylist()
    by_template = {}
    for row in rows:
        by_template.setdefault(row["template"], []).append(row)
    for row in by_template["seq-rec-14"]:  # turn-around: the latest past item
        sequence = [i for i, _ in SEQUENCES[row["user_id"]]]
        previous = sequence[sequence.index(row["target_item_id"]) - 1]
        assert row["target"] == ITEMS[previous][0]
    for row in by_template["prod-search-08"]:  # turn-around: the category path of the item
        assert row["target"] == ", ".join(ITEMS[row["target_item_id"]][1])
    for row in by_template["seq-rec-10"]:  # chain of thought ends with the title
        assert row["target"].rstrip(".").endswith(ITEMS[row["target_item_id"]][0])
        assert "items" in row["target"]  # the offline preference phrase is embedded
    for row in by_template["pers-search-15"]:  # turn-around: the vague intention of the next item
        assert row["target"].startswith("something")
        assert ITEMS[row["target_item_id"]][0] in row["instruction"]


def test_deterministic_per_seed_and_different_across_seeds(prepared, tmp_path):
    def build(seed, name):
        build_instructions(prepared, tmp_path / name, annotator=OfflineAnnotator(), per_user=3, seed=seed)
        return {s: pq.read_table(tmp_path / name / f"{s}.parquet").to_pylist() for s in ("train", "valid", "test")}

    first, again, other = build(5, "a"), build(5, "b"), build(6, "c")
    assert first == again
    assert first["train"] != other["train"]
    # Valid/test user rows come from the stored lists: the same whatever the seed.
    assert [r for r in first["test"] if r["user_id"]] == [r for r in other["test"] if r["user_id"]]


def test_stats_match_hand_counts(prepared, tmp_path):
    # Only seq-rec-02 for training and evaluation, one row per user, no product search.
    report = build_instructions(prepared, tmp_path, annotator=OfflineAnnotator(), per_user=1, seed=0,
                                templates="seq-rec-02")
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["rows"] == {"train": 3, "valid": 3, "test": 3}
    for split in ("train", "valid", "test"):
        rows = pq.read_table(tmp_path / f"{split}.parquet").to_pylist()
        s = stats["splits"][split]
        assert s["instructions"] == 3 and s["with_preference"] == 3 and s["with_intention"] == 0
        assert s["mean_instruction_words"] == round(sum(len(r["instruction"].split()) for r in rows) / 3, 2)
        assert s["coarse_templates_by_group"] == {"preference_related": 1, "intention_related": 0, "combined": 0}
        assert s["by_task"] == {"T3": 3}
    # Hand count of one instruction: u1 valid: history of 3 titles (3+3+3 words), 4 candidates.
    valid = pq.read_table(tmp_path / "valid.parquet").to_pylist()
    u1 = next(r for r in valid if r["user_id"] == "u1")
    expected = ("Past purchases of this shopper, oldest to newest: Turbo Kart Racer; Night Street Racer; "
                "Dragon Quest Saga. Which of the following items will they most likely choose next? Answer with "
                "its title.\n1. Space Marine Tactics\n2. Rally Racer Pro\n3. Soccer Stars\n4. Tennis Champ")
    assert u1["instruction"] == expected
    markdown = (tmp_path / "stats.md").read_text()
    assert "| # fine-grained instructions | 3 | 3 | 3 |" in markdown
    assert report["splits"] == stats["splits"]


def test_token_budget_drops_oldest_history_first(prepared, tmp_path, tokenizer):
    roomy = build_instructions(prepared, tmp_path / "roomy", annotator=OfflineAnnotator(), per_user=1,
                               templates="seq-rec-02", tokenizer=tokenizer, max_source_tokens=512)
    full = next(r for r in pq.read_table(tmp_path / "roomy" / "test.parquet").to_pylist() if r["user_id"] == "u3")
    assert "Space Marine Tactics; Galaxy Command" in full["instruction"]
    n_full = len(tokenizer(full["instruction"]).input_ids)
    # A budget a few tokens short of the full source: the oldest title must go.
    budget = n_full - 3
    tight = build_instructions(prepared, tmp_path / "tight", annotator=OfflineAnnotator(), per_user=1,
                               templates="seq-rec-02", tokenizer=tokenizer, max_source_tokens=budget)
    assert roomy["token_budget"] == 512 and tight["token_budget"] == budget
    row = next(r for r in pq.read_table(tmp_path / "tight" / "test.parquet").to_pylist() if r["user_id"] == "u3")
    assert len(tokenizer(row["instruction"]).input_ids) <= budget
    history = row["instruction"].split(": ", 1)[1].split(". Which")[0].split("; ")
    # The newest items are kept, in order; only the oldest went.
    assert history == ["Galaxy Command", "Fleet Admiral", "Turbo Kart Racer", "Night Street Racer"]
    # Candidates are never cut.
    assert row["instruction"].split("\n")[1:] == full["instruction"].split("\n")[1:]


def test_bad_arguments_are_typed(prepared, tmp_path):
    with pytest.raises(UnknownTemplateError):
        build_instructions(prepared, tmp_path, annotator=OfflineAnnotator(), templates="seq-rec-99")
    with pytest.raises(InputError) as caught:
        build_instructions(tmp_path / "missing", tmp_path, annotator=OfflineAnnotator())
    assert caught.value.field == "data"
    with pytest.raises(InputError) as caught:
        build_instructions(prepared, tmp_path, annotator=OfflineAnnotator(), per_user=-1)
    assert caught.value.field == "per_user"
    with pytest.raises(InputError) as caught:
        build_instructions(prepared, tmp_path, annotator=OfflineAnnotator(), eval_templates="seq-rec-12")
    assert caught.value.field == "eval_templates"


def test_cli_templates_lists_the_registry(capsys):
    from instructrec.cli import main

    assert main(["instructions", "templates", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [entry["id"] for entry in listed] == list(REGISTRY)
    assert main(["instructions", "templates"]) == 0
    table = capsys.readouterr().out
    assert f"{len(REGISTRY)} templates" in table and "pers-search-08" in table


def test_cli_build_end_to_end(prepared, tmp_path, capsys):
    from instructrec.cli import main

    out = tmp_path / "cli"
    code = main(["instructions", "build", "--data", str(prepared), "--out", str(out), "--per-user", "2",
                 "--seed", "7", "--templates", "seq-rec-01,seq-rec-02,pers-search-08,prod-search-04",
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "# fine-grained instructions" in printed
    stats = json.loads((out / "stats.json").read_text())
    # 3 users x 2 train rows + 12 search-train items x 1; valid/test: 3 users x 3 templates + 1 item.
    assert stats["rows"] == {"train": 6 + 12, "valid": 10, "test": 10}
    assert stats["templates"] == ["seq-rec-01", "seq-rec-02", "pers-search-08", "prod-search-04"]
    assert stats["eval_templates"] == ["seq-rec-02", "pers-search-08", "prod-search-04", "seq-rec-01"]
    # The same build through the Python function gives the same rows.
    build_instructions(prepared, tmp_path / "py", annotator=OfflineAnnotator(), per_user=2, seed=7,
                       templates=["seq-rec-01", "seq-rec-02", "pers-search-08", "prod-search-04"])
    for split in ("train", "valid", "test"):
        assert pq.read_table(out / f"{split}.parquet").equals(pq.read_table(tmp_path / "py" / f"{split}.parquet"))


def test_cli_build_with_teacher_uses_endpoint_and_cache(prepared, tmp_path, monkeypatch):
    from instructrec.cli import main

    out = tmp_path / "teacher"
    args = ["instructions", "build", "--data", str(prepared), "--out", str(out), "--annotator", "teacher",
            "--per-user", "1", "--templates", "seq-rec-05,pers-search-01", "--no-progress"]
    with fixtures.ScriptedChatServer() as server:
        monkeypatch.setenv("INSTRUCTREC_TEACHER_BASE_URL", server.base_url)
        monkeypatch.setenv("INSTRUCTREC_TEACHER_MODEL", "tiny-teacher")
        monkeypatch.delenv("INSTRUCTREC_TEACHER_CACHE_DIR", raising=False)
        assert main(args) == 0
        first = server.requests
        assert first > 0
        rows = pq.read_table(out / "train.parquet").to_pylist()
        assert rows and all(r["annotator"] == "teacher:tiny-teacher" for r in rows)
        assert all("Answer to:" in r["instruction"] for r in rows)
        assert (out / ".teacher-cache").is_dir()
        # A rerun pays nothing: every answer comes from the cache.
        assert main(args) == 0
        assert server.requests == first


def test_cli_teacher_without_endpoint_names_the_variable(prepared, tmp_path, monkeypatch, caplog):
    from instructrec.cli import main

    monkeypatch.delenv("INSTRUCTREC_TEACHER_BASE_URL", raising=False)
    # The dispatcher's contract: an InstructRecError is one ERROR line and exit status 2.
    assert main(["instructions", "build", "--data", str(prepared), "--out", str(tmp_path), "--annotator",
                 "teacher"]) == 2
    [message] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert message.startswith("INSTRUCTREC_TEACHER_BASE_URL: is not set")


def test_the_cli_help_names_the_default_evaluation_templates():
    """`instructions build --help` lists DEFAULT_EVAL_TEMPLATE_IDS, in its order: the CLI keeps its
    own copy (importing the builder would slow every command's start), so this guards the two."""
    import argparse
    import re

    from instructrec.training import instructions_cli
    from instructrec.training.build import DEFAULT_EVAL_TEMPLATE_IDS

    parser = argparse.ArgumentParser()
    instructions_cli.register(parser.add_subparsers())
    build = parser._subparsers._group_actions[0].choices["instructions"]._subparsers._group_actions[0].choices["build"]
    [action] = [a for a in build._actions if "--eval-templates" in a.option_strings]
    listed = re.findall(r"[a-z]+-[a-z]+-\d\d", action.help)
    assert tuple(listed) == DEFAULT_EVAL_TEMPLATE_IDS
