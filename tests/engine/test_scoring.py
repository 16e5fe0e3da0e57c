"""Reranker.score / rank against an independent reference: Hugging Face T5ForConditionalGeneration
run per (instruction, candidate) pair with labels, its logits log-softmaxed and gathered at the
title's target tokens (closing </s> included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instructrec.engine import Reranker, Request
from instructrec.engine.errors import InputError


# Model tests run on one torch thread (see the one_torch_thread fixture in conftest).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


INSTRUCTION = ("The user bought, oldest to newest: The Legend of Zelda: Breath of the Wild; Mario Kart 8 "
               "Deluxe; Halo 3 - Xbox 360; Logitech G502 Gaming Mouse. Recommend what they buy next.")
TITLES = [
    "Tetris",
    "Forza Horizon 4 - Standard Edition - Xbox One",
    "Ünïcødé Édition: 東方 ゲーム 游戏 — Ωmega «Special» ✓",
    "Nintendo Switch Pro Controller with a very long descriptive title that keeps going on and on "
    "about features, colours, compatible consoles, cable length and what is in the box",
    "Z",
]


def hf_reference(hf, tokenizer, instruction: str, titles: list[str]) -> np.ndarray:
    src = tokenizer(instruction, return_tensors="pt")
    out = []
    with torch.no_grad():
        for title in titles:
            labels = tokenizer(text_target=title, return_tensors="pt").input_ids  # [1, n], </s> included
            logits = hf(**src, labels=labels).logits[0]  # [n, V]
            out.append(torch.log_softmax(logits.double(), -1).gather(1, labels[0][:, None]).sum().item())
    return np.array(out)


@pytest.fixture(scope="module")
def hf_small(small_t5_dir):
    from transformers import T5ForConditionalGeneration

    # Run in fp64: an exact reference, so the tolerance below measures our fp32 error alone.
    return T5ForConditionalGeneration.from_pretrained(small_t5_dir).eval().double()


@pytest.fixture(scope="module")
def small(small_t5_dir):
    return Reranker.from_pretrained(small_t5_dir, dtype="float32")


def _build_tied(tmp_path_factory, tokenizer_dir):
    import torch as _torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    _torch.manual_seed(7)
    shape = dict(d_model=512, d_ff=1024, d_kv=64, num_layers=8, num_decoder_layers=8, num_heads=6,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=True, vocab_size=32128)
    out = tmp_path_factory.mktemp("small-tied")
    model = T5ForConditionalGeneration(T5Config(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **shape))
    model.eval().save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


# fp32 tolerance. The untied random head (std 1) gives logits of std ~22 and log-probs around
# -100 per token, so title scores reach -2,500; there fp32 cannot resolve 1e-4 (its step at 2,048
# is 1.2e-4): Hugging Face's own fp32 forward is 3.4e-4 (1.4e-7 relative) off its fp64 forward on
# the unicode title's -2,481. Hence atol 1e-4 plus rtol 3e-7 against the fp64 reference. The
# tied model's realistic scores (a few units per token) meet 1e-4 absolute alone.
FP32 = dict(rtol=3e-7, atol=1e-4)


def test_scores_match_hugging_face_per_pair(small, hf_small, tokenizer):
    ours = small.score(INSTRUCTION, TITLES)
    ref = hf_reference(hf_small, tokenizer, INSTRUCTION, TITLES)
    assert ours.dtype == np.float64 and ours.shape == (len(TITLES),)
    np.testing.assert_allclose(ours, ref, **FP32)


def test_realistic_scores_match_within_1e4_absolute(tmp_path_factory, tokenizer_dir, tokenizer):
    from transformers import T5ForConditionalGeneration

    path = _build_tied(tmp_path_factory, tokenizer_dir)
    ours = Reranker.from_pretrained(path, dtype="float32").score(INSTRUCTION, TITLES)
    ref = hf_reference(T5ForConditionalGeneration.from_pretrained(path).eval(), tokenizer, INSTRUCTION, TITLES)
    assert np.abs(ref).max() < 500  # realistic magnitudes, so the bound below is not vacuous
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_one_candidate_and_mean(small, hf_small, tokenizer):
    title = TITLES[1]
    ref = hf_reference(hf_small, tokenizer, INSTRUCTION, [title])
    np.testing.assert_allclose(small.score(INSTRUCTION, [title]), ref, **FP32)
    n = len(tokenizer(text_target=title).input_ids)
    np.testing.assert_allclose(small.score(INSTRUCTION, [title], normalize="mean"), ref / n, rtol=1.2e-7,
                               atol=1e-4 / n)


def test_calibrated_is_the_title_log_likelihood_minus_its_prior(small, hf_small, tokenizer):
    """log P(title | instruction) - log P(title | empty instruction), both from Hugging Face's own
    forward; rank gives the same scores, and a title's prior is scored once per engine."""
    given = hf_reference(hf_small, tokenizer, INSTRUCTION, TITLES)
    prior = hf_reference(hf_small, tokenizer, "", TITLES)
    ref = given - prior
    # A difference of two fp32 sums: each term's FP32 error, relative to that term's magnitude.
    tolerance = 2 * FP32["atol"] + FP32["rtol"] * (np.abs(given) + np.abs(prior))
    ours = small.score(INSTRUCTION, TITLES, normalize="calibrated")
    assert np.all(np.abs(ours - ref) <= tolerance), (ours - ref, tolerance)
    assert not np.allclose(ours, small.score(INSTRUCTION, TITLES))  # the prior moved every score
    small.reset_stats()
    [result] = small.rank([Request(instruction=INSTRUCTION, candidates=TITLES, request_id="r")],
                          normalize="calibrated")
    by_title = dict(zip(result.ranked_ids, result.scores))
    assert np.all(np.abs(np.array([by_title[str(i)] for i in range(len(TITLES))]) - ref) <= tolerance)
    assert small.stats.encoder_passes == 1  # the priors were cached by score() above


