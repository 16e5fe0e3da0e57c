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

EVAL_TEMPLATES = ("seq-rec-02,seq-rec-18,seq-rec-09,prod-search-04,prod-search-02,pers-search-07,pers-search-08,"
                  "pers-search-09")


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
                valid_instances=6, baseline_valid=0, baseline_max_epochs=1, threads=1,
                # fp32: the model methods are checked against Hugging Face's fp32 forward to 1e-9;
                # `auto` would pick bf16 on a CPU with native bf16 (AMX) and move the scores.
                dtype="float32")
    base.update(overrides)
    return EvalConfig(**base)


def hf_ranks(model_dir, instances, template, hf_log_likelihoods, form: str = "sum") -> list[int]:
    """The target's rank in each instance under Hugging Face forward log-likelihoods of `template`:
    their sum over the title's tokens, (form "mean") per token, counted by the tokenizer itself, or
    (form "calibrated") minus the title's log-likelihood under an empty instruction."""
    from transformers import AutoTokenizer

    from instructrec.training.metrics import pessimistic_rank

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ranks = []
    for inst in instances:
        scores = hf_log_likelihoods(model_dir, inst.prompts[template], inst.titles)
        if form == "mean":
            scores = scores / np.array([len(tokenizer(text_target=t).input_ids) for t in inst.titles])
        elif form == "calibrated":
            scores = scores - hf_log_likelihoods(model_dir, "", inst.titles)
        ranks.append(pessimistic_rank(scores, inst.positive))
    return ranks


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


def test_a_swapped_list_over_the_budget_keeps_the_newest_history_titles_that_fit(tiny_t5_dir, hf_log_likelihoods):
    """A list swapped in (hard negatives) can hold longer titles than the stored one the build
    fitted the history around. Its request then renders the template with the new list and keeps
    the newest history titles that fit the model's budget, whole (the oldest title holds the
    history separator itself), scored as Hugging Face scores that text; before, the engine refused
    the free instruction and the list counted as a miss. A swap that fits reads as before."""
    from transformers import AutoTokenizer

    from instructrec.engine import Reranker, Request
    from instructrec.engine.formatting import build_instruction, render_template
    from instructrec.training.evaluate import engine_ranks
    from instructrec.training.metrics import pessimistic_rank

    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    history = {f"h{i}": f"Dungeon Saga {i} Collector Edition" for i in range(12)}
    history["h0"] = "Galaxy Raiders; Director's Cut"
    stored = {f"s{i}": f"Kart {i}" for i in range(10)}
    # Longer than the stored titles under both the real Flan-T5 tokenizer and the generated one
    # (tests/conftest.py), and short enough that some history still fits beside them under both.
    longer = {f"n{i}": f"Crystal Legends {i} Deluxe Edition" for i in range(9)}
    titles_of = {**history, **stored, **longer}
    stored_text = render_template("seq-rec-02", {"history": list(history.values()),
                                                 "candidates": list(stored.values())}).source
    budget = len(tokenizer(stored_text).input_ids) + 3
    inst = Instance("u1", "u1", "s0", list(stored), list(stored.values()), {"seq-rec-02": stored_text},
                    history=tuple(history))
    reranker = Reranker.from_pretrained(tiny_t5_dir, backend="torch", dtype="float32", max_source_tokens=budget)

    reordered = with_candidate_list(inst, list(reversed(stored)), titles_of)
    assert (build_instruction(**reordered.request_fields("seq-rec-02"), candidates=reordered.titles)
            == build_instruction(instruction=reordered.prompts["seq-rec-02"], candidates=reordered.titles))

    swapped = with_candidate_list(inst, ["s0", *longer], titles_of)
    titles = list(history.values())
    dropped = next(k for k in range(len(titles)) if len(tokenizer(render_template(
        "seq-rec-02", {"history": titles[k:], "candidates": swapped.titles}).source).input_ids) <= budget)
    assert dropped >= 2  # the fitted text starts past the title holding "; "
    expected = render_template("seq-rec-02", {"history": titles[dropped:], "candidates": swapped.titles}).source
    reference = hf_log_likelihoods(tiny_t5_dir, expected, swapped.titles)

    result = reranker.rank([Request(**swapped.request_fields("seq-rec-02"), candidates=swapped.titles,
                                    candidate_ids=swapped.candidate_ids)])[0]
    scores = dict(zip(result.ranked_ids, result.scores))
    assert [scores[c] for c in swapped.candidate_ids] == pytest.approx(list(reference), abs=1e-4)
    assert engine_ranks(reranker, [swapped], "seq-rec-02") == ([pessimistic_rank(reference, 0)], 0)


