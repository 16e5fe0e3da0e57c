"""`instructrec mine-negatives` and `train --rank-negatives-from mined`: each row's negatives are
the retriever's top items for its history (checked against the retriever's own candidate scores
over the whole catalogue, the history rebuilt from interactions.parquet), never an item the user
touched; the trainer's pool draws them as titles of the row's template and fills short rows
uniformly; refusals name the field."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from instructrec.engine.errors import InputError
from instructrec.training.mine_negatives import mine_negatives
from instructrec.training.tune_data import (MINED_COLUMN, MINED_SCORES_COLUMN, TARGET_SCORE_COLUMN,
                                            MinedNegativePool, NegativePool)

PER_ROW = 5
RANDOM_PER_ROW = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread):
    from instructrec.training.annotation import make_annotator
    from instructrec.training.build import build_instructions
    from instructrec.training.data import synth
    from instructrec.training.data.pipeline import prepare

    root = tmp_path_factory.mktemp("mine-world")
    reviews, meta = synth(root / "raw", users=60, items=120, seed=5)
    prepare(reviews, meta, root / "prepared", seed=0, k_core=2)
    build_instructions(root / "prepared", root / "instructions", annotator=make_annotator("offline"),
                       templates="seq-rec-01,pers-search-01,prod-search-01", per_user=3, seed=0)
    report = mine_negatives(root / "instructions", root / "prepared", root / "mined", per_row=PER_ROW, max_epochs=2)
    return root, report


@pytest.fixture(scope="module")
def refitted(world):
    """The retriever mine_negatives fits, fitted again with the same seed and data (deterministic
    on one thread), and the prepared data."""
    from instructrec.training.baselines import TwoTowerRetriever, load_prepared
    from instructrec.training.eval_domain import sample_labeled

    root, _ = world
    prepared = load_prepared(root / "prepared")
    retriever = TwoTowerRetriever(kind="user", seed=0, max_epochs=2)
    retriever.fit(prepared.train, sample_labeled(prepared.valid, 3000, 0))
    return retriever, prepared


def logits_by_hand(retriever, history, items) -> np.ndarray:
    """cosine / temperature of the history's user vector and each item's vector (the whole
    catalogue's table, not the scorer's per-candidate path)."""
    import torch

    from instructrec.training.baselines import RankingRequest

    with torch.no_grad():
        user = retriever._request_vectors([RankingRequest("", tuple(history), ())])[0]
    table = retriever.all_item_vectors()
    rows = table[list(retriever.items.indices(items))]
    return (rows @ user / retriever.config.temperature).double().numpy()


def user_sequences(prepared):
    """user -> (training items in order, every item of any split), from interactions.parquet."""
    rows = pq.read_table(prepared / "interactions.parquet").to_pylist()
    train, every = {}, {}
    for r in sorted(rows, key=lambda r: (r["user_id"], r["position"])):
        every.setdefault(r["user_id"], set()).add(r["item_id"])
        if r["split"] == "train":
            train.setdefault(r["user_id"], []).append(r["item_id"])
    return train, every


def test_each_row_holds_the_retrievers_top_items_for_its_history_never_one_the_user_touched(world, refitted):
    from instructrec.training.baselines import RankingRequest

    root, report = world
    rows = pq.read_table(root / "mined" / "train.parquet").to_pylist()
    original = pq.read_table(root / "instructions" / "train.parquet")
    assert len(rows) == original.num_rows and [r["instruction"] for r in rows] == original["instruction"].to_pylist()
    train_seq, every = user_sequences(root / "prepared")
    retriever, prepared = refitted
    catalogue = list(prepared.train.items.item_ids)
    checked = 0
    for row in rows:
        sequence = train_seq.get(row["user_id"], [])
        if row["target_item_id"] not in sequence or sequence.index(row["target_item_id"]) == 0:
            assert row[MINED_COLUMN] == []
            continue
        history = sequence[:sequence.index(row["target_item_id"])]
        mined = row[MINED_COLUMN]
        assert len(mined) == PER_ROW == len(set(mined))
        assert not set(mined) & (every[row["user_id"]] | {row["target_item_id"]})
        allowed = [i for i in catalogue if i not in every[row["user_id"]] and i not in history]
        scores = retriever.score([RankingRequest(row["user_id"], tuple(history), tuple(allowed))])[0]
        best = [allowed[j] for j in np.argsort(-scores, kind="stable")[:PER_ROW]]
        assert mined == best
        # the stored scores are the retriever's logits for the history
        np.testing.assert_allclose(row[MINED_SCORES_COLUMN], logits_by_hand(retriever, history, mined), atol=1e-5)
        assert row[TARGET_SCORE_COLUMN] == pytest.approx(
            float(logits_by_hand(retriever, history, [row["target_item_id"]])[0]), abs=1e-5)
        checked += 1
    assert checked > 20
    assert report["rows_with_negatives"] == checked and report["rows"] == len(rows)
    assert report["retriever"]["valid_lists"] == len(prepared.valid) < 3000  # what it early-stopped on
    written = json.loads((root / "mined" / "negatives.json").read_text())
    assert written == json.loads(json.dumps(report))
    # product search rows have no user: no history, no negatives
    assert all(r[MINED_COLUMN] == [] == r[MINED_SCORES_COLUMN] and r[TARGET_SCORE_COLUMN] is None
               for r in rows if r["template"] == "prod-search-01")
    assert (root / "mined" / "valid.parquet").resolve() == (root / "instructions" / "valid.parquet").resolve()


def test_uniform_items_follow_the_retrieved_ones_scored_and_never_touched(world, refitted, tmp_path):
    root, _ = world
    retriever, _ = refitted
    report = mine_negatives(root / "instructions", root / "prepared", tmp_path / "mixed", per_row=PER_ROW,
                            max_epochs=2, random_per_row=RANDOM_PER_ROW)
    assert report["random_per_row"] == RANDOM_PER_ROW
    first = pq.read_table(root / "mined" / "train.parquet").to_pylist()
    mixed = pq.read_table(tmp_path / "mixed" / "train.parquet").to_pylist()
    train_seq, every = user_sequences(root / "prepared")
    drawn = Counter()
    for plain, row in zip(first, mixed, strict=True):
        if not plain[MINED_COLUMN]:
            assert row[MINED_COLUMN] == []
            continue
        retrieved, uniform = row[MINED_COLUMN][:PER_ROW], row[MINED_COLUMN][PER_ROW:]
        assert retrieved == plain[MINED_COLUMN]  # the same retriever, the same top items
        assert len(uniform) == RANDOM_PER_ROW == len(set(uniform))
        assert not set(uniform) & (set(retrieved) | every[row["user_id"]])
        sequence = train_seq[row["user_id"]]
        history = sequence[:sequence.index(row["target_item_id"])]
        np.testing.assert_allclose(row[MINED_SCORES_COLUMN], logits_by_hand(retriever, history, row[MINED_COLUMN]),
                                   atol=1e-5)
        drawn.update(uniform)
    # drawn across the catalogue, not one fixed set (120 items, 4 per row over dozens of rows)
    assert len(drawn) > 30


def test_per_row_zero_stores_uniform_items_only_with_the_retrievers_scores(world, refitted, tmp_path):
    root, _ = world
    retriever, _ = refitted
    report = mine_negatives(root / "instructions", root / "prepared", tmp_path / "uniform", per_row=0,
                            max_epochs=2, random_per_row=RANDOM_PER_ROW)
    assert (report["per_row"], report["random_per_row"]) == (0, RANDOM_PER_ROW)
    first = pq.read_table(root / "mined" / "train.parquet").to_pylist()
    uniform_only = pq.read_table(tmp_path / "uniform" / "train.parquet").to_pylist()
    train_seq, every = user_sequences(root / "prepared")
    drawn, retrieved_too = Counter(), 0
    for plain, row in zip(first, uniform_only, strict=True):
        if not plain[MINED_COLUMN]:
            assert row[MINED_COLUMN] == [] and row[TARGET_SCORE_COLUMN] is None
            continue
        items = row[MINED_COLUMN]
        assert len(items) == RANDOM_PER_ROW == len(set(items))
        assert not set(items) & every[row["user_id"]]
        sequence = train_seq[row["user_id"]]
        history = sequence[:sequence.index(row["target_item_id"])]
        by_hand = logits_by_hand(retriever, history, [row["target_item_id"], *items])
        np.testing.assert_allclose([row[TARGET_SCORE_COLUMN], *row[MINED_SCORES_COLUMN]], by_hand, atol=1e-5)
        retrieved_too += bool(set(items) & set(plain[MINED_COLUMN]))
        drawn.update(items)
    # uniform, not the retriever's top: spread over the catalogue, and mostly none of a row's top 5
    assert len(drawn) > 30
    assert retrieved_too < report["rows_with_negatives"] / 2


@pytest.mark.parametrize("case, field", [("same-folder", "out"), ("per-row", "per_row"), ("missing", "instructions"),
                                         ("negative-per-row", "per_row"),
                                         ("other-data", "data"), ("mined-twice", "instructions"),
                                         ("random-per-row", "random_per_row")])
def test_refusals_name_the_field_and_write_nothing(world, tmp_path, case, field):
    from instructrec.training.data import synth
    from instructrec.training.data.pipeline import prepare

    root, _ = world
    instructions, data, out, kwargs = root / "instructions", root / "prepared", tmp_path / "out", {}
    if case == "same-folder":
        out = instructions
    elif case == "per-row":
        kwargs["per_row"] = 0
    elif case == "negative-per-row":
        kwargs.update(per_row=-1, random_per_row=4)
    elif case == "missing":
        instructions = tmp_path / "nowhere"
    elif case == "other-data":
        reviews, meta = synth(tmp_path / "raw", users=30, items=60, seed=11)
        data = tmp_path / "other"
        prepare(reviews, meta, data, seed=0, k_core=2)
    elif case == "mined-twice":
        instructions = root / "mined"
    elif case == "random-per-row":
        kwargs["random_per_row"] = -1
    with pytest.raises(InputError) as excinfo:
        mine_negatives(instructions, data, out, max_epochs=1, **kwargs)
    assert excinfo.value.field == field
    assert not out.exists() or case == "same-folder"


# --------------------------------------------------------------------------- the trainer's pool

TEMPLATES = ["seq"] * 6 + ["search"] * 3
TARGET_IDS = ["a", "b", "c", "d", "a", "e", "a", "b", "f"]
TARGETS = ["A", "B", "C", "D", "A", "E", "A", "B", "F"]


def test_mined_pool_draws_the_rows_own_negatives_as_rows_of_its_template():
    mined = [["b", "c", "x"],  # x is no target anywhere: skipped
             ["a", "f"],  # f is a target of "search" only: skipped, one usable
             [], ["a", "b", "c", "e"], ["a", "b"],  # row 4's own target "a" is skipped
             None, ["b", "f"], [], []]
    pool = MinedNegativePool(TEMPLATES, TARGET_IDS, mined, NegativePool(TEMPLATES, TARGETS))
    assert pool.coverage(2) == (3, 5)  # rows 0, 3 and 6 have two or more usable; rows 1 and 4 one
    seen: dict[int, Counter] = {row: Counter() for row in range(9)}
    for step in range(1, 201):
        drawn = pool.draw(np.arange(9), 2, seed=0, step=step)
        for row, picks in enumerate(drawn):
            assert all(TEMPLATES[j] == TEMPLATES[row] for j in picks)
            assert all(TARGETS[j] != TARGETS[row] for j in picks)
            seen[row].update(TARGET_IDS[j] for j in picks)
    assert set(seen[0]) == {"b", "c"}  # both each step: x skipped
    assert set(seen[3]) == {"a", "b", "c", "e"}
    assert seen[3]["a"] > 50 and seen[3]["e"] > 50  # a uniform pick of 2 of 4
    # row 1: "a" every step, the second negative from the template pool (c, d or e, never b itself)
    assert seen[1]["a"] >= 200 and set(seen[1]) - {"a"} <= {"c", "d", "e"} and len(set(seen[1])) > 2
    assert seen[4]["b"] >= 200 and "a" not in seen[4]
    assert set(seen[6]) == {"b", "f"}  # a "search" row: its mined items as "search" targets
    # rows without mined negatives draw as the template pool does
    np.testing.assert_array_equal(pool.draw(np.array([2, 7]), 2, seed=3, step=9),
                                  NegativePool(TEMPLATES, TARGETS).draw(np.array([2, 7]), 2, seed=3, step=9))
    rows = np.arange(9)
    np.testing.assert_array_equal(pool.draw(rows, 2, seed=1, step=4), pool.draw(rows, 2, seed=1, step=4))


def test_scored_draws_carry_the_retrievers_logits_of_what_was_drawn():
    mined = [["b", "c", "x"], ["a"], [], ["a", "b", "c", "e"], ["a", "b"], None, ["b", "f"], [], []]
    scores = [[2.0, 3.0, 9.0], [1.5], [], [0.1, 0.2, 0.3, 0.5], [4.0, 5.0], None, [6.0, 7.0], [], []]
    target_scores = [1.0, 2.0, None, 3.0, 4.0, None, 5.0, None, None]
    pool = MinedNegativePool(TEMPLATES, TARGET_IDS, mined, NegativePool(TEMPLATES, TARGETS), scores, target_scores)
    by_item = [dict(zip(m or (), s or ())) for m, s in zip(mined, scores)]
    for step in range(1, 40):
        drawn, teacher = pool.draw_scored(np.arange(9), 2, seed=0, step=step)
        np.testing.assert_array_equal(drawn, pool.draw(np.arange(9), 2, seed=0, step=step))
        for row in range(9):
            items = [TARGET_IDS[j] for j in drawn[row]]
            if row in (0, 3, 6):  # two usable mined items each: every logit known, the target's first
                assert teacher[row, 0] == target_scores[row]
                assert list(teacher[row, 1:]) == [by_item[row][i] for i in items]
            elif row in (1, 4):  # one mined, one filled from the template pool: the filled one unknown
                assert teacher[row, 0] == target_scores[row] and teacher[row, 1] == by_item[row][items[0]]
                assert np.isnan(teacher[row, 2])
            else:
                assert np.isnan(teacher[row]).all()


def test_the_trainer_ranks_against_mined_negatives_and_refuses_a_folder_without_them(world, tmp_path, tokenizer_dir,
                                                                                     caplog):
    import logging

    from instructrec.training.tune import TrainConfig, train

    root, report = world
    base = dict(model="random:t5-tiny", tokenizer=tokenizer_dir, precision="fp32", device="cpu", progress=False,
                batch_size=8, max_steps=2, rank_eval=False, dropout=0.0, threads=1, rank_negatives=2)
    with caplog.at_level(logging.INFO, logger="instructrec"):
        result = train(TrainConfig(instructions=root / "mined", out=tmp_path / "run", rank_negatives_from="mined",
                                   **base))
    assert result.steps_done == 2
    # The rows with a usable negative, counted here: a mined item that is another row's target
    # under the same template, not the row's own.
    table = pq.read_table(root / "mined" / "train.parquet").to_pylist()
    targets = {(r["template"], r["target_item_id"]) for r in table}
    usable = sum(1 for r in table if any((r["template"], i) in targets and i != r["target_item_id"]
                                         for i in r[MINED_COLUMN]))
    assert 0 < usable <= report["rows_with_negatives"]
    assert any(f"mined negatives for {usable} of {len(table)} rows" in m for m in caplog.messages), caplog.messages
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["rank_loss"] < 1e3 for r in records if r["kind"] == "train")
    saved = json.loads((tmp_path / "run" / "training_config.json").read_text())
    assert saved["rank_negatives_from"] == "mined"
    with pytest.raises(InputError) as excinfo:
        train(TrainConfig(instructions=root / "instructions", out=tmp_path / "plain", rank_negatives_from="mined",
                          **base))
    assert excinfo.value.field == "rank_negatives_from" and not (tmp_path / "plain").exists()
    with pytest.raises(InputError) as excinfo:
        train(TrainConfig(instructions=root / "mined", out=tmp_path / "off", rank_negatives_from="mined",
                          **dict(base, rank_negatives=0)))
    assert excinfo.value.field == "rank_negatives_from"


def test_the_trainer_distils_the_retrievers_scores_and_refuses_what_cannot(world, tmp_path, tokenizer_dir, caplog):
    import logging

    import pyarrow.compute as pc

    from instructrec.training.tune import TrainConfig, train

    root, _ = world
    base = dict(model="random:t5-tiny", tokenizer=tokenizer_dir, precision="fp32", device="cpu", progress=False,
                batch_size=8, max_steps=2, rank_eval=False, dropout=0.0, threads=1, rank_negatives=2,
                rank_negatives_from="mined", instructions=root / "mined")

    def rank_losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [r["rank_loss"] for r in map(json.loads, lines) if r["kind"] == "train"]

    with caplog.at_level(logging.INFO, logger="instructrec"):
        train(TrainConfig(out=tmp_path / "soft", rank_distill=1.0, **base))
    train(TrainConfig(out=tmp_path / "hard", **base))
    # Same seed, same draws: only the target of the ranking term differs.
    soft, hard = rank_losses(tmp_path / "soft"), rank_losses(tmp_path / "hard")
    assert len(soft) == len(hard) == 2 and soft != hard
    pool = MinedNegativePool(*(pq.read_table(root / "mined" / "train.parquet").column(c).to_pylist()
                               for c in ("template", "target_item_id", MINED_COLUMN)),
                             NegativePool(*(pq.read_table(root / "mined" / "train.parquet").column(c).to_pylist()
                                            for c in ("template", "target"))))
    full = pool.coverage(2)[0]
    assert any(f"0.5 x the retriever's softmax at temperature 1 + 0.5 x the one-hot target, for rows whose 2 "
               f"negatives are all mined ({full} rows)" in m for m in caplog.messages), caplog.messages
    saved = json.loads((tmp_path / "soft" / "training_config.json").read_text())
    assert saved["rank_distill"] == 1.0 and saved["rank_distill_share"] == 0.5
    # refusals, before anything is written
    unscored = tmp_path / "unscored"
    unscored.mkdir()
    table = pq.read_table(root / "mined" / "train.parquet")
    pq.write_table(table.drop_columns([MINED_SCORES_COLUMN, TARGET_SCORE_COLUMN]), unscored / "train.parquet")
    (unscored / "valid.parquet").symlink_to((root / "mined" / "valid.parquet").resolve())
    assert pc.sum(pc.list_value_length(table[MINED_SCORES_COLUMN])).as_py() > 0
    for overrides, field in ((dict(instructions=unscored), "rank_distill"),
                             (dict(rank_negatives_from="template"), "rank_distill"),
                             (dict(rank_distill=-1.0), "rank_distill"),
                             (dict(rank_distill_share=0.0), "rank_distill_share"),
                             (dict(rank_distill_share=1.5), "rank_distill_share"),
                             (dict(rank_distill=0.0, rank_distill_share=0.3), "rank_distill_share")):
        out = tmp_path / f"refused-{len(list(tmp_path.iterdir()))}"
        with pytest.raises(InputError) as excinfo:
            train(TrainConfig(out=out, **{**base, "rank_distill": 1.0, **overrides}))
        assert excinfo.value.field == field and not out.exists()


def test_resume_refuses_another_distillation_setting(world, tmp_path, tokenizer_dir):
    from instructrec.training.tune import TrainConfig, train

    root, _ = world
    base = dict(model="random:t5-tiny", tokenizer=tokenizer_dir, precision="fp32", device="cpu", progress=False,
                batch_size=8, max_steps=2, rank_eval=False, dropout=0.0, threads=1, rank_negatives=2,
                rank_negatives_from="mined", instructions=root / "mined", out=tmp_path / "run", rank_distill=1.0)
    train(TrainConfig(stop_after=1, **base))
    for changed in (dict(rank_distill=2.0), dict(rank_distill_share=0.25)):
        with pytest.raises(InputError, match=next(iter(changed))):
            train(TrainConfig(resume=True, **{**base, **changed}))