@pytest.mark.parametrize("weight", [0.5, -0.5])
def test_calibrated_with_a_weight_subtracts_that_multiple_of_the_prior(small, hf_small, tokenizer, weight):
    """normalize="calibrated:W" = log P(title | instruction) - W log P(title | ""), from Hugging Face's
    forward; a negative W adds the prior."""
    given = hf_reference(hf_small, tokenizer, INSTRUCTION, TITLES)
    prior = hf_reference(hf_small, tokenizer, "", TITLES)
    tolerance = 2 * FP32["atol"] + FP32["rtol"] * (np.abs(given) + abs(weight) * np.abs(prior))
    ours = small.score(INSTRUCTION, TITLES, normalize=f"calibrated:{weight}")
    assert np.all(np.abs(ours - (given - weight * prior)) <= tolerance), (ours - given + weight * prior, tolerance)
    [result] = small.rank([Request(instruction=INSTRUCTION, candidates=TITLES, request_id="r")],
                          normalize=f"calibrated:{weight}")
    by_title = dict(zip(result.ranked_ids, result.scores))
    np.testing.assert_array_equal([by_title[str(i)] for i in range(len(TITLES))], ours)


@pytest.mark.parametrize("form", ["pmi", "mean:1", "calibrated:", "calibrated:x", "calibrated:nan", "sum:0"])
def test_an_unknown_score_form_names_the_field(small, form):
    with pytest.raises(InputError, match="^normalize: .*use sum, mean, calibrated, or calibrated:W"):
        small.score(INSTRUCTION, TITLES, normalize=form)


def test_title_prior_cache_keeps_the_most_recently_used_titles(small, small_t5_dir):
    """A capped cache scores the same as an uncapped one; it holds every title of the call in
    progress, then drops the least recently used down to its cap, and a dropped title is scored
    again when it comes back (EngineStats.title_priors counts prior scorings)."""
    capped = Reranker.from_pretrained(small_t5_dir, dtype="float32", title_prior_cache=2)
    expected = small.score(INSTRUCTION, TITLES, normalize="calibrated")

    # Batches of other shapes round differently (~1e-4 here); a wrong prior is off by whole nats.
    close = dict(rtol=0, atol=1e-3)

    def calibrated(indices):
        return capped.score(INSTRUCTION, [TITLES[i] for i in indices], normalize="calibrated")

    np.testing.assert_allclose(calibrated(range(5)), expected, **close)
    assert capped.stats.title_priors == 5 and len(capped._title_priors) == 5  # one call's titles all stay
    np.testing.assert_allclose(calibrated([0, 1]), expected[[0, 1]], **close)
    assert capped.stats.title_priors == 5 and len(capped._title_priors) == 2  # hits; trimmed to the cap
    np.testing.assert_allclose(calibrated([2]), expected[[2]], **close)
    assert capped.stats.title_priors == 6  # title 2 was dropped in the last call
    np.testing.assert_allclose(calibrated([1]), expected[[1]], **close)
    assert capped.stats.title_priors == 6  # title 1, used more recently than 0, stayed
    np.testing.assert_allclose(calibrated([0]), expected[[0]], **close)
    assert capped.stats.title_priors == 7  # title 0 went first
    with pytest.raises(InputError, match="title_prior_cache"):
        Reranker.from_pretrained(small_t5_dir, dtype="float32", title_prior_cache=0)


