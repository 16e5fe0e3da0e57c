"""Score forms ending in "+priors:V": the model's scores fused with each request's
`candidate_priors`, per list, against a hand-computed reference on Hugging Face's own forward."""

from __future__ import annotations

import numpy as np
import pytest

from instructrec.engine import Reranker, Request
from instructrec.engine.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INSTRUCTION = "The user bought Halo 3 and Forza Horizon 4. Recommend what they buy next."
TITLES = ["Tetris", "Mario Kart 8 Deluxe", "Halo: Reach - Xbox 360", "Gran Turismo Sport", "Z"]
# Popularity as log(1 + interactions), as `instructrec eval` fuses it.
PRIORS = list(np.log1p([120.0, 4.0, 33.0, 0.0, 7.0]))


def by_hand_z(values) -> np.ndarray:
    """(x - mean) / population standard deviation, written out."""
    values = np.asarray(values, dtype=np.float64)
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return (values - mean) / std


@pytest.fixture(scope="module")
def tiny(tiny_t5_dir):
    return Reranker.from_pretrained(tiny_t5_dir, dtype="float32")


@pytest.mark.parametrize("weight", [0.7, 3.0])
def test_sum_plus_priors_is_the_standardised_score_plus_v_standardised_priors(tiny, tiny_t5_dir,
                                                                              hf_log_likelihoods, weight):
    given = hf_log_likelihoods(tiny_t5_dir, INSTRUCTION, TITLES)
    expected = by_hand_z(given) + weight * by_hand_z(PRIORS)
    ours = tiny.score(INSTRUCTION, TITLES, normalize=f"sum+priors:{weight}", candidate_priors=PRIORS)
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    [result] = tiny.rank([Request(instruction=INSTRUCTION, candidates=TITLES, candidate_priors=PRIORS,
                                  request_id="r")], normalize=f"sum+priors:{weight}")
    assert result.ranked_ids == [str(i) for i in np.argsort(-expected, kind="stable")]
    np.testing.assert_allclose(result.scores, np.sort(expected)[::-1], atol=1e-4)


def test_calibrated_plus_priors_fuses_the_calibrated_score(tiny, tiny_t5_dir, hf_log_likelihoods):
    given = hf_log_likelihoods(tiny_t5_dir, INSTRUCTION, TITLES)
    title_prior = hf_log_likelihoods(tiny_t5_dir, "", TITLES)
    expected = by_hand_z(given - 0.5 * title_prior) + 2.0 * by_hand_z(PRIORS)
    ours = tiny.score(INSTRUCTION, TITLES, normalize="calibrated:0.5+priors:2", candidate_priors=PRIORS)
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_a_large_weight_ranks_by_the_priors_and_forms_without_it_ignore_them(tiny):
    priors = [0.5, 9.0, -1.0, 3.0, 2.0]
    request = Request(instruction=INSTRUCTION, candidates=TITLES, candidate_priors=priors, request_id="r")
    [fused] = tiny.rank([request], normalize="sum+priors:1000")
    assert fused.ranked_ids == ["1", "3", "4", "0", "2"]
    [plain] = tiny.rank([request], normalize="sum")
    [without] = tiny.rank([Request(instruction=INSTRUCTION, candidates=TITLES, request_id="r")])
    assert plain.ranked_ids == without.ranked_ids and plain.scores == without.scores


def test_a_tournament_fuses_each_group_and_the_top_prior_wins(tiny):
    """25 listed candidates in groups of 10: with a large weight each group's winner is its best
    prior, so the final group ranks the round's winners by prior and the best of all comes first."""
    titles = [f"racing game number {i}" for i in range(25)]
    priors = list(np.random.default_rng(3).permutation(25).astype(float))
    request = Request(instruction="Pick one for a racing fan. Candidates: {candidates}", candidates=titles,
                      candidate_priors=priors, request_id="t")
    [result] = tiny.rank([request], normalize="mean+priors:1000")
    finalists = [int(i) for i in result.ranked_ids[:3]]  # 3 groups in round 1, one winner each
    assert finalists[0] == int(np.argmax(priors))
    assert [priors[i] for i in finalists] == sorted((priors[i] for i in finalists), reverse=True)
    assert sorted(result.ranked_ids, key=int) == [str(i) for i in range(25)]


BAD_PRIORS = [
    ([1.0, 2.0], "candidate_priors: 2 priors for 5 candidates"),
    ([1.0, float("nan"), 0.0, 0.0, 0.0], "candidate_priors[1]: must be finite"),
    ([1.0, 2.0, float("inf"), 0.0, 0.0], "candidate_priors[2]: must be finite"),
    ([1.0, 2.0, 3.0, "4", 0.0], "candidate_priors[3]: must be a number, got str '4'"),
    ([1.0, 2.0, 3.0, 4.0, None], "candidate_priors[4]: must be a number, got NoneType None"),
    ([True, 2.0, 3.0, 4.0, 5.0], "candidate_priors[0]: must be a number, got bool True"),
    ("12345", "candidate_priors: must be a list of numbers"),
    (5.0, "candidate_priors: must be a list of numbers, got float 5.0"),
]


def test_bad_or_missing_priors_fail_their_request_alone_naming_the_field(tiny):
    good = Request(instruction=INSTRUCTION, candidates=TITLES, candidate_priors=PRIORS, request_id="good")
    bad = [Request(instruction=INSTRUCTION, candidates=TITLES, candidate_priors=p, request_id=f"bad{n}")
           for n, (p, _) in enumerate(BAD_PRIORS)]
    missing = Request(instruction=INSTRUCTION, candidates=TITLES, request_id="missing")
    results = tiny.rank([good, *bad, missing], errors="return", normalize="sum+priors:1")
    [alone] = tiny.rank([good], normalize="sum+priors:1")
    assert results[0].error is None and results[0].ranked_ids == alone.ranked_ids
    for result, (_, message) in zip(results[1:-1], BAD_PRIORS):
        assert result.error_kind == "invalid_input" and message in result.error, result.error
        assert result.ranked_ids == [] and result.scores == []
    assert results[-1].error.startswith("candidate_priors: the score form 'sum+priors:1' fuses candidate "
                                        "priors, but this request has none")
    with pytest.raises(InputError, match=r"^candidate_priors\[1\]: must be finite"):
        tiny.score(INSTRUCTION, TITLES, normalize="sum+priors:1", candidate_priors=BAD_PRIORS[1][0])
    with pytest.raises(InputError, match="^candidate_priors: the score form"):
        tiny.score(INSTRUCTION, TITLES, normalize="sum+priors:1")
    # Priors are validated wherever given, even under a form that does not read them: bad input is
    # refused, never silently ignored.
    [refused] = tiny.rank([bad[1]], errors="return")
    assert "candidate_priors[1]: must be finite" in refused.error


@pytest.mark.parametrize("form, message", [
    ("sum+priors:-1", "the candidate prior weight must be finite and >= 0"),
    ("sum+priors:nan", "the candidate prior weight must be finite and >= 0"),
    ("mean+priors:x", "the candidate prior weight 'x' is not a number"),
    ("+priors:1", "unknown score form '+priors:1'"),
    ("sum+priors:1+priors:2", "the candidate prior weight '1+priors:2' is not a number"),
])
def test_a_bad_priors_weight_is_refused_naming_the_field(tiny, form, message):
    with pytest.raises(InputError, match=f"^normalize: .*{message.replace('+', '[+]')}.*calibrated:0.5[+]priors:2"):
        tiny.score(INSTRUCTION, TITLES, normalize=form, candidate_priors=PRIORS)
