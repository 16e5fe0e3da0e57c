"""Instruction tuning: a tiny model memorises a hand-made instruction set and ranks its targets
first (through the engine, cross-checked by Hugging Face forward log-likelihoods), a resumed run
reproduces the uninterrupted loss curve, accumulation matches one big batch, and bad inputs fail
before training with typed errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from instructrec.engine.errors import InputError
from instructrec.training.tune import TrainConfig, epoch_batches, lr_factor, train

CATALOG = [
    "Halo 3 - Xbox 360", "Mario Kart 8 - Nintendo Switch", "The Last of Us - PlayStation 3",
    "FIFA 19 - PlayStation 4", "Minecraft - Xbox One", "Zelda Breath of the Wild - Switch",
    "Logitech G502 Gaming Mouse", "Razer Kraken Headset", "Forza Horizon 4 - Xbox One",
    "Animal Crossing - Nintendo Switch", "Gran Turismo Sport - PlayStation 4",
    "Red Dead Redemption 2 - Xbox One", "Super Smash Bros - Wii U", "Tetris Effect - PC",
    "Xbox Wireless Controller - Black", "PlayStation Camera", "Stardew Valley - PC",
    "Dark Souls III - PlayStation 4", "Portal 2 - PC", "Sonic Mania - Nintendo Switch",
]
COLUMNS = ("instruction", "target", "template", "preference", "intention", "task", "strategy",
           "scenario", "split", "user_id", "target_item_id", "candidates", "candidate_ids", "annotator")


def make_rows(n_users: int = 8, n_candidates: int = 10) -> list[dict]:
    """One reranking instruction per user: a 3-title history and 10 listed candidates (the
    positive + 9 negatives, in a per-user order so the positive's position varies)."""
    rows, n = [], len(CATALOG)
    for u in range(n_users):
        history = [CATALOG[(u * 3 + j) % n] for j in range(3)]
        positive = (u * 7 + 5) % n
        pool = [positive] + [i for i in range(n) if i != positive and i not in [(u * 3 + j) % n for j in range(3)]]
        chosen = [positive] + pool[1 + u % 4:][:n_candidates - 1]
        order = sorted(chosen, key=lambda i: (i * 11 + u) % n)
        candidates = [CATALOG[i] for i in order]
        listing = " ".join(f"({k + 1}) {t}" for k, t in enumerate(candidates))
        rows.append(dict(
            instruction=f"The user bought {', '.join(history)}. Pick the item they buy next: {listing}",
            target=CATALOG[positive], template="P1-I0-T3-demo", preference="P1", intention="I0",
            task="T3", strategy="plain", scenario="recommendation", split="train", user_id=f"u{u}",
            target_item_id=f"item{positive}", candidates=candidates,
            candidate_ids=[f"item{i}" for i in order], annotator="offline"))
    return rows


def write_dataset(directory: Path, rows: list[dict], drop: tuple[str, ...] = ()) -> Path:
    """train = valid = test = `rows`, so validation measures the training instances."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    columns = [c for c in COLUMNS if c not in drop]
    schema = pa.schema([(c, pa.list_(pa.string()) if c in ("candidates", "candidate_ids") else pa.string())
                        for c in columns])
    for split in ("train", "valid", "test"):
        pq.write_table(pa.table({c: [r[c] for r in rows] for c in columns}, schema=schema),
                       directory / f"{split}.parquet")
    return directory


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("instructions"), make_rows())


def config(dataset: Path, out: Path, tokenizer_dir: Path, **overrides) -> TrainConfig:
    """t5-tiny in fp32 without progress bar: the deterministic, fast setting of every test. One
    thread: tests share 2 cores with other jobs, where 2 spin-waiting threads run ~5x slower."""
    base = dict(instructions=dataset, model="random:t5-tiny", tokenizer=tokenizer_dir, out=out,
                precision="fp32", device="cpu", progress=False, batch_size=8, max_steps=2,
                rank_eval=False, dropout=0.0, threads=1)
    base.update(overrides)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------


def test_tiny_model_memorises_the_set_and_ranks_each_target_first(dataset, tmp_path, tokenizer_dir,
                                                                    hf_log_likelihoods):
    out = tmp_path / "run"
    result = train(config(dataset, out, tokenizer_dir, max_steps=40, optimizer="adamw", lr=3e-3,
                          schedule="constant", rank_eval=True))
    losses = [result.step_losses[s] for s in sorted(result.step_losses)]
    assert len(losses) == 40 and not result.stopped_early
    # Random init starts near log(32128) = 10.4 nats; memorised targets end far below.
    assert losses[-1] < losses[0] / 10
    # Through the engine (the training's own validation path): every training target first.
    final = result.evaluations[-1]
    assert final["n"] == 8 and final["errors"] == 0
    assert final["hr@1"] == 1.0 and final["ndcg@5"] == 1.0
    # Independently, from the saved checkpoint with plain HF forwards.
    for row in make_rows():
        scores = hf_log_likelihoods(out, row["instruction"], row["candidates"])
        assert row["candidates"][int(np.argmax(scores))] == row["target"]
    # Outputs: metrics (one train record per step + the final eval) and a PNG loss curve.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 41))
    assert [r["kind"] for r in records].count("eval") == 1
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_validation_ranks_listed_and_unlisted_templates_each_on_its_own(tmp_path, tokenizer_dir, caplog,
                                                                        hf_log_likelihoods):
    """valid.parquet with T3 rows, T2 rows of seq-rec-01 (answered by the title) and T2 rows of
    seq-rec-12 (answered by a taste description: not rankable by title) over the same lists: the
    run ranks the first two, each template's HR@1 / NDCG@5 equal plain Hugging Face forwards of
    the saved weights, and the record's headline is the template with the better NDCG@5."""
    from instructrec.training.metrics import pessimistic_rank, summarize_ranks

    listed = make_rows()
    unlisted, described = [], []
    for row in listed:
        history = row["instruction"].split("The user bought ")[1].split(". Pick")[0]
        unlisted.append(dict(row, template="seq-rec-01", task="T2",
                             instruction=f"Past purchases of this shopper, oldest to newest: {history}. "
                                         "Based on this sequence, name the item they will buy next."))
        described.append(dict(row, template="seq-rec-12", task="T2", target="Likes racing games.",
                              instruction=f"Describe the taste of a shopper who bought {history}."))
    data = write_dataset(tmp_path / "data", listed + unlisted + described)
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="instructrec.training.tune"):
        result = train(config(data, out, tokenizer_dir, max_steps=6, optimizer="adamw", lr=3e-3,
                              rank_eval=True))
    final = result.evaluations[-1]
    assert sorted(final["by_template"]) == ["P1-I0-T3-demo", "seq-rec-01"]
    reference = {}
    for template, rows in (("P1-I0-T3-demo", listed), ("seq-rec-01", unlisted)):
        ranks = [pessimistic_rank(hf_log_likelihoods(out, r["instruction"], r["candidates"]),
                                  r["candidates"].index(r["target"])) for r in rows]
        reference[template] = summarize_ranks(ranks)
        for key in ("hr@1", "ndcg@5", "n"):
            assert final["by_template"][template][key] == pytest.approx(reference[template][key], abs=1e-6)
    best = max(sorted(reference), key=lambda t: (reference[t]["ndcg@5"], t == "P1-I0-T3-demo"))
    assert final["template"] == best and final["ndcg@5"] == pytest.approx(reference[best]["ndcg@5"], abs=1e-6)
    record = json.loads([line for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line][-1])
    assert record["by_template"].keys() == final["by_template"].keys()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "ranking instances (P1-I0-T3-demo 8, seq-rec-01 8)" in logged
    assert f"over 8 instances of {best}; " in logged
    # The run trained with torch's fused tanh-GELU in each of t5-tiny's 2+2 feed-forwards, and the
    # saved weights are Hugging Face's model as ever (the references above load them); the same for its norms.
    assert "fused GELU: 4 feed-forward activations" in logged
    assert "fused RMS norm: 12 norms" in logged  # 2 per encoder layer, 3 per decoder layer, 2 final