@pytest.fixture(scope="module")
def tiny(tiny_t5_dir):
    return Reranker.from_pretrained(tiny_t5_dir, dtype="float32")


def test_thousand_candidates(tiny, tiny_t5_dir, tokenizer):
    """1,000 candidates under one encoding (tiny shape: the 32128-wide head of flan-t5-small over
    ~7,000 tokens takes a minute on a loaded 2-core box); reference on a seeded sample of 25."""
    from transformers import T5ForConditionalGeneration

    rng = np.random.default_rng(0)
    words = ["Super", "Mario", "Racing", "Edition", "Xbox", "One", "Deluxe", "Pack", "Héros", "ゲーム",
             "Controller", "2", "Battle", "Royale"]
    titles = [" ".join(rng.choice(words, size=rng.integers(1, 6))) + f" {i}" for i in range(1000)]
    tiny.reset_stats()
    ours = tiny.score("Pick a game for a racing fan.", titles)
    assert tiny.stats.encoder_passes == 1 and tiny.stats.candidates == 1000
    assert tiny.stats.decoder_tokens == sum(len(tokenizer(text_target=t).input_ids) for t in titles)
    sample = rng.choice(1000, size=25, replace=False)
    hf = T5ForConditionalGeneration.from_pretrained(tiny_t5_dir).eval().double()
    ref = hf_reference(hf, tokenizer, "Pick a game for a racing fan.", [titles[i] for i in sample])
    np.testing.assert_allclose(ours[sample], ref, **FP32)


def test_many_requests_batched_equal_one_at_a_time(small):
    rng = np.random.default_rng(1)
    requests = []
    for r in range(7):
        titles = [TITLES[int(i)] + f" v{r}" for i in rng.integers(0, len(TITLES), size=int(rng.integers(1, 9)))]
        titles = list(dict.fromkeys(titles))
        requests.append(Request(instruction=INSTRUCTION[: 40 + 30 * r], candidates=titles, request_id=f"r{r}"))
    small.reset_stats()
    batched = small.rank(requests)
    assert small.stats.encoder_passes == len(requests)
    assert small.stats.padded_decoder_tokens >= small.stats.decoder_tokens
    for req, res in zip(requests, batched):
        alone = small.score(req.instruction, list(req.candidates))
        assert res.request_id == req.request_id and res.n_candidates == len(req.candidates)
        assert sorted(res.ranked_ids, key=int) == [str(c) for c in range(len(alone))]
        assert res.scores == sorted(res.scores, reverse=True)
        # Same function; only fp32 rounding differs (padding changes the matmul blocking).
        np.testing.assert_allclose([res.scores[res.ranked_ids.index(str(c))] for c in range(len(alone))],
                                   alone, **FP32)


def test_bf16_close_to_fp32_with_top1_agreement(small_t5_dir, small):
    bf16 = Reranker.from_pretrained(small_t5_dir, dtype="bfloat16")
    rng = np.random.default_rng(2)
    agree = 0
    for r in range(6):
        titles = [TITLES[i % len(TITLES)] + f" #{r}-{i}" for i in rng.permutation(10)]
        a, b = small.score(INSTRUCTION, titles), bf16.score(INSTRUCTION, titles)
        # bf16 weights and activations (8 mantissa bits, relative step 0.4%) through 8+8 layers: on
        # these random-weight scores (hundreds to thousands) the error stays within 2% relative.
        np.testing.assert_allclose(b, a, rtol=0.02)
        agree += int(np.argmax(a) == np.argmax(b))
    assert agree >= 5  # top-1 agreement on at least 5 of 6 requests