@pytest.mark.parametrize("template", ["seq-rec-01", "seq-rec-02", "pers-search-08"])
def test_a_stored_instruction_over_the_models_budget_keeps_the_newest_history_titles_that_fit(
        tiny_t5_dir, hf_log_likelihoods, template):
    """The build fits each instruction to the Flan-T5 tokenizer's budget; a model that counts more
    tokens for it (a compact vocabulary on another domain's words; here a smaller budget) refused
    the stored text, which counted as a miss. Rendered from its fields, the engine keeps the newest
    history titles that fit, scored as Hugging Face scores that text; under the full budget the
    text is the stored one, and an instruction whose history is not the user's stays as it is."""
    from transformers import AutoTokenizer

    from instructrec.engine import Reranker
    from instructrec.engine.formatting import build_instruction, render_template
    from instructrec.training.evaluate import engine_ranks, with_request_fields
    from instructrec.training.metrics import pessimistic_rank

    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    history = {f"h{i}": f"Dungeon Saga {i} Collector Edition" for i in range(12)}
    history["h0"] = "Galaxy Raiders; Director's Cut"
    candidates = {f"s{i}": f"Kart {i}" for i in range(10)}
    slots = {"history": list(history.values()), "intention": "Racing", "candidates": list(candidates.values())}
    stored_text = render_template(template, slots).source
    inst = Instance("u1", "u1", "s3", list(candidates), list(candidates.values()), {template: stored_text},
                    history=tuple(history))
    titles_of = {**history, **candidates}
    fitted = with_request_fields(inst, titles_of)
    assert fitted.fields[template]["history"] == list(history.values())
    listed = inst.titles if template != "seq-rec-01" else None  # seq-rec-01 (T2) lists no candidates
    assert build_instruction(**fitted.request_fields(template), candidates=listed) == stored_text

    full = Reranker.from_pretrained(tiny_t5_dir, backend="torch", dtype="float32")
    assert engine_ranks(full, [fitted], template) == engine_ranks(full, [inst], template)

    budget = len(tokenizer(stored_text).input_ids) - 12
    small = Reranker.from_pretrained(tiny_t5_dir, backend="torch", dtype="float32", max_source_tokens=budget)
    assert engine_ranks(small, [inst], template) == ([len(candidates) + 1], 1)  # refused: a miss
    titles = list(history.values())
    dropped = next(k for k in range(len(titles)) if len(tokenizer(render_template(
        template, {**slots, "history": titles[k:]}).source).input_ids) <= budget)
    assert dropped >= 1
    expected = render_template(template, {**slots, "history": titles[dropped:]}).source
    reference = hf_log_likelihoods(tiny_t5_dir, expected, inst.titles)
    assert engine_ranks(small, [fitted], template) == ([pessimistic_rank(reference, inst.positive)], 0)

    other = with_request_fields(inst, {**titles_of, "h11": "Another Title"})
    assert other.fields == {} and other.request_fields(template) == {"instruction": stored_text}


def test_a_history_that_does_not_match_the_instruction_is_split_and_said(caplog):
    """A swapped list needs the history's titles one by one: read from the user's prepared history
    where it matches the instruction, else split at the separator, loudly when a history was known."""
    from instructrec.engine.formatting import render_template

    text = render_template("seq-rec-02", {"history": ["Alpha", "Beta Quest"], "candidates": ["Kart", "Drift"]}).source
    inst = Instance("u1", "u1", "c1", ["c1", "c2"], ["Kart", "Drift"], {"seq-rec-02": text}, history=("x", "y"))
    with caplog.at_level("WARNING", logger="instructrec.training.eval_scenarios"):
        known = with_candidate_list(inst, ["c2", "c1"], {"x": "Alpha", "y": "Beta Quest", "c1": "Kart", "c2": "Drift"})
    assert known.fields["seq-rec-02"] == {"template": "seq-rec-02", "history": ["Alpha", "Beta Quest"]}
    assert not caplog.records
    with caplog.at_level("WARNING", logger="instructrec.training.eval_scenarios"):
        other = with_candidate_list(inst, ["c2", "c1"], {"x": "Gamma", "y": "Delta", "c1": "Kart", "c2": "Drift"})
    assert other.fields["seq-rec-02"]["history"] == ["Alpha", "Beta Quest"]
    assert "'u1'" in caplog.text and "split" in caplog.text


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


def test_product_search_ranks_its_t2_and_t3_templates_on_one_list(world):
    """The world's build holds a listing (T3, prod-search-04) and a non-listing (T2, prod-search-02)
    template for product search: every test item is one instance with both prompts."""
    from instructrec.training.baselines import load_prepared

    items = load_prepared(world / "prepared").train.items
    instances = load_instances(world / "instructions", "test", SCENARIOS["product-search"], {}, items)
    assert instances and all(set(i.prompts) == {"prod-search-02", "prod-search-04"} for i in instances)
    for inst in instances:
        assert inst.candidate_ids.count(inst.target) == 1 and inst.query == items.category_path(inst.target)


def test_product_search_never_ranks_a_training_target(run_a, world):
    lists = json.loads((run_a[1] / "instances.json").read_text())["product-search:test"]
    train_targets = set(pq.read_table(world / "instructions" / "train.parquet")["target_item_id"].to_pylist())
    targets = [key for key, _ in lists]
    assert targets and not set(targets) & train_targets


def test_model_metrics_match_a_plain_hugging_face_ranking(run_a, world, tiny_t5_dir, hf_log_likelihoods):
    """The tuned-model column recomputed from HF forward log-likelihoods of the chosen template
    and score form."""
    from instructrec.training.metrics import summarize_ranks

    results, out = run_a
    entry = results["scenarios"]["seq-rec"]["methods"]["instructrec"]
    lists = json.loads((out / "instances.json").read_text())["seq-rec:test"]
    by_key = {i.key: i for i in load_instances(world / "instructions", "test", SCENARIOS["seq-rec"], {}, None)}
    reference = summarize_ranks(hf_ranks(tiny_t5_dir, [by_key[key] for key, _ in lists], entry["template"],
                                         hf_log_likelihoods, entry["normalize"]))
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
    # The merged report pairs this run's baseline with the earlier run's model, list by list.
    assert "HR@1 of InstructRec (ours, tuned) minus each baseline's" in (tmp_path / "m" / "results.md").read_text()
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


# --------------------------------------------------------------------------------------------- model sources


SOURCES_RUN = dict(scenarios=("seq-rec",), methods=("instructrec", "zero-shot"), max_instances=8, valid_instances=4)


@pytest.fixture(scope="module")
def folder_run(world, tiny_t5_dir, tmp_path_factory):
    return evaluate(config(world, tiny_t5_dir, tmp_path_factory.mktemp("eval-folder"), **SOURCES_RUN))


def test_a_hub_id_model_scores_as_its_folder_and_records_its_commit(folder_run, world, offline_hf_home, tmp_path):
    from ..conftest import TINY_HUB_COMMIT, TINY_HUB_ID

    results = evaluate(config(world, TINY_HUB_ID, tmp_path / "hub", revision="main", **SOURCES_RUN))
    assert without_timings(results["scenarios"]) == without_timings(folder_run["scenarios"])
    identity = results["model"]["identity"]
    assert identity == {"spec": TINY_HUB_ID, "kind": "checkpoint", "repo_id": TINY_HUB_ID, "revision": "main",
                        "commit": TINY_HUB_COMMIT, "path": results["model"]["path"]}
    assert f"`{TINY_HUB_ID}` at commit `{TINY_HUB_COMMIT}`" in (tmp_path / "hub" / "results.md").read_text()
    assert json.loads((tmp_path / "hub" / "metrics.json").read_text())["model"]["identity"]["commit"] == TINY_HUB_COMMIT


