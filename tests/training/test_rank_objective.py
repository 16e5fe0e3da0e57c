"""`train --rank-negatives`: the ranking term against Hugging Face's own per-candidate
log-likelihoods, the negative pool's draws (other targets of the same template, uniform over the
distinct ones, reproducible per step), the candidate batch layout, and the trainer end to end."""

from __future__ import annotations

import copy
import json
from collections import Counter

import numpy as np
import pytest
import torch

from instructrec.engine.errors import InputError
from instructrec.engine.presets import shape_config
from instructrec.engine.types import parse_score_form
from instructrec.training.tune import train
from instructrec.training.tune_data import NegativePool, TokenizedRows, collate_negatives
from instructrec.training.loss import token_log_likelihoods
from instructrec.training.tune_model import install_hidden_states_head, ranked_sequence_losses

from ..conftest import write_train_and_valid

# Two templates, eight distinct titles: each shopper's next title follows from the one they bought.
TITLES = ["Halo 3 - Xbox 360", "Mario Kart 8", "Portal 2 - PC", "Tetris Effect", "Stardew Valley",
          "Forza Horizon 4", "Animal Crossing", "Dark Souls III"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("instructions")
    rows = {"instruction": [f"The shopper bought {TITLES[i - 1]}. What do they buy next?" for i in range(8)]
            + [f"Bought {TITLES[i - 2]}; find the next one" for i in range(8)],
            "target": TITLES * 2, "template": ["next"] * 8 + ["search"] * 8}
    return write_train_and_valid(directory, rows)


def config(dataset, out, tokenizer_dir, **overrides):
    """t5-tiny, fp32, one thread, no ranking validation through the engine (no candidate columns)."""
    from instructrec.training.tune import TrainConfig

    base = dict(instructions=dataset, model="random:t5-tiny", tokenizer=tokenizer_dir, out=out, precision="fp32",
                device="cpu", progress=False, batch_size=8, max_steps=2, rank_eval=False, dropout=0.0, threads=1)
    base.update(overrides)
    return TrainConfig(**base)


def tiny_t5(tied: bool, seed: int):
    from transformers import T5Config, T5ForConditionalGeneration

    settings = shape_config("t5-tiny")
    settings.pop("model_type")
    settings.update(vocab_size=300, tie_word_embeddings=tied, dropout_rate=0.0)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(**settings)).double()


def hf_token_log_likelihoods(model, ids, mask, target):
    """Per-token log-likelihoods of one target [1, T] (-100 padded) from Hugging Face's own forward."""
    logits = model(input_ids=ids, attention_mask=mask, labels=target).logits[0]
    keep = target[0] != -100
    return torch.log_softmax(logits[keep], dim=-1).gather(1, target[0, keep][:, None]).squeeze(1)