def test_packed_rows_equal_one_candidate_per_row(tiny_t5_dir, tiny):
    """Block-diagonal mask + restarting positions: a row of many candidates scores each exactly as
    a row holding that candidate alone (row_tokens=1 puts every candidate in its own row)."""
    titles = [TITLES[i % len(TITLES)] + f" {i}" for i in range(40)]
    one_per_row = Reranker.from_pretrained(tiny_t5_dir, dtype="float32", row_tokens=1)
    tiny.reset_stats()
    packed = tiny.score(INSTRUCTION, titles)
    alone = one_per_row.score(INSTRUCTION, titles)
    assert tiny.stats.padded_decoder_tokens < one_per_row.stats.padded_decoder_tokens
    np.testing.assert_allclose(packed, alone, rtol=1e-6, atol=1e-5)


def test_rank_forms_equal_rank_per_form_with_one_scoring_pass(small):
    """Reranker.rank_forms against rank() run once per form: the same results, for requests scored
    directly, a listed one large enough for a tournament and a refused one; the direct requests
    are encoded once for all forms."""
    forms = ["sum", "mean", "calibrated", "calibrated:0.5"]
    direct = [Request(instruction=INSTRUCTION[: 60 + 40 * r], candidates=TITLES[r:], request_id=f"d{r}")
              for r in range(3)]
    listed = Request(instruction="Pick the next game among: {candidates}",
                     candidates=[f"Game number {i}" for i in range(13)], request_id="t")
    refused = Request(instruction=INSTRUCTION, candidates=[], request_id="bad")
    requests = [direct[0], listed, refused, direct[1], direct[2]]

    small.clear_title_priors()
    small.reset_stats()
    together = small.rank_forms(direct, forms)
    shared_passes = small.stats.encoder_passes
    small.clear_title_priors()
    small.reset_stats()
    small.rank(direct, normalize="calibrated")
    assert shared_passes == small.stats.encoder_passes  # one pass per request (+ the priors) for four forms

    together = small.rank_forms(requests, forms, errors="return")
    assert list(together) == forms
    for form in forms:
        alone = small.rank(requests, errors="return", normalize=form)
        for got, want in zip(together[form], alone, strict=True):
            assert (got.request_id, got.ranked_ids, got.error, got.error_kind, got.n_candidates) == \
                   (want.request_id, want.ranked_ids, want.error, want.error_kind, want.n_candidates)
            np.testing.assert_allclose(got.scores, want.scores, **FP32)
    assert together["sum"][2].error_kind == "invalid_input" and "candidates" in together["sum"][2].error
    # The forms really differ: mean divides each sum by the title's token count.
    assert together["mean"][0].ranked_ids != together["sum"][0].ranked_ids or \
        not np.allclose(together["mean"][0].scores, together["sum"][0].scores)
    with pytest.raises(InputError, match="^candidates"):
        small.rank_forms(requests, forms)


@pytest.mark.parametrize("forms", [[], ["sum", "sum"], "sum", ["sum", "pmi"]])
def test_rank_forms_refuses_bad_forms(small, forms):
    with pytest.raises(InputError, match="^forms"):
        small.rank_forms([Request(instruction=INSTRUCTION, candidates=TITLES)], forms)


def test_rank_forms_score_a_tournament_round_the_forms_share_once(small):
    """Every form's tournament of a request starts from the same seeded round 1, so rank_forms
    encodes its groups once, not once per form; the results stay those of rank() per form."""
    listed = Request(instruction="Pick the next game among: {candidates}",
                     candidates=[f"Game number {i}" for i in range(3 * small.group_size + 1)], request_id="t")
    forms = ["sum", "mean"]
    first_round = -(-len(listed.candidates) // small.group_size)
    small.reset_stats()
    alone = {f: small.rank([listed], normalize=f)[0] for f in forms}
    passes_alone = small.stats.encoder_passes
    small.reset_stats()
    together = small.rank_forms([listed], forms)
    # Round 1 once instead of twice; a later round once per form, or once where both forms
    # advanced the same titles.
    assert first_round < small.stats.encoder_passes <= passes_alone - first_round
    for f in forms:
        assert together[f][0].ranked_ids == alone[f].ranked_ids
        np.testing.assert_allclose(together[f][0].scores, alone[f].scores, **FP32)
