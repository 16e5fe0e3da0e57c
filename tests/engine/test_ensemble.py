"""An ensemble Reranker (several models, one tokenizer) against an independent reference: each
model's Hugging Face log-likelihoods (conftest's hf_log_likelihoods), normalized, standardised by
hand within the list and summed."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from instructrec.engine import Reranker, Request
from instructrec.engine.errors import InputError

from ..conftest import TINY_T5, build_t5_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INSTRUCTION = "The user bought Halo 3 and Forza Motorsport. Recommend what they buy next."
TITLES = ["Tetris", "Gears of War 2", "Mario Kart 8 Deluxe", "Logitech G502 Gaming Mouse", "Z"]


@pytest.fixture(scope="module")
def second_t5_dir(tmp_path_factory, tokenizer_dir):
    """The tiny shape again with other random weights: a second seed of one recipe."""
    return build_t5_checkpoint(tmp_path_factory.mktemp("tiny-t5-seed-1"), tokenizer_dir, TINY_T5, seed=1)


def by_hand(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / np.sqrt(((values - values.mean()) ** 2).mean())


def reference(model_dirs, hf_log_likelihoods, form: str, titles=TITLES) -> np.ndarray:
    total = np.zeros(len(titles))
    for model_dir in model_dirs:
        scores = hf_log_likelihoods(model_dir, INSTRUCTION, titles).astype(np.float64)
        if form == "mean":
            lengths = [len(x) for x in AutoTokenizer.from_pretrained(model_dir)(text_target=titles).input_ids]
            scores = scores / np.array(lengths)
        elif form.startswith("calibrated"):
            weight = float(form.split(":")[1]) if ":" in form else 1.0
            scores = scores - weight * hf_log_likelihoods(model_dir, "", titles)
        total += by_hand(scores)
    return total


@pytest.mark.parametrize("form", ["sum", "mean", "calibrated", "calibrated:0.5"])
def test_scores_are_each_models_standardised_and_summed(tiny_t5_dir, second_t5_dir, hf_log_likelihoods, form):
    ensemble = Reranker.from_pretrained([tiny_t5_dir, second_t5_dir], dtype="float32")
    got = ensemble.score(INSTRUCTION, TITLES, normalize=form)
    assert got == pytest.approx(reference([tiny_t5_dir, second_t5_dir], hf_log_likelihoods, form), abs=2e-4)
    # Each model alone ranks otherwise (the seeds disagree), so the sum is not one model's order.
    alone = [by_hand(Reranker.from_pretrained(d, dtype="float32").score(INSTRUCTION, TITLES, normalize=form))
             for d in (tiny_t5_dir, second_t5_dir)]
    assert not np.allclose(got, 2 * alone[0], atol=1e-3) and not np.allclose(got, 2 * alone[1], atol=1e-3)
    assert [s.describe() for s in ensemble.sources] == [Reranker.from_pretrained(d).source.describe()
                                                        for d in (tiny_t5_dir, second_t5_dir)]


def test_one_model_in_a_list_scores_as_that_model(tiny_t5_dir):
    single = Reranker.from_pretrained(tiny_t5_dir, dtype="float32")
    listed = Reranker.from_pretrained([tiny_t5_dir], dtype="float32")
    assert len(listed.backends) == 1
    assert listed.score(INSTRUCTION, TITLES) == pytest.approx(single.score(INSTRUCTION, TITLES), abs=0)


def test_candidate_priors_fuse_the_ensembles_sum(tiny_t5_dir, second_t5_dir, hf_log_likelihoods):
    priors = [3.0, 0.0, 1.0, 7.0, 2.0]
    ensemble = Reranker.from_pretrained([tiny_t5_dir, second_t5_dir], dtype="float32")
    got = ensemble.score(INSTRUCTION, TITLES, normalize="calibrated+priors:0.5", candidate_priors=priors)
    summed = reference([tiny_t5_dir, second_t5_dir], hf_log_likelihoods, "calibrated")
    assert got == pytest.approx(by_hand(summed) + 0.5 * by_hand(np.array(priors)), abs=5e-4)


def test_rank_and_tournament_groups_use_the_ensembles_scores(tiny_t5_dir, second_t5_dir, hf_log_likelihoods):
    ensemble = Reranker.from_pretrained([tiny_t5_dir, second_t5_dir], dtype="float32", group_size=3)
    # Unlisted: scored directly, one list of five.
    direct = ensemble.rank([Request(instruction=INSTRUCTION, candidates=TITLES)], normalize="sum")[0]
    expected = reference([tiny_t5_dir, second_t5_dir], hf_log_likelihoods, "sum")
    assert direct.ranked_ids == [str(c) for c in np.argsort(-expected, kind="stable")]
    # A listing template with more candidates than a group: a tournament whose every group is
    # standardised on its own. The same model twice keeps every group's order (its scores doubled
    # and standardised), so the same titles advance and the same one wins; the losers of a round,
    # ordered across groups by score, may then order otherwise, as with fused priors.
    listed = Request(history=["Halo 3", "Forza Motorsport"], template="seq-rec-02", candidates=TITLES * 2,
                     candidate_ids=[f"{t}-{n}" for n in range(2) for t in TITLES])
    twice = Reranker.from_pretrained([tiny_t5_dir, tiny_t5_dir], dtype="float32", group_size=3).rank([listed])[0]
    alone = Reranker.from_pretrained(tiny_t5_dir, dtype="float32", group_size=3).rank([listed])[0]
    assert twice.error is None and twice.ranked_ids[0] == alone.ranked_ids[0]
    assert sorted(twice.ranked_ids) == sorted(alone.ranked_ids) and twice.scores[0] > 0


def test_stats_count_every_models_passes(tiny_t5_dir, second_t5_dir):
    single = Reranker.from_pretrained(tiny_t5_dir, dtype="float32")
    ensemble = Reranker.from_pretrained([tiny_t5_dir, second_t5_dir], dtype="float32")
    for reranker in (single, ensemble):
        reranker.rank([Request(instruction=INSTRUCTION, candidates=TITLES)] * 3)
    assert ensemble.stats.encoder_passes == 2 * single.stats.encoder_passes
    assert ensemble.stats.decoder_tokens == 2 * single.stats.decoder_tokens
    assert ensemble.stats.requests == single.stats.requests == 3


def test_models_with_other_vocabularies_are_refused(tiny_t5_dir, tmp_path):
    other = tmp_path / "other-vocabulary"
    build_t5_checkpoint(other, tiny_t5_dir, TINY_T5, seed=2)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<a-new-piece>"])
    tok.save_pretrained(other)
    with pytest.raises(InputError, match=r"model\[1\].*another vocabulary"):
        Reranker.from_pretrained([tiny_t5_dir, other])


def test_empty_list_and_one_revision_for_several_are_refused(tiny_t5_dir):
    with pytest.raises(InputError, match="empty list"):
        Reranker.from_pretrained([])
    with pytest.raises(InputError, match="one revision given for 2 models"):
        Reranker.from_pretrained([tiny_t5_dir, tiny_t5_dir], revision="main")


def test_a_capped_title_prior_cache_keeps_every_models_priors_in_step(tiny_t5_dir, second_t5_dir,
                                                                      hf_log_likelihoods):
    """Two calls over a cache of two titles: the second evicts the first call's titles from every
    model's priors at once, and both calls still score as the reference."""
    ensemble = Reranker.from_pretrained([tiny_t5_dir, second_t5_dir], dtype="float32", title_prior_cache=2)
    for titles in (TITLES[:3], TITLES[2:]):
        expected = reference([tiny_t5_dir, second_t5_dir], hf_log_likelihoods, "calibrated", titles)
        assert ensemble.score(INSTRUCTION, titles, normalize="calibrated") == pytest.approx(expected, abs=2e-4)
    assert len(ensemble._title_priors) == 3 and ensemble.stats.title_priors == 5
    assert [set(other) for other in ensemble._ensemble_title_priors] == [set(ensemble._title_priors)]