def random_case(rows: int, negatives: int):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 300, (rows, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    own = torch.randint(2, 300, (rows, 5), generator=gen)
    own[1, 3:] = -100
    others = torch.randint(2, 300, (rows * negatives, 4), generator=gen)
    others[4, 1:] = -100
    return ids, mask, own, others


def hf_candidate_scores(reference, ids, mask, own, others, negatives, prefix_tokens, score_form, empty):
    """[rows, 1 + negatives] scores of each row's own target and negatives, each scored alone by
    Hugging Face's forward, and the own targets' summed NLL. A calibrated form's prior is the
    candidate under the empty instruction, a constant to the gradient."""
    rows = own.shape[0]
    cut = prefix_tokens or None
    want_nll = torch.zeros((), dtype=torch.float64)
    scores = torch.zeros(rows, 1 + negatives, dtype=torch.float64)
    for r in range(rows):
        sequences = [own[r:r + 1]] + [others[r * negatives + k:r * negatives + k + 1] for k in range(negatives)]
        for c, seq in enumerate(sequences):
            token_lp = hf_token_log_likelihoods(reference, ids[r:r + 1], mask[r:r + 1], seq)
            score = token_lp[:cut].sum()
            if score_form.kind == "mean":
                score = score / len(token_lp[:cut])
            elif score_form.kind == "calibrated":
                with torch.no_grad():
                    prior = hf_token_log_likelihoods(reference, empty, torch.ones_like(empty), seq)[:cut].sum()
                score = score - score_form.prior_weight * prior
            scores[r, c] = score
            if c == 0:
                want_nll = want_nll - token_lp.sum()
    return scores, want_nll


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("hidden_states_head", [False, True])
@pytest.mark.parametrize("prefix_tokens", [0, 2])
@pytest.mark.parametrize("form", ["sum", "mean", "calibrated:0.5", "calibrated:-1"])
def test_ranking_losses_match_hugging_face_candidate_scores(tied, hidden_states_head, prefix_tokens, form):
    reference = tiny_t5(tied, seed=3)
    model = copy.deepcopy(reference)
    head = install_hidden_states_head(model) if hidden_states_head else None
    rows, negatives = 3, 3
    ids, mask, own, others = random_case(rows, negatives)
    others[8, 3:] = -100

    empty = torch.tensor([[1]])  # the empty instruction: the tokenizer's "" is its EOS
    score_form = parse_score_form(form)
    nll, rank = ranked_sequence_losses(model, ids, mask, reference._shift_right(own), own,
                                       reference._shift_right(others), others, head=head, prefix_tokens=prefix_tokens,
                                       score_form=score_form, empty_ids=empty)
    (nll + 0.7 * rank).backward()

    # Reference: each candidate scored alone by Hugging Face's forward.
    scores, want_nll = hf_candidate_scores(reference, ids, mask, own, others, negatives, prefix_tokens, score_form,
                                           empty)
    want_rank = (torch.logsumexp(scores, dim=1) - scores[:, 0]).sum()
    (want_nll + 0.7 * want_rank).backward()
    torch.testing.assert_close(nll, want_nll, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rank, want_rank, rtol=1e-10, atol=1e-10)
    # Gradients agree to ~1e-7 of each tensor's largest entry (measured 1.5e-7), not to 1e-10:
    # T5LayerNorm takes its variance in fp32 even in a float64 model, and the encoder's backward
    # sums the candidates' gradients before it (one encoding) where the reference sums them after
    # (one encoding per candidate).
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        want = grads[name].grad
        assert (p.grad - want).abs().max() <= 1e-5 * want.abs().max(), name


@pytest.mark.parametrize("form", ["sum", "calibrated:0.5"])
def test_soft_targets_replace_the_one_hot_target_of_the_ranking_term(form):
    """--rank-distill: the ranking term is the cross-entropy of each row's candidate scores against
    a given distribution (a teacher's), -sum_c p_c log softmax(scores)_c, against Hugging Face."""
    reference = tiny_t5(False, seed=5)
    model = copy.deepcopy(reference)
    rows, negatives = 3, 2
    ids, mask, own, others = random_case(rows, negatives)
    empty = torch.tensor([[1]])
    soft = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8]], dtype=torch.float64)
    nll, rank = ranked_sequence_losses(model, ids, mask, reference._shift_right(own), own,
                                       reference._shift_right(others), others, score_form=parse_score_form(form),
                                       empty_ids=empty, soft_targets=soft)
    rank.backward()
    scores, want_nll = hf_candidate_scores(reference, ids, mask, own, others, negatives, 0, parse_score_form(form),
                                           empty)
    want_rank = -(soft * torch.log_softmax(scores, dim=1)).sum()
    want_rank.backward()
    torch.testing.assert_close(nll, want_nll, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rank, want_rank, rtol=1e-10, atol=1e-10)
    # not the one-hot term in disguise: the soft rows move it
    assert float(want_rank) != pytest.approx(float((torch.logsumexp(scores, 1) - scores[:, 0]).sum()))
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        want = grads[name].grad
        assert (p.grad - want).abs().max() <= 1e-5 * want.abs().max(), name


def test_teacher_targets_are_the_softmax_at_the_temperature_or_the_one_hot_target():
    from instructrec.training.tune_data import teacher_targets

    teacher = np.array([[0.0, np.log(3.0)], [2.0, np.nan], [np.log(2.0), 0.0]])
    np.testing.assert_allclose(teacher_targets(teacher, 1.0), [[0.25, 0.75], [1.0, 0.0], [2 / 3, 1 / 3]])
    # temperature 2 halves the logits: exp(log 3 / 2) = sqrt 3
    np.testing.assert_allclose(teacher_targets(teacher[:1], 2.0), [[1 / (1 + 3 ** 0.5), 3 ** 0.5 / (1 + 3 ** 0.5)]])
    big = np.array([[1000.0, 999.0]])  # no overflow
    np.testing.assert_allclose(teacher_targets(big, 1.0), [[1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1))]])
    # share 0.5: half the teacher's softmax, half the one-hot target; a row with an unknown logit stays one-hot
    np.testing.assert_allclose(teacher_targets(teacher, 1.0, share=0.5),
                               [[0.625, 0.375], [1.0, 0.0], [5 / 6, 1 / 6]])