def test_random_shape_is_the_zero_shot_reference_with_its_tokenizer(folder_run, world, tokenizer_dir, tmp_path):
    """random:t5-tiny is the tiny test checkpoint's architecture: seeded alike, its zero-shot
    rankings equal those built from the checkpoint folder."""
    from instructrec.cli import main

    out = tmp_path / "random"
    assert main(["eval", "--data", str(world / "prepared"), "--instructions", str(world / "instructions"),
                 "--model", "random:t5-tiny", "--tokenizer", str(tokenizer_dir), "--methods", "zero-shot",
                 "--scenario", "seq-rec", "--train-instructions", str(world / "instructions"), "--out", str(out),
                 "--max-instances", "8", "--valid-instances", "4", "--threads", "1",
                 # as folder_run: `auto` rests on a timed matmul probe, and a CLI run in bf16 beside an
                 # fp32 folder run compared rankings across precisions (one full-suite run differed).
                 "--dtype", "float32"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert without_timings(metrics["scenarios"]["seq-rec"]["methods"]["zero-shot"]) == without_timings(
        folder_run["scenarios"]["seq-rec"]["methods"]["zero-shot"])
    assert metrics["model"]["identity"] == {"spec": "random:t5-tiny", "kind": "random", "shape": "t5-tiny"}
    assert metrics["model"]["tokenizer"] == str(tokenizer_dir)
    assert "(RANDOM weights" in (out / "results.md").read_text()


@pytest.mark.parametrize("overrides, field, words", [
    (dict(model="random:t5-tiny", methods=("instructrec",)), "model", "zero-shot reference"),
    (dict(model="random:t5-tiny", methods=("zero-shot",)), "tokenizer", "brings no tokenizer"),
    (dict(model="flan-t5-small", methods=("zero-shot",)), "model", "random:flan-t5-small"),
    (dict(model=None, methods=("instructrec", "popularity")), "model", "need a model"),
])
def test_model_source_mistakes_are_refused_before_the_data_loads(world, tmp_path, overrides, field, words):
    # A data folder that would fail to load: the refusal must come first.
    broken = tmp_path / "prepared"
    broken.mkdir()
    (broken / "stats.json").write_text("{}")
    with pytest.raises(InputError) as caught:
        model = overrides.pop("model")
        evaluate(config(world, model, tmp_path / "x", scenarios=("seq-rec",), data=broken, **overrides))
    assert caught.value.field == field and words in str(caught.value)


# --------------------------------------------------------------------------------------------- ensembles


def test_an_ensemble_ranks_by_each_models_standardised_scores_summed(world, tiny_t5_dir, tmp_path,
                                                                      hf_log_likelihoods):
    """--ensemble: the tuned column recomputed from both models' HF log-likelihoods, each
    standardised by hand within the list, summed."""
    from instructrec.training.metrics import pessimistic_rank, summarize_ranks

    from ..conftest import TINY_T5, build_t5_checkpoint

    second = build_t5_checkpoint(tmp_path / "seed-1", tiny_t5_dir, TINY_T5, seed=1)
    out = tmp_path / "ensemble"
    results = evaluate(config(world, tiny_t5_dir, out, ensemble=(second,), scenarios=("seq-rec",),
                              methods=("instructrec",), score_forms=("sum",)))
    entry = results["scenarios"]["seq-rec"]["methods"]["instructrec"]
    lists = json.loads((out / "instances.json").read_text())["seq-rec:test"]
    by_key = {i.key: i for i in load_instances(world / "instructions", "test", SCENARIOS["seq-rec"], {}, None)}
    ranks = []
    for key, _ in lists:
        inst = by_key[key]
        summed = 0
        for model in (tiny_t5_dir, second):
            scores = hf_log_likelihoods(model, inst.prompts[entry["template"]], inst.titles).astype(np.float64)
            summed = summed + (scores - scores.mean()) / scores.std()
        ranks.append(pessimistic_rank(summed, inst.positive))
    reference = summarize_ranks(ranks)
    for k in ("hr@1", "hr@3", "hr@5", "ndcg@3", "ndcg@5"):
        assert entry[k] == pytest.approx(reference[k], abs=1e-9), k
    assert [m["path"] for m in results["model"]["ensemble"]] == [str(second)]
    assert f"its scores summed with `{second}`'s" in (out / "results.md").read_text()


@pytest.mark.parametrize("overrides, field, words", [
    (dict(ensemble=("random:t5-tiny",)), "ensemble[0]", "random weights"),
    (dict(ensemble=("/no/such/model",)), "ensemble[0]", "not a checkpoint directory"),
    (dict(ensemble=("/no/such/model",), methods=("popularity",)), "ensemble", "none of the methods"),
])
def test_ensemble_mistakes_name_the_field(world, tiny_t5_dir, tmp_path, overrides, field, words):
    with pytest.raises(InputError) as caught:
        evaluate(config(world, tiny_t5_dir, tmp_path / "x", scenarios=("seq-rec",), **overrides))
    assert caught.value.field == field and words in str(caught.value)


# --------------------------------------------------------------------------------------------- inputs checked first


def default_build_instructions(world: Path, out: Path) -> Path:
    """The instruction folder a default build gives (DEFAULT_EVAL_TEMPLATE_IDS in valid/test): the
    world's rows of those templates, with its stats.json saying so."""
    from instructrec.training.build import DEFAULT_EVAL_TEMPLATE_IDS

    out.mkdir()
    for split in ("train", "valid", "test"):
        table = pq.read_table(world / "instructions" / f"{split}.parquet")
        if split != "train":
            table = table.filter(pa_compute().is_in(table["template"], value_set=pa_array(DEFAULT_EVAL_TEMPLATE_IDS)))
        pq.write_table(table, out / f"{split}.parquet")
    (out / "stats.json").write_text(json.dumps({"eval_templates": list(DEFAULT_EVAL_TEMPLATE_IDS)}))
    return out


def pa_compute():
    import pyarrow.compute as pc

    return pc


def pa_array(values):
    import pyarrow as pa

    return pa.array(list(values))


def test_scenario_all_on_a_default_build_names_everything_missing_before_loading(world, tiny_t5_dir, tmp_path):
    """docs/evaluation.md's evaluation on a default instruction build: --scenario all needs --cross-data, and
    pers-search-p2 and held-out need templates a default build leaves out. One error names all
    three, with the build command that fixes it, before the data loads (the data folder here
    would fail to load)."""
    instructions = default_build_instructions(world, tmp_path / "instructions")
    broken = tmp_path / "prepared"
    broken.mkdir()
    (broken / "stats.json").write_text("{}")
    with pytest.raises(InputError) as caught:
        evaluate(config(world, tiny_t5_dir, tmp_path / "x", data=broken, instructions=instructions,
                        scenarios=("all",)))
    message = str(caught.value)
    assert caught.value.field == "scenario"
    assert "--cross-data DIR --cross-instructions DIR" in message
    assert "<P1, P2, T3> (scenario pers-search-p2), <P2, I1, T3> (scenario held-out)" in message
    assert ("--eval-templates seq-rec-02,pers-search-07,pers-search-08,prod-search-03,prod-search-04,"
            "seq-rec-01,pers-search-01,pers-search-02,prod-search-01,prod-search-02,"
            "seq-rec-09,seq-rec-08,pers-search-09,pers-search-03`") in message
    # Only the cross-domain flags missing: that one field, as before.
    with pytest.raises(InputError) as caught:
        evaluate(config(world, tiny_t5_dir, tmp_path / "x", data=broken, instructions=instructions,
                        scenarios=("seq-rec", "cross-domain")))
    assert caught.value.field == "cross_data"


# --------------------------------------------------------------------------------------------- product search shrink


def test_product_search_dropping_training_targets_is_loud_and_recorded(run_a, world, caplog, tmp_path):
    """run_a evaluates a model whose training rows include product-search test items: those
    instances are dropped (never ranked), and the run says how many, and the command that fixes it."""
    train_targets = set(pq.read_table(world / "instructions" / "train.parquet")["target_item_id"].to_pylist())
    test_rows = pq.read_table(world / "instructions" / "test.parquet").to_pylist()
    search_targets = {r["target_item_id"] for r in test_rows
                      if (r["preference"], r["intention"], r["task"]) == ("P0", "I2", "T3")}
    expected = len(search_targets & train_targets)
    assert 0 < expected < len(search_targets)
    results, out = run_a
    assert results["scenarios"]["product-search"]["dropped_training_targets"] == expected
    assert f"**{expected} more were dropped" in (out / "results.md").read_text()

    with caplog.at_level("WARNING"):
        evaluate(config(world, None, tmp_path / "p", scenarios=("product-search",), methods=("popularity",)))
    [warning] = [r.getMessage() for r in caplog.records if "DROPPED" in r.getMessage()]
    assert f"{expected} of {len(search_targets)} instances DROPPED" in warning
    assert f"instructrec eval-train-set --instructions {world / 'instructions'} --data {world / 'prepared'}" in warning


# --------------------------------------------------------------------------------------------- ranking without a listed candidate list (T2)


@pytest.fixture(scope="module")
def t2_instructions(world, tmp_path_factory):
    """The world's prepared data with valid/test rows of the listed (seq-rec-02, T3) and the
    unlisted (seq-rec-01, T2) sequential-recommendation templates, same lists."""
    from instructrec.training.annotation import make_annotator
    from instructrec.training.build import build_instructions

    out = tmp_path_factory.mktemp("eval-t2") / "instructions"
    build_instructions(world / "prepared", out, annotator=make_annotator("offline"),
                       eval_templates="seq-rec-02,seq-rec-01", per_user=1, seed=0)
    return out


def t2_only_folder(instructions: Path, out: Path) -> Path:
    """A copy of `instructions` whose valid/test rows are seq-rec-01's only (train kept whole)."""
    import pyarrow.compute as pc

    out.mkdir()
    for split in ("train", "valid", "test"):
        table = pq.read_table(instructions / f"{split}.parquet")
        if split != "train":
            table = table.filter(pc.equal(table["template"], "seq-rec-01"))
        pq.write_table(table, out / f"{split}.parquet")
    return out


def test_a_t2_template_ranks_every_candidate_as_its_answer(world, t2_instructions, tiny_t5_dir, tmp_path,
                                                           hf_log_likelihoods):
    """A folder whose sequential-recommendation rows are all T2 (no list in the instruction) is
    evaluated, not refused; 100 candidates are scored in one pass (no tournament: the prompt
    lists nothing), and the metrics equal Hugging Face's per-candidate log-likelihood ranking."""
    from instructrec.training.metrics import summarize_ranks

    only_t2 = t2_only_folder(t2_instructions, tmp_path / "instructions")
    results = evaluate(config(world, tiny_t5_dir, tmp_path / "run", instructions=only_t2,
                              scenarios=("seq-rec", "candidates-100"), methods=("instructrec",)))
    lists = json.loads((tmp_path / "run" / "instances.json").read_text())
    by_key = {i.key: i for i in load_instances(only_t2, "test", SCENARIOS["seq-rec"], {}, None)}
    titles_of = dict(zip(*pq.read_table(world / "prepared" / "items.parquet", columns=["item_id", "title"])
                         .to_pydict().values()))
    for name in ("seq-rec", "candidates-100"):
        entry = results["scenarios"][name]
        assert entry["templates"] == ["seq-rec-01"] and entry["methods"]["instructrec"]["template"] == "seq-rec-01"
        instances = [with_candidate_list(by_key[key], ids, titles_of) for key, ids in lists[f"{name}:test"]]
        assert instances and all(i.prompts["seq-rec-01"] == by_key[i.key].prompts["seq-rec-01"] for i in instances)
        form = entry["methods"]["instructrec"]["normalize"]
        reference = summarize_ranks(hf_ranks(tiny_t5_dir, instances, "seq-rec-01", hf_log_likelihoods, form))
        for k in ("hr@1", "hr@5", "ndcg@5"):
            assert entry["methods"]["instructrec"][k] == pytest.approx(reference[k], abs=1e-9), (name, k)
    assert {len(ids) for _, ids in lists["candidates-100:test"]} == {100}


def test_templates_and_score_forms_are_chosen_between_on_validation(world, t2_instructions, tiny_t5_dir,
                                                                    tmp_path, hf_log_likelihoods):
    """With seq-rec-01 (T2) and seq-rec-02 (T3) rows, each template's and score form's (sum, mean, calibrated)
    validation metrics are the Hugging Face ranking's, and the test metrics are those of the
    highest validation NDCG@5."""
    from instructrec.training.metrics import summarize_ranks

    results = evaluate(config(world, tiny_t5_dir, tmp_path / "run", instructions=t2_instructions,
                              scenarios=("seq-rec",), methods=("instructrec",), valid_instances=8))
    entry = results["scenarios"]["seq-rec"]
    method = entry["methods"]["instructrec"]
    assert entry["templates"] == ["seq-rec-01", "seq-rec-02"]
    lists = json.loads((tmp_path / "run" / "instances.json").read_text())
    valid_key = next(k for k in lists if k.endswith(":valid"))
    valid = {i.key: i for i in load_instances(t2_instructions, "valid", SCENARIOS["seq-rec"], {}, None)}
    picked = [valid[key] for key, _ in lists[valid_key]]
    assert len(picked) == 8
    choices = [(t, f) for t in ("seq-rec-01", "seq-rec-02") for f in ("sum", "mean", "calibrated")]
    reference = {c: summarize_ranks(hf_ranks(tiny_t5_dir, picked, c[0], hf_log_likelihoods, c[1])) for c in choices}
    assert sorted(method["valid_by_choice"]) == sorted(" ".join(c) for c in choices)
    for c in choices:
        assert method["valid_by_choice"][" ".join(c)]["ndcg@5"] == pytest.approx(reference[c]["ndcg@5"], abs=1e-9)
    best = max(choices, key=lambda c: (reference[c]["ndcg@5"], -choices.index(c)))
    assert (method["template"], method["normalize"]) == best
    test = {i.key: i for i in load_instances(t2_instructions, "test", SCENARIOS["seq-rec"], {}, None)}
    ranked = [test[key] for key, _ in lists["seq-rec:test"]]
    expected = summarize_ranks(hf_ranks(tiny_t5_dir, ranked, best[0], hf_log_likelihoods, best[1]))
    for k in ("hr@1", "ndcg@5"):
        assert method[k] == pytest.approx(expected[k], abs=1e-9)
    # The forms rank differently on these lists (else the choice would be untested).
    assert len({json.dumps(reference[c], sort_keys=True) for c in choices}) > 2


def hf_summed_ranks(model_dir, instances, templates, hf_log_likelihoods) -> list[int]:
    """The target's rank in each instance when each template's calibrated Hugging Face scores (the
    title's log-likelihood minus that under an empty instruction) are standardised by hand within
    the list (population standard deviation) and summed."""
    from instructrec.training.metrics import pessimistic_rank

    ranks = []
    for inst in instances:
        summed = 0
        for template in templates:
            scores = (hf_log_likelihoods(model_dir, inst.prompts[template], inst.titles)
                      - hf_log_likelihoods(model_dir, "", inst.titles)).astype(np.float64)
            summed = summed + (scores - scores.mean()) / scores.std()
        ranks.append(pessimistic_rank(summed, inst.positive))
    return ranks


def test_template_sums_by_hand():
    from instructrec.training.evaluate import summed_standardised, template_sums

    assert template_sums(["a", "b", "c"]) == ["a+b", "a+c", "b+c", "a+b+c"]
    assert template_sums(["a"]) == []
    with pytest.raises(ValueError, match="joins"):
        template_sums(["a+b", "c"])
    first, second = np.array([1.0, 2.0, 3.0]), np.array([10.0, 10.0, 40.0])
    # (x - mean) / std by hand: [-1.2247, 0, 1.2247] and [-0.7071, -0.7071, 1.4142]
    summed = summed_standardised([[first, first], [second, None]])
    assert summed[0] == pytest.approx([-1.9318, -0.7071, 2.6389], abs=1e-4)
    assert summed[1] is None  # a list one template could not score is a miss


@pytest.mark.parametrize("metric", ["ndcg@5", "hr@1"])
def test_combine_templates_chooses_between_single_templates_and_their_standardised_sum(
        world, t2_instructions, tiny_t5_dir, tmp_path, hf_log_likelihoods, metric):
    """--combine-templates: the choices are each template and their sum; the sum's validation
    metrics are those of both templates' Hugging Face log-likelihoods standardised by hand and
    summed, the choice is the first highest, and the test metrics are the chosen one's ranking
    recomputed the same way. The calibrated form: a random model's summed log-likelihood is the
    titles' own prior whatever the wording, so both templates (and their sum) would rank alike."""
    from instructrec.training.metrics import summarize_ranks

    out = tmp_path / "run"
    results = evaluate(config(world, tiny_t5_dir, out, instructions=t2_instructions, scenarios=("seq-rec",),
                              methods=("instructrec",), valid_instances=10, score_forms=("calibrated",),
                              combine_templates=True, select_by=metric))
    method = results["scenarios"]["seq-rec"]["methods"]["instructrec"]
    lists = json.loads((out / "instances.json").read_text())
    valid_key = next(k for k in lists if k.endswith(":valid"))
    valid = {i.key: i for i in load_instances(t2_instructions, "valid", SCENARIOS["seq-rec"], {}, None)}
    picked = [valid[key] for key, _ in lists[valid_key]]
    choices = ["seq-rec-01", "seq-rec-02", "seq-rec-01+seq-rec-02"]
    ranks = {c: hf_summed_ranks(tiny_t5_dir, picked, c.split("+"), hf_log_likelihoods) for c in choices}
    reference = {c: summarize_ranks(ranks[c]) for c in choices}
    assert sorted(method["valid_by_choice"]) == sorted(f"{c} calibrated" for c in choices)
    for c in choices:
        for k in ("hr@1", "ndcg@5"):
            assert method["valid_by_choice"][f"{c} calibrated"][k] == pytest.approx(reference[c][k], abs=1e-9), (c, k)
    best = max(reference[c][metric] for c in choices)
    assert method["template"] == next(c for c in choices if reference[c][metric] == best)
    test = {i.key: i for i in load_instances(t2_instructions, "test", SCENARIOS["seq-rec"], {}, None)}
    ranked = [test[key] for key, _ in lists["seq-rec:test"]]
    expected = summarize_ranks(hf_summed_ranks(tiny_t5_dir, ranked, method["template"].split("+"),
                                               hf_log_likelihoods))
    for k in ("hr@1", "ndcg@5"):
        assert method[k] == pytest.approx(expected[k], abs=1e-9), k
    # The sum ranks targets differently from either template alone (else nothing is tested).
    assert ranks["seq-rec-01+seq-rec-02"] not in (ranks["seq-rec-01"], ranks["seq-rec-02"])


@pytest.mark.parametrize("metric", ["hr@1", "ndcg@3"])
def test_select_by_chooses_form_and_popularity_weight_by_that_validation_metric(world, t2_instructions, tiny_t5_dir,
                                                                                 tmp_path, metric):
    """--select-by: the template, the form and the hybrid's weight are the first of the highest
    recorded validation `metric`, in the order the choices are listed (templates, then forms;
    weights ascending)."""
    from instructrec.training.evaluate import POPULARITY_WEIGHTS

    results = evaluate(config(world, tiny_t5_dir, tmp_path / "run", instructions=t2_instructions,
                              scenarios=("seq-rec",), methods=("instructrec", "instructrec+popularity"),
                              valid_instances=8, select_by=metric))
    assert results["config"]["select_by"] == metric
    methods = results["scenarios"]["seq-rec"]["methods"]
    assert methods["instructrec"]["selected_by"] == methods["instructrec+popularity"]["selected_by"] == metric
    assert (f"chosen by validation {metric.upper()}: InstructRec (ours, tuned), InstructRec + popularity prior"
            in (tmp_path / "run" / "results.md").read_text())
    model, fused = methods["instructrec"], methods["instructrec+popularity"]
    choices = [(t, f) for t in ("seq-rec-01", "seq-rec-02") for f in ("sum", "mean", "calibrated")]
    by_choice = model["valid_by_choice"]
    best = max(by_choice[" ".join(c)][metric] for c in choices)
    assert (model["template"], model["normalize"]) == next(c for c in choices if by_choice[" ".join(c)][metric] == best)
    by_weight = fused["valid_by_popularity_weight"]
    best = max(by_weight[str(w)][metric] for w in POPULARITY_WEIGHTS)
    assert fused["popularity_weight"] == next(w for w in POPULARITY_WEIGHTS if by_weight[str(w)][metric] == best)


def test_an_unknown_select_by_metric_is_refused(world, tiny_t5_dir, tmp_path):
    with pytest.raises(InputError, match="hr@1") as excinfo:
        evaluate(config(world, tiny_t5_dir, tmp_path / "run", scenarios=("seq-rec",), select_by="hr@10"))
    assert excinfo.value.field == "select_by" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("scenario, kind, size, methods, n_valid", [
    ("hard-negatives", "hard", 10, ("instructrec", "two-tower"), 8),
    ("candidates-100", "sampled", 100, ("instructrec",), 5),
])
def test_hard_negatives_and_candidates_100_choose_their_form_on_validation_lists_drawn_as_their_test_lists(
        world, t2_instructions, tiny_t5_dir, tmp_path, hf_log_likelihoods, caplog, scenario, kind, size, methods,
        n_valid):
    """Hard negatives pick their score form on validation instances whose 9 negatives the two-tower
    retrieved, candidates-100 on validation instances with 99 sampled negatives (in both, only the
    target was interacted with), by the Hugging Face ranking's NDCG@5 there, not on seq-rec's stored
    lists of 10; an --add-to folder recorded without those lists gets them drawn, the same ones."""
    from instructrec.training.metrics import summarize_ranks

    only_t2 = t2_only_folder(t2_instructions, tmp_path / "instructions")
    run = dict(instructions=only_t2, scenarios=("seq-rec", scenario), valid_instances=n_valid)
    results = evaluate(config(world, tiny_t5_dir, tmp_path / "run", methods=methods, **run))
    lists = json.loads((tmp_path / "run" / "instances.json").read_text())
    own_key = f"main:P1+I0:{kind}:valid"
    assert {"main:P1+I0:valid", own_key} <= set(lists)
    seen = {}
    for r in pq.read_table(world / "prepared" / "interactions.parquet").to_pylist():
        seen.setdefault(r["user_id"], set()).add(r["item_id"])
    own_valid = lists[own_key]
    assert len(own_valid) == n_valid
    assert all(len(set(ids)) == len(ids) == size and len(set(ids) & seen[user]) == 1 for user, ids in own_valid)
    stored = dict(map(tuple, ((k, tuple(v)) for k, v in lists["main:P1+I0:valid"])))
    assert any(tuple(ids) != stored.get(user) for user, ids in own_valid)

    titles_of = dict(zip(*pq.read_table(world / "prepared" / "items.parquet", columns=["item_id", "title"])
                         .to_pydict().values()))
    valid = {i.key: i for i in load_instances(only_t2, "valid", SCENARIOS["seq-rec"], {}, None)}
    picked = [with_candidate_list(valid[key], ids, titles_of) for key, ids in own_valid]
    forms = ("sum", "mean", "calibrated")
    reference = {f: summarize_ranks(hf_ranks(tiny_t5_dir, picked, "seq-rec-01", hf_log_likelihoods, f)) for f in forms}
    method = results["scenarios"][scenario]["methods"]["instructrec"]
    for f in forms:
        assert method["valid_by_choice"][f"seq-rec-01 {f}"]["ndcg@5"] == pytest.approx(reference[f]["ndcg@5"], abs=1e-9)
    assert method["normalize"] == max(forms, key=lambda f: (reference[f]["ndcg@5"], -forms.index(f)))
    assert method["valid_by_choice"] != results["scenarios"]["seq-rec"]["methods"]["instructrec"]["valid_by_choice"]

    older = tmp_path / "older"
    older.mkdir()
    (older / "metrics.json").write_text((tmp_path / "run" / "metrics.json").read_text())
    (older / "instances.json").write_text(json.dumps({k: v for k, v in lists.items() if k != own_key}))
    with caplog.at_level("WARNING", logger="instructrec.training.evaluate"):
        added = evaluate(config(world, tiny_t5_dir, tmp_path / "added", methods=("instructrec",), add_to=older, **run))
    assert own_key in caplog.text
    assert json.loads((tmp_path / "added" / "instances.json").read_text())[own_key] == own_valid
    assert without_timings(added["scenarios"][scenario]["methods"]["instructrec"]) == without_timings(method)


def test_one_score_form_skips_the_choice_and_bad_forms_are_refused(world, t2_instructions, tiny_t5_dir, tmp_path,
                                                                  hf_log_likelihoods):
    """--score-forms mean ranks every list per title token (Hugging Face's log-likelihood over the
    tokenizer's own count); an unknown or empty form list names the field before anything runs."""
    from instructrec.training.metrics import summarize_ranks

    only_t2 = t2_only_folder(t2_instructions, tmp_path / "instructions")
    results = evaluate(config(world, tiny_t5_dir, tmp_path / "run", instructions=only_t2, scenarios=("seq-rec",),
                              methods=("instructrec",), score_forms=("mean",)))
    method = results["scenarios"]["seq-rec"]["methods"]["instructrec"]
    assert (method["template"], method["normalize"], method["valid_by_choice"]) == ("seq-rec-01", "mean", {})
    lists = json.loads((tmp_path / "run" / "instances.json").read_text())
    assert list(lists) == ["seq-rec:test"]  # no validation lists: nothing to choose
    test = {i.key: i for i in load_instances(only_t2, "test", SCENARIOS["seq-rec"], {}, None)}
    ranked = [test[key] for key, _ in lists["seq-rec:test"]]
    expected = summarize_ranks(hf_ranks(tiny_t5_dir, ranked, "seq-rec-01", hf_log_likelihoods, "mean"))
    assert method["ndcg@5"] == pytest.approx(expected["ndcg@5"], abs=1e-9)
    assert "| seq-rec-01 | mean |" in (tmp_path / "run" / "results.md").read_text()
    for forms in ((), ("sum", "max"), ("sum", "sum"), "sum", ("calibrated:x",), ("mean:1",)):
        with pytest.raises(InputError, match="score_forms"):
            evaluate(config(world, tiny_t5_dir, tmp_path / "bad", instructions=only_t2, score_forms=forms))


# --------------------------------------------------------------------------------------------- popularity fusion


def test_with_popularity_by_hand():
    """Scores (-3, -1, -2) and counts (0, 9, 99): both standardise to +-sqrt(3/2) and 0 (log(1 + count)
    is 0, ln 10, ln 100, evenly spaced), so the fused values are sqrt(3/2) x (-1 - w, 1, w)."""
    from instructrec.training.evaluate import ranks_of, with_popularity

    root = np.sqrt(1.5)
    scores, counts = [np.array([-3.0, -1.0, -2.0])], np.array([[0, 9, 99]])
    for weight, expected in ((0.0, [-1, 1, 0]), (0.5, [-1.5, 1, 0.5]), (4.0, [-5, 1, 4])):
        np.testing.assert_allclose(with_popularity(scores, counts, weight)[0], root * np.array(expected), atol=1e-12)
    # The target is the middle item: first for the model, second once popularity outweighs it.
    inst = Instance("u", "u", "b", ["a", "b", "c"], ["A", "B", "C"], {})
    assert [ranks_of(with_popularity(scores, counts, w), [inst])[0] for w in (0.0, 0.5, 4.0)] == [1, 1, 2]
    # A rejected request stays a miss; equal counts add nothing; a negative weight is refused.
    assert ranks_of(with_popularity([None], counts, 1.0), [inst]) == [4]
    np.testing.assert_allclose(with_popularity(scores, np.array([[5, 5, 5]]), 2.0)[0], root * np.array([-1, 1, 0]))
    with pytest.raises(ValueError, match="popularity weight"):
        with_popularity(scores, counts, -1.0)


def test_popularity_fusion_chooses_its_weight_on_validation_and_matches_a_hand_fused_ranking(
        world, tiny_t5_dir, hf_log_likelihoods, tmp_path):
    """instructrec+popularity: the tuned model's choice (template, form), its weight the best
    validation NDCG@5 of POPULARITY_WEIGHTS (weight 0 being the model alone), and its test metrics
    recomputed from Hugging Face log-likelihoods and training counts read from interactions.parquet."""
    from collections import Counter

    from instructrec.training.evaluate import POPULARITY_WEIGHTS
    from instructrec.training.metrics import pessimistic_rank, summarize_ranks

    out = tmp_path / "fused"
    results = evaluate(config(world, tiny_t5_dir, out, scenarios=("seq-rec",), score_forms=("sum", "mean"),
                              methods=("instructrec", "instructrec+popularity", "popularity")))
    methods = results["scenarios"]["seq-rec"]["methods"]
    model, fused = methods["instructrec"], methods["instructrec+popularity"]
    assert (fused["template"], fused["normalize"]) == (model["template"], model["normalize"])
    by_weight = fused["valid_by_popularity_weight"]
    assert list(by_weight) == [str(w) for w in POPULARITY_WEIGHTS]
    assert fused["popularity_weight"] > 0  # in this world popularity helps on validation: the fusion is exercised
    best = max(v["ndcg@5"] for v in by_weight.values())
    assert fused["popularity_weight"] == next(w for w in POPULARITY_WEIGHTS if by_weight[str(w)]["ndcg@5"] == best)
    alone = model["valid_by_choice"][f"{model['template']} {model['normalize']}"]
    assert {k: by_weight["0.0"][k] for k in ("hr@1", "ndcg@5")} == {k: alone[k] for k in ("hr@1", "ndcg@5")}

    interactions = pq.read_table(world / "prepared" / "interactions.parquet").to_pylist()
    counts = Counter(r["item_id"] for r in interactions if r["split"] == "train")
    lists = json.loads((out / "instances.json").read_text())["seq-rec:test"]
    by_key = {i.key: i for i in load_instances(world / "instructions", "test", SCENARIOS["seq-rec"], {}, None)}
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tiny_t5_dir)
    ranks = []
    for key, ids in lists:
        inst = by_key[key]
        assert inst.candidate_ids == ids
        scores = hf_log_likelihoods(tiny_t5_dir, inst.prompts[fused["template"]], inst.titles)
        if fused["normalize"] == "mean":
            scores = scores / np.array([len(tokenizer(text_target=t).input_ids) for t in inst.titles])
        prior = np.log1p([counts[c] for c in ids])
        fused_scores = (scores - scores.mean()) / scores.std()
        if prior.max() > prior.min():
            fused_scores = fused_scores + fused["popularity_weight"] * (prior - prior.mean()) / prior.std()
        ranks.append(pessimistic_rank(fused_scores, inst.positive))
    reference = summarize_ranks(ranks)
    for k in ("hr@1", "hr@3", "hr@5", "ndcg@3", "ndcg@5"):
        assert fused[k] == pytest.approx(reference[k], abs=1e-9), k
    assert fused["ranks"] == ranks  # every list's rank is recorded, in instances.json's order

    # results.md compares each tuned method with each baseline list by list: the mean of the
    # per-list hit differences and 1.96 sample standard deviations of it over sqrt(n).
    popularity = methods["popularity"]["ranks"]
    for method in ("instructrec", "instructrec+popularity"):
        d = np.array([float(a == 1) - float(b == 1) for a, b in zip(methods[method]["ranks"], popularity)])
        label = {"instructrec": "InstructRec (ours, tuned)",
                 "instructrec+popularity": "InstructRec + popularity prior (ours, hybrid)"}[method]
        line = (f"Paired on the same {len(d)} lists, HR@1 of {label} minus each baseline's, with its 95% interval: "
                f"Popularity {d.mean():+.3f} +- {1.96 * d.std(ddof=1) / np.sqrt(len(d)):.3f}.")
        assert line in (out / "results.md").read_text()
    table = (out / "results.md").read_text()
    assert "InstructRec + popularity prior" in table
    assert f"| {fused['normalize']} + {fused['popularity_weight']:g} x popularity |" in table

    # The batch job serves the hybrid: the test lists as a Parquet request table with
    # candidate_priors = log(1 + training interactions), ranked under metrics.json's job_normalize,
    # put every target where the evaluation did.
    from instructrec.engine.batch import run_job

    assert fused["job_normalize"] == f"{fused['normalize']}+priors:{fused['popularity_weight']:g}"
    rows = [dict(request_id=key, instruction=by_key[key].prompts[fused["template"]], candidates=by_key[key].titles,
                 candidate_ids=ids, candidate_priors=[float(np.log1p(counts[c])) for c in ids]) for key, ids in lists]
    pq.write_table(__import__("pyarrow").Table.from_pylist(rows), tmp_path / "requests.parquet")
    run_job(tiny_t5_dir, tmp_path / "requests.parquet", tmp_path / "job", normalize=fused["job_normalize"],
            dtype="float32", progress=False)
    served = pq.read_table(tmp_path / "job").to_pylist()
    assert [row["error"] for row in served] == [None] * len(lists)
    assert [row["ranked_ids"].index(by_key[row["request_id"]].target) + 1 for row in served] == ranks


def test_popularity_fusion_needs_a_tuned_model(world, tokenizer_dir, tmp_path):
    with pytest.raises(InputError, match="zero-shot reference"):
        evaluate(config(world, "random:t5-tiny", tmp_path / "x", tokenizer=tokenizer_dir,
                        methods=("instructrec+popularity",)))


def test_candidates_100_draws_its_own_number_of_validation_lists(world, tiny_t5_dir, tmp_path):
    """--valid-instances-100: lists of 100 cost ten times as much to score, so their count is set
    apart from the other types' (default: the same)."""
    run = dict(scenarios=("seq-rec", "candidates-100"), methods=("popularity",), valid_instances=6)
    evaluate(config(world, tiny_t5_dir, tmp_path / "apart", valid_instances_100=3, **run))
    lists = json.loads((tmp_path / "apart" / "instances.json").read_text())
    assert (len(lists["main:P1+I0:valid"]), len(lists["main:P1+I0:sampled:valid"])) == (6, 3)
    evaluate(config(world, tiny_t5_dir, tmp_path / "same", **run))
    lists = json.loads((tmp_path / "same" / "instances.json").read_text())
    assert (len(lists["main:P1+I0:valid"]), len(lists["main:P1+I0:sampled:valid"])) == (6, 6)
    with pytest.raises(InputError, match="valid_instances_100: must be an integer >= 0"):
        evaluate(config(world, tiny_t5_dir, tmp_path / "bad", valid_instances_100=-1, **run))