def test_validation_measures_the_same_rows_and_users_whatever_the_seed(tmp_path, tokenizer_dir):
    """--seed changes the initialisation and the data order, not what validation measures: runs of
    two seeds take the same valid rows for the loss and the same users for HR@1, so their numbers
    compare (they took seeded subsets of their own before)."""
    from instructrec.training.tune import _Run

    rows = [dict(r, instruction=f"Shopper {i}. {r['instruction']}") for i, r in enumerate(make_rows(n_users=40))]
    data = write_dataset(tmp_path / "data", rows)
    picked = {}
    for seed in (0, 1):
        run = _Run(config(data, tmp_path / f"seed{seed}", tokenizer_dir, seed=seed, rank_eval=True,
                          eval_max_rows=5, eval_max_instances=5), clock=lambda: 0.0)
        try:
            run.start_accelerator()
            run.check_inputs()
            run.prepare_data()
            picked[seed] = (run.valid_rows.source_flat.tolist(), [x.instruction for x in run.instances])
        finally:
            run.release()
    users = picked[0][1]
    assert len(users) == 5 and len(set(users)) == 5
    assert picked[1] == picked[0]
    # A subset, not the first rows.
    assert users != [r["instruction"] for r in rows[:5]]


def test_resumed_run_reproduces_the_uninterrupted_loss_curve(dataset, tmp_path, tokenizer_dir):
    # Dropout on (RNG in play), Adafactor state, warm-up + linear decay, accumulation, and
    # batches of 3 over 8 rows so the interruption falls mid-epoch (after 4 of 3 per epoch).
    settings = dict(max_steps=6, batch_size=3, grad_accum=2, dropout=0.1, optimizer="adafactor",
                    warmup_steps=2, schedule="linear")
    whole = train(config(dataset, tmp_path / "whole", tokenizer_dir, **settings))

    split = tmp_path / "split"
    first = train(config(dataset, split, tokenizer_dir, stop_after=2, **settings))
    assert first.stopped_early and first.steps_done == 2 and first.checkpoint.is_dir()
    # Evaluations in the resumed half must not disturb the curve (they consume no RNG).
    second = train(config(dataset, split, tokenizer_dir, resume=True, eval_every=1, **settings))
    assert second.steps_done == 6 and sorted(second.step_losses) == [3, 4, 5, 6]

    joined = {**first.step_losses, **second.step_losses}
    for step in range(1, 7):
        assert joined[step] == pytest.approx(whole.step_losses[step], abs=1e-6, rel=0), step
    # The curve must actually move, or equality would prove nothing.
    assert len({round(v, 4) for v in whole.step_losses.values()}) > 3
    # Same final weights.
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    # metrics.jsonl holds one curve: every step exactly once.
    steps = [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_changed_settings_and_a_missing_checkpoint(dataset, tmp_path, tokenizer_dir):
    out = tmp_path / "run"
    train(config(dataset, out, tokenizer_dir, max_steps=3, stop_after=1))
    with pytest.raises(InputError, match="lr"):
        train(config(dataset, out, tokenizer_dir, max_steps=3, resume=True, lr=5e-2))
    # A setting recorded only when on counts both ways: turned on, and turned off.
    with pytest.raises(InputError, match="prior_rows"):
        train(config(dataset, out, tokenizer_dir, max_steps=3, resume=True, prior_rows=0.5))
    flagged = tmp_path / "flagged"
    train(config(dataset, flagged, tokenizer_dir, max_steps=3, stop_after=1, prior_rows=0.5))
    with pytest.raises(InputError, match="prior_rows: checkpoint 0.5, now off"):
        train(config(dataset, flagged, tokenizer_dir, max_steps=3, resume=True))
    with pytest.raises(InputError) as excinfo:
        train(config(dataset, out, tokenizer_dir, max_steps=3))  # not --resume over a run
    assert excinfo.value.field == "out"
    with pytest.raises(InputError) as excinfo:
        train(config(dataset, tmp_path / "fresh", tokenizer_dir, resume=True))
    assert excinfo.value.field == "resume"


def test_accumulated_micro_batches_match_one_big_batch(dataset, tmp_path, tokenizer_dir):
    # Without length grouping, batches of 4 are the halves of the batches of 8 (same
    # permutation), so 4 x 2 accumulated must equal 8 x 1: the loss is token-weighted.
    common = dict(max_steps=2, optimizer="adamw", lr=1e-3, length_grouped=False)
    big = train(config(dataset, tmp_path / "big", tokenizer_dir, batch_size=8, grad_accum=1, **common))
    acc = train(config(dataset, tmp_path / "acc", tokenizer_dir, batch_size=4, grad_accum=2, **common))
    for step in (1, 2):
        assert acc.step_losses[step] == pytest.approx(big.step_losses[step], abs=1e-5, rel=0)


def test_lengths_padded_to_a_multiple_train_the_same_steps(dataset, tmp_path, tokenizer_dir):
    # --pad-to-multiple only rounds each batch's shapes (masked source, ignored target and head
    # rows): from the same weights on the same batches, the step losses are those of exact lengths.
    common = dict(max_steps=3, optimizer="adamw", lr=1e-3)
    exact = train(config(dataset, tmp_path / "exact", tokenizer_dir, pad_to_multiple=1, **common))
    padded = train(config(dataset, tmp_path / "padded", tokenizer_dir, pad_to_multiple=16, **common))
    for step in (1, 2, 3):
        assert padded.step_losses[step] == pytest.approx(exact.step_losses[step], abs=1e-5, rel=0)
    for run, multiple in ((exact, 1), (padded, 16)):
        assert json.loads((run.out / "training_config.json").read_text())["resolved_pad_multiple"] == multiple


def test_pad_multiple_defaults_to_rounding_only_for_bf16_on_a_cpu(dataset, tmp_path, tokenizer_dir):
    from instructrec.training.tune_data import SHAPE_MULTIPLE

    cfg = config(dataset, tmp_path / "run", tokenizer_dir)
    assert cfg.resolved_pad_multiple("bf16", "cpu") == SHAPE_MULTIPLE == 16
    assert cfg.resolved_pad_multiple("fp32", "cpu") == 1
    assert cfg.resolved_pad_multiple("bf16", "cuda") == 1
    cfg.pad_to_multiple = 8
    assert cfg.resolved_pad_multiple("fp32", "cuda") == 8


def test_lora_trains_only_adapters_and_saves_a_merged_model(dataset, tmp_path, tokenizer_dir):
    pytest.importorskip("peft")
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from instructrec.engine.presets import shape_config

    out = tmp_path / "lora"
    result = train(config(dataset, out, tokenizer_dir, max_steps=2, lora_r=4, lora_alpha=8.0,
                          optimizer="adamw", lr=1e-2, rank_eval=True))
    # Validation ranked the merged (CPU) weights through the engine.
    assert result.evaluations[-1]["n"] == 8 and result.evaluations[-1]["errors"] == 0
    merged = T5ForConditionalGeneration.from_pretrained(out).state_dict()
    torch.manual_seed(0)  # the shape's seeded init, as train() builds it (seed 0)
    config_ = T5Config.from_dict(shape_config("t5-tiny"))
    config_.dropout_rate = 0.0
    base = T5ForConditionalGeneration(config_).state_dict()
    # Frozen weights are the base init; q and v (the LoRA targets) changed by the merge.
    assert torch.equal(merged["shared.weight"], base["shared.weight"])
    assert torch.equal(merged["encoder.block.0.layer.0.SelfAttention.k.weight"],
                       base["encoder.block.0.layer.0.SelfAttention.k.weight"])
    assert not torch.equal(merged["encoder.block.0.layer.0.SelfAttention.q.weight"],
                           base["encoder.block.0.layer.0.SelfAttention.q.weight"])


def test_cli_trains_and_writes_the_outputs(dataset, tmp_path, tokenizer_dir, capsys):
    from instructrec.cli import main

    out = tmp_path / "cli"
    code = main(["train", "--instructions", str(dataset), "--model", "random:t5-tiny", "--tokenizer",
                 str(tokenizer_dir), "--out", str(out), "--max-steps", "2", "--batch-size", "4",
                 "--precision", "fp32", "--device", "cpu", "--threads", "1", "--no-progress",
                 "--no-rank-eval"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps_done"] == 2 and summary["precision"] == "fp32"
    # Utilisation = engine/flops.py's count of the steps' rows over the measured fp32 peak.
    assert summary["model_gflops_per_s"] > 0 and summary["flop_utilisation"] > 0
    assert (out / "model.safetensors").is_file() and (out / "loss_curve.png").is_file()


# --------------------------------------------------------------------------- title-prior rows


def test_title_prior_rows_draw_each_target_as_often_as_it_is_one():
    import pyarrow as pa

    from instructrec.training.tune_data import TITLE_PRIOR_TEMPLATE, with_title_prior_rows

    targets = ["Halo 3"] * 750 + ["Portal 2"] * 250
    table = pa.table({"instruction": [f"row {i}" for i in range(1000)], "target": targets,
                      "template": ["seq-rec-01"] * 1000, "user_id": [f"u{i}" for i in range(1000)]})
    out = with_title_prior_rows(table, 1.0, seed=3)
    assert out.column_names == ["instruction", "target", "template"]
    assert out.slice(0, 1000).column("instruction").to_pylist() == table.column("instruction").to_pylist()
    assert out.slice(0, 1000).column("target").to_pylist() == targets
    added = out.slice(1000)
    assert added.num_rows == 1000
    assert set(added.column("instruction").to_pylist()) == {""}
    assert set(added.column("template").to_pylist()) == {TITLE_PRIOR_TEMPLATE}
    # Drawn as often as each title is a target: 3 in 4 (binomial sd 0.014 over 1000 draws).
    share = added.column("target").to_pylist().count("Halo 3") / 1000
    assert abs(share - 0.75) < 0.05
    # A pure function of the seed; a small fraction still adds one row.
    assert with_title_prior_rows(table, 1.0, seed=3).equals(out)
    assert not with_title_prior_rows(table, 1.0, seed=4).slice(1000).equals(added)
    assert with_title_prior_rows(table, 0.0001, seed=3).num_rows == 1001
    assert with_title_prior_rows(table, 0.1, seed=3).num_rows == 1100


def test_prior_rows_teach_the_empty_instruction_how_often_each_title_is_a_target(tmp_path, tokenizer_dir,
                                                                                  hf_log_likelihoods):
    """Trained with --prior-rows, the empty instruction (the engine's calibrated prior) answers
    each title with about the share of the added rows that answer with it, where a model trained
    without them puts a few percent there in all; read with Hugging Face's own forward from the
    saved model."""
    import pyarrow.parquet as pq

    from instructrec.training.tune_data import TITLE_PRIOR_TEMPLATE, with_title_prior_rows

    rows = make_rows()
    skew = [0, 0, 0, 0, 0, 1, 1, 2]  # rows 0-4 answer CATALOG[0], 5-6 CATALOG[1], 7 CATALOG[2]
    for row, k in zip(rows, skew):
        row["target"] = CATALOG[k]
    data = write_dataset(tmp_path / "data", rows)
    out = tmp_path / "run"
    # Every step sees all 16 rows (8 + 8 added): full-batch steps settle on the minimum, where
    # batches of 8 leave the prior wherever the last few batches pulled it (a fresh clone's
    # generated tokenizer read 0.19 for a share of 0.375 with them).
    result = train(config(data, out, tokenizer_dir, max_steps=60, optimizer="adamw", lr=3e-3,
                          schedule="constant", prior_rows=1.0, batch_size=16))
    assert not result.stopped_early
    drawn = with_title_prior_rows(pq.read_table(data / "train.parquet"), 1.0, seed=0).slice(len(rows))
    assert set(drawn.column("template").to_pylist()) == {TITLE_PRIOR_TEMPLATE}
    shares = {t: drawn.column("target").to_pylist().count(t) / drawn.num_rows for t in CATALOG}
    probabilities = dict(zip(CATALOG, np.exp(hf_log_likelihoods(out, "", CATALOG))))
    # The empirical distribution of the added rows is what their NLL is minimised at.
    assert sum(probabilities[t] for t in CATALOG if shares[t]) > 0.8
    for title in CATALOG:
        assert abs(probabilities[title] - shares[title]) < 0.15, (title, shares[title], probabilities[title])
    # The run's own record of the flag (a resume with another value is refused).
    saved = json.loads((out / "training_config.json").read_text())
    assert saved["prior_rows"] == 1.0


# --------------------------------------------------------------------------- errors before training


@pytest.mark.parametrize("overrides, field", [
    (dict(lr=0.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(batch_size=0), "batch_size"),
    (dict(grad_accum=-1), "grad_accum"),
    (dict(max_steps=None, epochs=0.0), "epochs"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(schedule="step"), "schedule"),
    (dict(precision="fp16"), "precision"),
    (dict(dropout=1.0), "dropout"),
    (dict(max_source_length=1), "max_source_length/max_target_length"),
    (dict(model="t5-enormous"), "model"),
    (dict(pad_to_multiple=0), "pad_to_multiple"),
    (dict(prior_rows=-0.1), "prior_rows"),
    (dict(prior_rows=1.5), "prior_rows"),
    (dict(prior_rows=float("nan")), "prior_rows"),
])
def test_bad_settings_fail_before_training(dataset, tmp_path, tokenizer_dir, overrides, field):
    out = tmp_path / "run"
    with pytest.raises(InputError) as excinfo:
        train(config(dataset, out, tokenizer_dir, **overrides))
    assert excinfo.value.field == field
    assert not out.exists()


@pytest.mark.parametrize("drop", ["target", "instruction"])
def test_missing_columns_are_named(tmp_path, tokenizer_dir, drop):
    data = write_dataset(tmp_path / "data", make_rows(), drop=(drop,))
    with pytest.raises(InputError, match=drop) as excinfo:
        train(config(data, tmp_path / "run", tokenizer_dir))
    assert "columns" in excinfo.value.field
    assert not (tmp_path / "run").exists()


def test_missing_ranking_columns_fail_when_rank_eval_is_on(tmp_path, tokenizer_dir):
    data = write_dataset(tmp_path / "data", make_rows(), drop=("candidate_ids",))
    with pytest.raises(InputError, match="candidate_ids"):
        train(config(data, tmp_path / "run", tokenizer_dir, rank_eval=True))


def test_an_empty_dataset_is_refused(tmp_path, tokenizer_dir):
    data = write_dataset(tmp_path / "data", [])
    with pytest.raises(InputError, match="no rows") as excinfo:
        train(config(data, tmp_path / "run", tokenizer_dir))
    assert excinfo.value.field == "train"


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(dataset, tmp_path, tokenizer_dir):
    from transformers import T5Config, T5ForConditionalGeneration

    # A checkpoint whose embedding has 1000 rows, with the 32100-token T5 tokenizer.
    small_vocab = tmp_path / "small-vocab"
    T5ForConditionalGeneration(T5Config(vocab_size=1000, d_model=32, d_ff=64, d_kv=8, num_layers=1,
                                        num_heads=2, decoder_start_token_id=0)).save_pretrained(small_vocab)
    with pytest.raises(InputError, match="vocabulary holds 1000") as excinfo:
        train(config(dataset, tmp_path / "run", tokenizer_dir, model=str(small_vocab)))
    assert excinfo.value.field == "tokenizer"
    assert not (tmp_path / "run").exists()


def test_lora_without_peft_names_the_extra(dataset, tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(InputError, match="lora") as excinfo:
        train(config(dataset, tmp_path / "run", tokenizer_dir, lora_r=4))
    assert excinfo.value.field == "lora_r"


# --------------------------------------------------------------------------- optimiser


def test_adamw_is_fused_on_cpu_and_follows_the_update_rule_by_hand(dataset, tmp_path, tokenizer_dir):
    import torch

    from instructrec.training.tune_model import build_optimizer

    cfg = config(dataset, tmp_path / "out", tokenizer_dir, optimizer="adamw", lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3))
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(cfg, model)
    assert optimizer.defaults["fused"] is True
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.clone()
        optimizer.step()
    # AdamW by hand (Loshchilov & Hutter: decay decoupled from the moments), beta 0.9 / 0.999, eps 1e-8.
    for p, p0, *gs in zip(model.parameters(), start, *grads):
        w, m, v = p0.double(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
        for t, g in enumerate(gs, start=1):
            w = w * (1 - 1e-2 * 0.1)
            m = 0.9 * m + 0.1 * g.double()
            v = 0.999 * v + 0.001 * g.double() ** 2
            w = w - 1e-2 * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)
    # Sharded models keep the per-tensor loop (their parameters are not plain tensors).
    assert not build_optimizer(cfg, model, fused=False).defaults["fused"]


# --------------------------------------------------------------------------- schedule and data order


def test_lr_schedule_by_hand():
    # warm-up 2 of 6 steps: 1/2, 1, then linear over the remaining 4: 1, 3/4, 1/2, 1/4.
    assert [lr_factor(s, 2, 6, "linear") for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert lr_factor(4, 2, 6, "cosine") == pytest.approx(0.5)  # half-way: (1 + cos(pi/2)) / 2
    assert lr_factor(5, 0, 6, "constant") == 1.0


@pytest.mark.parametrize("grouped", [False, True])
def test_each_epoch_is_a_seeded_permutation(grouped):
    lengths = np.arange(50) % 17 + 3
    for epoch in (0, 1):
        batches = epoch_batches(lengths, 4, seed=3, epoch=epoch, length_grouped=grouped)
        assert sorted(np.concatenate(batches).tolist()) == list(range(50))
        again = epoch_batches(lengths, 4, seed=3, epoch=epoch, length_grouped=grouped)
        assert all(np.array_equal(x, y) for x, y in zip(batches, again))
    e0 = np.concatenate(epoch_batches(lengths, 4, 3, 0, grouped))
    e1 = np.concatenate(epoch_batches(lengths, 4, 3, 1, grouped))
    assert not np.array_equal(e0, e1)
    if grouped:  # one window of 64 batches covers all 50 rows: padding can only shrink
        def padded(bs):
            return sum(len(b) * int(lengths[b].max()) for b in bs)
        assert padded(epoch_batches(lengths, 4, 3, 0, True)) <= padded(epoch_batches(lengths, 4, 3, 0, False))


def test_resume_with_precision_auto_keeps_the_precision_it_resolved_to(dataset, tmp_path, tokenizer_dir,
                                                                        monkeypatch):
    """`auto` measures the machine; a resumed run continues in what the first part resolved to,
    even where the machine would now answer otherwise (a loaded CPU, another CPU kind)."""
    from instructrec.engine import capabilities

    out = tmp_path / "run"
    monkeypatch.setattr(capabilities, "auto_dtype_name", lambda device_type, threads=None: "float32")
    first = train(config(dataset, out, tokenizer_dir, precision="auto", max_steps=4, stop_after=2))
    assert first.precision == "fp32" and first.stopped_early
    monkeypatch.setattr(capabilities, "auto_dtype_name", lambda device_type, threads=None: "bfloat16")
    resumed = train(config(dataset, out, tokenizer_dir, precision="auto", max_steps=4, resume=True))
    assert resumed.precision == "fp32"
    fresh = train(config(dataset, tmp_path / "fresh", tokenizer_dir, precision="auto", max_steps=1))
    assert fresh.precision == "bf16"


def test_report_to_tensorboard_logs_every_step_and_each_templates_validation(dataset, tmp_path, tokenizer_dir):
    """`--report-to tensorboard`: the event files, read back with TensorBoard's own reader, hold
    every step's loss and learning rate and each evaluation's scalars, the per-template ranking
    metrics flattened to valid/<template>/<metric>, equal to metrics.jsonl's records."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(config(dataset, out, tokenizer_dir, max_steps=4, eval_every=2, optimizer="adamw", lr=3e-3,
                 rank_eval=True, report_to="tensorboard"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars: dict[str, dict[int, float]] = {}
    for events in (out / "runs").rglob("events.out.tfevents.*"):
        reader = EventAccumulator(str(events.parent))
        reader.Reload()
        for tag in reader.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in reader.Scalars(tag)})
    train_records = {r["step"]: r for r in records if r["kind"] == "train"}
    assert sorted(scalars["train/loss"]) == sorted(train_records) == [1, 2, 3, 4]
    for step, r in train_records.items():
        assert scalars["train/loss"][step] == pytest.approx(r["loss"], rel=1e-6)
    evaluations = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evaluations] == [2, 4]
    for r in evaluations:
        assert scalars["valid/valid_loss"][r["step"]] == pytest.approx(r["valid_loss"], rel=1e-6)
        assert scalars["valid/hr@1"][r["step"]] == pytest.approx(r["hr@1"])
        for template, summary in r["by_template"].items():
            assert scalars[f"valid/{template}/ndcg@5"][r["step"]] == pytest.approx(summary["ndcg@5"], rel=1e-6)


def test_checkpoints_save_t5s_tied_embeddings_once_without_a_warning(dataset, tmp_path, tokenizer_dir, caplog):
    """T5's encoder and decoder embeddings are its `shared` weight. accelerate dropped the aliases
    while saving and warned at every checkpoint; the checkpoint holds the tensor once, quietly, and
    loads back tied (the resume test above reproduces the loss curve through such a checkpoint)."""
    import logging

    import torch
    from safetensors.torch import load_file
    from transformers import T5ForConditionalGeneration

    with caplog.at_level(logging.WARNING):
        first = train(config(dataset, tmp_path / "run", tokenizer_dir, max_steps=2, stop_after=1))
    assert first.checkpoint.is_dir()
    assert not [r for r in caplog.records if "shared tensor" in r.getMessage()]
    saved = load_file(first.checkpoint / "model.safetensors")
    assert "shared.weight" in saved and "encoder.embed_tokens.weight" not in saved
    assert "decoder.embed_tokens.weight" not in saved and "lm_head.weight" in saved  # untied head kept
    loaded = T5ForConditionalGeneration.from_pretrained(first.checkpoint)
    assert loaded.encoder.embed_tokens.weight.data_ptr() == loaded.shared.weight.data_ptr()
    assert torch.equal(loaded.shared.weight, saved["shared.weight"])


def test_only_names_of_the_very_same_tensor_are_dropped_from_a_checkpoint():
    import torch

    from instructrec.training.tune_state import _without_aliases

    weight, other = torch.randn(4, 3), torch.randn(4, 3)
    state = {"shared.weight": weight, "encoder.embed_tokens.weight": weight, "lm_head.weight": other,
             "first_rows": weight[:2], "transposed": weight.t(), "step": 7}
    kept = _without_aliases(state)
    # The alias goes; other views of the same memory (another shape or stride) stay for
    # accelerate to handle, as do non-tensors.
    assert list(kept) == ["shared.weight", "lm_head.weight", "first_rows", "transposed", "step"]