def test_chunked_token_log_likelihoods_equal_the_whole_log_softmax():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(23, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (23,), generator=gen)
    coefficients = torch.randn(23, generator=gen, dtype=torch.float64)
    got = token_log_likelihoods(hidden, weight, targets, chunk_rows=4)
    (got * coefficients).sum().backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None]).squeeze(1)
    (want * coefficients).sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_hidden, hidden.grad)
    torch.testing.assert_close(g_weight, weight.grad)


# --------------------------------------------------------------------------- the negative pool

TEMPLATES = ["seq"] * 8 + ["search"] * 4 + ["yes-no"] * 3
TARGETS = (["A", "A", "A", "A", "B", "C", "D", "A"]  # "A" is four times as frequent as the others
           + ["A", "E", "F", "E"] + ["yes", "yes", "yes"])


def test_negatives_are_other_distinct_targets_of_the_same_template_drawn_uniformly():
    pool = NegativePool(TEMPLATES, TARGETS)
    assert {t: pool.distinct_targets(t) for t in ("seq", "search", "yes-no")} == {"seq": 4, "search": 3, "yes-no": 1}
    drawn: dict[int, Counter] = {row: Counter() for row in range(12)}
    for step in range(1, 401):
        negatives = pool.draw(np.arange(12), 2, seed=0, step=step)
        for row, picks in enumerate(negatives):
            assert all(TEMPLATES[j] == TEMPLATES[row] for j in picks)
            assert all(TARGETS[j] != TARGETS[row] for j in picks)
            drawn[row].update(TARGETS[j] for j in picks)
    # Row 4 (target "B") sees A, C and D: uniform over the distinct targets, not 4:1:1 as the rows are.
    counts = drawn[4]
    assert set(counts) == {"A", "C", "D"}
    assert max(counts.values()) / min(counts.values()) < 1.25
    assert set(drawn[0]) == {"B", "C", "D"}


def test_draws_are_a_function_of_seed_and_step_and_a_lone_target_ranks_against_itself():
    pool = NegativePool(TEMPLATES, TARGETS)
    rows = np.arange(15)
    np.testing.assert_array_equal(pool.draw(rows, 3, seed=5, step=7), pool.draw(rows, 3, seed=5, step=7))
    assert not np.array_equal(pool.draw(rows, 3, seed=5, step=7), pool.draw(rows, 3, seed=5, step=8))
    # "search" has 2 other distinct targets for 3 draws: with replacement, still never its own.
    search = pool.draw(np.array([9]), 3, seed=0, step=1)[0]
    assert all(TARGETS[j] in ("A", "F") for j in search)
    # "yes-no" has no other target: the row itself, a term with zero gradient.
    np.testing.assert_array_equal(pool.draw(np.array([13]), 2, seed=0, step=1), [[13, 13]])


@pytest.mark.parametrize("prefix_tokens", [0, 2])
def test_negative_batches_hold_each_rows_negatives_in_order_padded_on_their_own(prefix_tokens):
    targets = [np.array([10, 1]), np.array([11, 12, 13, 1]), np.array([14, 15, 1])]
    rows = TokenizedRows(np.zeros(6, dtype=np.int32), np.array([0, 2, 4, 6]),
                         np.concatenate(targets), np.array([0, 2, 6, 9]))
    decoder_ids, labels = collate_negatives(rows, np.array([[2, 1], [0, 2]]), 0, 0, "cpu", prefix_tokens)
    if prefix_tokens:
        assert labels.tolist() == [[14, 15], [11, 12], [10, 1], [14, 15]]
        assert decoder_ids.tolist() == [[0, 14], [0, 11], [0, 10], [0, 14]]
    else:
        assert labels.tolist() == [[14, 15, 1, -100], [11, 12, 13, 1], [10, 1, -100, -100], [14, 15, 1, -100]]
        assert decoder_ids.tolist() == [[0, 14, 15, 1], [0, 11, 12, 13], [0, 10, 1, 0], [0, 14, 15, 1]]


# --------------------------------------------------------------------------- the trainer


