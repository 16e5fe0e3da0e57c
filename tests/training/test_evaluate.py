"""`instructrec eval` on generated data (training.data synth -> prepare -> instructions build) with
a tiny random T5: every method ranks the identical lists, the engine's ranks agree with a plain
Hugging Face forward, runs are deterministic per seed, the CLI writes its tables, and bad input
fails with typed errors naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from instructrec.engine.errors import InputError
from instructrec.training.evaluate import (
    SCENARIOS, EvalConfig, Instance, evaluate, load_instances, merge_results, ranks_from_scores,
    read_slot, resolve_scenarios, restrict_training_set, with_candidate_list,
)

EVAL_TEMPLATES = "seq-rec-02,seq-rec-18,seq-rec-09,prod-search-04,pers-search-07,pers-search-08,pers-search-09"


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread):
    """A generated dataset, prepared, with instructions for every main-domain scenario."""
    from instructrec.training.annotation import make_annotator
    from instructrec.training.build import build_instructions
    from instructrec.training.data import synth
    from instructrec.training.data.pipeline import prepare

    root = tmp_path_factory.mktemp("eval-world")
    # 2-core: 80 users keep 136 items, room for 99 sampled negatives outside any history.
    reviews, meta = synth(root / "raw", users=80, items=160, seed=3)
    prepare(reviews, meta, root / "prepared", seed=0, k_core=2)
    build_instructions(root / "prepared", root / "instructions", annotator=make_annotator("offline"),
                       eval_templates=EVAL_TEMPLATES, per_user=1, seed=0)
    return root


def config(world: Path, model: Path, out: Path, **overrides) -> EvalConfig:
    base = dict(data=world / "prepared", instructions=world / "instructions", model=model, out=out,
                train_instructions=world / "instructions", max_instances=12, max_instances_100=3,
                valid_instances=6, baseline_valid=0, baseline_max_epochs=1, threads=1)
    base.update(overrides)
    return EvalConfig(**base)


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items()
                if k not in ("seconds", "train_seconds", "wall_seconds", "config", "runs")}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------- units


def test_ranks_from_scores_by_hand_with_ties():
    def inst(ids, target):
        return Instance(target, "u", target, ids, ids, {})

    scores = np.array([[0.1, 0.9, 0.5],    # target "b" best -> 1
                       [0.7, 0.7, 0.7],    # all tied -> pessimistic: last of 3
                       [2.0, 1.0, 3.0]])   # target "a" second -> 2
    instances = [inst(["a", "b", "c"], "b"), inst(["a", "b", "c"], "a"), inst(["a", "b", "c"], "a")]
    assert ranks_from_scores(scores, instances) == [1, 3, 2]


def test_read_slot_recovers_the_vague_intention():
    from instructrec.engine.formatting import render_template

    rendered = render_template("pers-search-07", {
        "history": ["Alpha Racer", "Beta Quest"], "intention": "a racing game my son will enjoy",
        "candidates": ["Gamma Kart", "Delta Drift"], "target_title": "Gamma Kart"}).source
    assert read_slot("pers-search-07", rendered, "intention") == "a racing game my son will enjoy"


def test_a_swapped_list_renders_as_the_template_would(world):
    """The stored numbered list becomes {candidates}; the engine's filling of it must equal a
    fresh rendering of the template with the new list (formatting.render_template)."""
    from instructrec.engine.formatting import build_instruction, render_template

    instances = load_instances(world / "instructions", "test", SCENARIOS["seq-rec"], {}, None)
    inst = instances[0]
    titles_of = dict(zip(inst.candidate_ids, inst.titles))
    reversed_ids = list(reversed(inst.candidate_ids))
    swapped = with_candidate_list(inst, reversed_ids, titles_of)
    text = build_instruction(instruction=swapped.prompts["seq-rec-02"], candidates=swapped.titles)
    history = read_slot("seq-rec-02", inst.prompts["seq-rec-02"], "history").split("; ")
    expected = render_template("seq-rec-02", {"history": history, "candidates": swapped.titles,
                                              "target_title": titles_of[inst.target]}).source
    assert text == expected and swapped.titles == [titles_of[i] for i in reversed_ids]


def test_restrict_training_set_drops_the_held_out_type_and_search_eval_targets(world, tmp_path):
    report = restrict_training_set(world / "instructions", world / "prepared", tmp_path / "t", "P2+I1")
    before = pq.read_table(world / "instructions" / "train.parquet").to_pylist()
    after = pq.read_table(tmp_path / "t" / "train.parquet").to_pylist()
    splits = pq.read_table(world / "prepared" / "search_splits.parquet").to_pylist()
    held_items = {r["item_id"] for r in splits if r["split"] != "train"}
    expected = [r for r in before if not (r["preference"] == "P2" and r["intention"] == "I1")
                and r["target_item_id"] not in held_items]
    assert after == expected and report["rows_out"] == len(expected) < len(before)
    assert (tmp_path / "t" / "test.parquet").resolve() == (world / "instructions" / "test.parquet").resolve()


# --------------------------------------------------------------------------------------------- runs


RUN_A = dict(scenarios=("seq-rec", "product-search", "candidates-100"), methods=("instructrec", "popularity", "sasrec"),
             max_instances_100=2)


@pytest.fixture(scope="module")
def run_a(world, tiny_t5_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-a")
    return evaluate(config(world, tiny_t5_dir, out, **RUN_A)), out


def test_every_method_ranks_the_identical_stored_lists(run_a, world):
    results, out = run_a
    lists = json.loads((out / "instances.json").read_text())
    stored = {r["user_id"]: r["candidate_ids"] for r in pq.read_table(world / "prepared" / "candidates.parquet").to_pylist()
              if r["split"] == "test"}
    seq = lists["seq-rec:test"]
    assert len(seq) == 12 and all(ids == stored[user] for user, ids in seq)
    for name, entry in results["scenarios"].items():
        counts = {m: v["n"] for m, v in entry["methods"].items()}
        assert set(counts.values()) == {entry["n_test"]}, (name, counts)
    assert set(results["scenarios"]["seq-rec"]["methods"]) == {"instructrec", "popularity", "sasrec"}
    # Product search has no sequence baselines; the hundred-candidate lists hold 100 distinct items.
    assert set(results["scenarios"]["product-search"]["methods"]) == {"instructrec", "popularity"}
    for user, ids in lists["candidates-100:test"]:
        assert len(ids) == len(set(ids)) == 100


def test_product_search_never_ranks_a_training_target(run_a, world):
    lists = json.loads((run_a[1] / "instances.json").read_text())["product-search:test"]
    train_targets = set(pq.read_table(world / "instructions" / "train.parquet")["target_item_id"].to_pylist())
    targets = [key for key, _ in lists]
    assert targets and not set(targets) & train_targets


def test_model_metrics_match_a_plain_hugging_face_ranking(run_a, world, tiny_t5_dir, hf_log_likelihoods):
    """The tuned-model column recomputed from HF forward log-likelihoods of the chosen template."""
    from instructrec.training.metrics import pessimistic_rank, summarize_ranks

    results, out = run_a
    entry = results["scenarios"]["seq-rec"]["methods"]["instructrec"]
    lists = json.loads((out / "instances.json").read_text())["seq-rec:test"]
    by_key = {i.key: i for i in load_instances(world / "instructions", "test", SCENARIOS["seq-rec"], {}, None)}
    ranks = []
    for key, ids in lists:
        inst = by_key[key]
        scores = hf_log_likelihoods(tiny_t5_dir, inst.prompts[entry["template"]], inst.titles)
        ranks.append(pessimistic_rank(scores, inst.positive))
    reference = summarize_ranks(ranks)
    for k in ("hr@1", "hr@3", "hr@5", "ndcg@3", "ndcg@5"):
        assert entry[k] == pytest.approx(reference[k], abs=1e-9), k


def test_runs_are_deterministic_per_seed(run_a, world, tiny_t5_dir, tmp_path):
    results, out = run_a
    again = evaluate(config(world, tiny_t5_dir, tmp_path / "b", **RUN_A))
    assert without_timings(again["scenarios"]) == without_timings(results["scenarios"])
    assert (tmp_path / "b" / "instances.json").read_text() == (out / "instances.json").read_text()
    other = evaluate(config(world, tiny_t5_dir, tmp_path / "c", scenarios=("seq-rec",), methods=("popularity",), seed=1))
    lists_0 = json.loads((out / "instances.json").read_text())["seq-rec:test"]
    lists_1 = json.loads((tmp_path / "c" / "instances.json").read_text())["seq-rec:test"]
    assert [k for k, _ in lists_0] != [k for k, _ in lists_1]
    assert other["scenarios"]["seq-rec"]["n_test"] == 12


def test_add_to_ranks_the_same_lists_and_merges(run_a, world, tiny_t5_dir, tmp_path):
    results, out = run_a
    added = evaluate(config(world, tiny_t5_dir, tmp_path / "m", **dict(RUN_A, methods=("popularity",)),
                            add_to=out, seed=5))
    assert (tmp_path / "m" / "instances.json").read_text() == (out / "instances.json").read_text()
    for name, entry in added["scenarios"].items():
        # Another seed would draw other lists; --add-to ranks the recorded ones, so equal metrics.
        assert without_timings(entry["methods"]["popularity"]) == without_timings(
            results["scenarios"][name]["methods"]["popularity"])
        assert "instructrec" in entry["methods"]
    with pytest.raises(Exception, match="scenario seq-rec"):
        merge_results(results, {"config": {}, "scenarios": {"seq-rec": dict(results["scenarios"]["seq-rec"], n_test=1)}})


def test_hard_negatives_come_from_the_two_tower_and_held_out_reads_its_type(world, tiny_t5_dir, tmp_path):
    results = evaluate(config(world, tiny_t5_dir, tmp_path / "h", scenarios=("hard-negatives", "held-out"),
                              methods=("zero-shot", "popularity", "two-tower", "tem")))
    lists = json.loads((tmp_path / "h" / "instances.json").read_text())
    prepared = pq.read_table(world / "prepared" / "interactions.parquet").to_pylist()
    seen = {}
    for r in prepared:
        seen.setdefault(r["user_id"], set()).add(r["item_id"])
    for user, ids in lists["hard-negatives:test"]:
        assert len(ids) == 10 and len(set(ids) & seen[user]) == 1  # only the target was interacted with
    hard = results["scenarios"]["hard-negatives"]
    assert set(hard["methods"]) == {"zero-shot", "popularity", "two-tower"}
    held = results["scenarios"]["held-out"]
    assert held["templates"] == ["pers-search-09"] and "tem" in held["methods"]
    for entry in results["scenarios"].values():
        for metrics in entry["methods"].values():
            assert all(0.0 <= metrics[k] <= 1.0 for k in ("hr@1", "hr@5", "ndcg@5"))
            assert metrics["hr@1"] <= metrics["hr@3"] <= metrics["hr@5"]


# --------------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end_writes_json_and_markdown(world, tiny_t5_dir, tmp_path):
    from instructrec.cli import main

    out = tmp_path / "cli"
    code = main(["eval", "--data", str(world / "prepared"), "--instructions", str(world / "instructions"),
                 "--model", str(tiny_t5_dir), "--train-instructions", str(world / "instructions"),
                 "--scenario", "seq-rec", "--scenario", "pers-search-i2", "--methods", "instructrec,popularity,tem",
                 "--out", str(out), "--max-instances", "5", "--valid-instances", "4", "--baseline-max-epochs", "1",
                 "--baseline-set", "tem.pairs_per_user=2", "--threads", "1"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scenarios"]["pers-search-i2"]["methods"]["tem"]["fit"]["config"]["pairs_per_user"] == 2
    table = (out / "results.md").read_text()
    assert "## seq-rec <P1, I0, T3>" in table and "| Popularity |" in table and "*theirs: TEM*" in table
    assert metrics["scenarios"]["seq-rec"]["methods"]["instructrec"]["template"] in ("seq-rec-02", "seq-rec-18")


def test_errors_name_the_field(world, tiny_t5_dir, tmp_path):
    with pytest.raises(InputError, match="scenario") as info:
        resolve_scenarios(["seq-rec", "sequel-rec"])
    assert "sequel-rec" in str(info.value) and "seq-rec" in str(info.value)
    with pytest.raises(InputError, match="data"):
        evaluate(config(world, tiny_t5_dir, tmp_path / "x", data=tmp_path / "missing", methods=("popularity",)))
    with pytest.raises(InputError, match="cross_data"):
        evaluate(config(world, tiny_t5_dir, tmp_path / "x", scenarios=("cross-domain",), methods=("popularity",)))
    with pytest.raises(InputError, match="model"):
        evaluate(config(world, tmp_path, tmp_path / "x", scenarios=("seq-rec",), methods=("instructrec",)))
    with pytest.raises(InputError, match="add_to"):
        evaluate(config(world, tiny_t5_dir, tmp_path / "x", scenarios=("seq-rec",), methods=("popularity",),
                        add_to=tmp_path / "nothing-here"))
    with pytest.raises(InputError, match="max_instances"):
        evaluate(config(world, tiny_t5_dir, tmp_path / "x", max_instances=-1))