@pytest.mark.parametrize("rank_score", ["sum", "calibrated:0.5"])
def test_trainer_logs_the_ranking_term_and_keeps_the_loss_the_nll(dataset, tmp_path, tokenizer_dir, rank_score):
    plain = train(config(dataset, tmp_path / "plain", tokenizer_dir, max_steps=2))
    ranked = train(config(dataset, tmp_path / "ranked", tokenizer_dir, max_steps=2, rank_negatives=3,
                          rank_score=rank_score))
    # Same initialisation and batch: step 1's reported loss (the NLL before any update) agrees.
    assert ranked.step_losses[1] == pytest.approx(plain.step_losses[1], rel=1e-5)
    records = [json.loads(line) for line in (tmp_path / "ranked" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    # A cross-entropy over 4 candidates: positive, finite (the candidates' lengths differ, so at
    # random initialisation the summed scores differ by whole tokens' worth of nats).
    assert all(0 < r["rank_loss"] < 1e3 for r in train_records) and len(train_records) == 2
    assert all("rank_loss" not in r for r in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()
               if '"train"' in r)


def test_ranking_term_trains_the_targets_to_the_top(dataset, tmp_path, tokenizer_dir, hf_log_likelihoods):
    out = tmp_path / "run"
    train(config(dataset, out, tokenizer_dir, max_steps=40, optimizer="adamw", lr=3e-3, schedule="constant",
                 rank_negatives=4))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rank_losses = [r["rank_loss"] for r in records if r["kind"] == "train"]
    assert rank_losses[-1] < rank_losses[0] / 10
    # Independently, from the saved model with plain HF forwards: every row's target scores first
    # among all eight titles.
    import pyarrow.parquet as pq

    table = pq.read_table(dataset / "train.parquet").to_pylist()
    for row in table:
        scores = hf_log_likelihoods(out, row["instruction"], TITLES)
        assert TITLES[int(np.argmax(scores))] == row["target"], row["instruction"]


@pytest.mark.parametrize("changed, field", [(dict(rank_negatives=3), "rank_negatives"),
                                            (dict(rank_negatives=2, rank_score="calibrated:0.5"), "rank_score")])
def test_resume_refuses_another_ranking_setting(dataset, tmp_path, tokenizer_dir, changed, field):
    out = tmp_path / "run"
    train(config(dataset, out, tokenizer_dir, max_steps=4, stop_after=2, rank_negatives=2))
    with pytest.raises(InputError, match=field):
        train(config(dataset, out, tokenizer_dir, max_steps=4, resume=True, **changed))


@pytest.mark.parametrize("overrides, field", [
    (dict(rank_negatives=-1), "rank_negatives"),
    (dict(rank_negatives=2, rank_weight=0.0), "rank_weight"),
    (dict(rank_negatives=2, rank_weight=float("inf")), "rank_weight"),
    (dict(rank_negatives=2, rank_prefix_tokens=-1), "rank_prefix_tokens"),
    (dict(rank_negatives=2, rank_score="calibrated:x"), "rank_score"),
    (dict(rank_negatives=2, rank_score="median"), "rank_score"),
    (dict(rank_score="calibrated"), "rank_score"),
])
def test_bad_ranking_settings_fail_before_training(dataset, tmp_path, tokenizer_dir, overrides, field):
    with pytest.raises(InputError) as excinfo:
        train(config(dataset, tmp_path / "run", tokenizer_dir, **overrides))
    assert excinfo.value.field == field
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("prefix", [0, 1])
def test_model_flops_count_each_negative_decoded(dataset, tmp_path, tokenizer_dir, prefix):
    """One epoch of 16 rows in two steps: with K negatives cut to one token (prefix 1), each row
    adds K one-token decodings and heads over its own encoding, whatever negatives were drawn;
    whole negatives add at least that."""
    from transformers import AutoTokenizer

    from instructrec.engine.flops import T5Shape, encoding_flops

    plain = train(config(dataset, tmp_path / "plain", tokenizer_dir, max_steps=2))
    ranked = train(config(dataset, tmp_path / "ranked", tokenizer_dir, max_steps=2, rank_negatives=3,
                          rank_prefix_tokens=prefix))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    import pyarrow.parquet as pq

    sources = [len(tokenizer(text).input_ids) for text in pq.read_table(dataset / "train.parquet")["instruction"].to_pylist()]
    shape = T5Shape.from_config(shape_config("t5-tiny"))
    one_token = sum(encoding_flops(shape, s, [1]).decoder + encoding_flops(shape, s, [1]).head for s in sources)
    extra = ranked.model_flops - plain.model_flops
    assert plain.model_flops > 0
    if prefix:
        assert extra == pytest.approx(3 * 3 * one_token, rel=1e-12)
    else:
        assert extra > 3 * 3 * one_token
