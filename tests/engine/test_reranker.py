"""Reranker boundary: typed input errors (raised, or returned per request without disturbing the
others), loading failures naming the file, dtype/backend choices, stats."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from instructrec.engine import (
    BudgetExceededError, EngineStats, InputError, ModelLoadError, RankedResult, Reranker, Request,
)
from instructrec.engine.capabilities import auto_dtype_name
from instructrec.engine.sources import ModelSourceError


# Model tests run on one torch thread (see the one_torch_thread fixture in conftest).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rr(tiny_t5_dir):
    return Reranker.from_pretrained(tiny_t5_dir, dtype="float32", max_source_tokens=64)


@pytest.mark.parametrize("candidates, field, match", [
    ([], "candidates", "empty candidate list"),
    (["Tetris", ""], "candidates[1]", "empty title"),
    (["Tetris", None], "candidates[1]", "null or empty"),
    (["Tetris", "   "], "candidates[1]", "empty title"),
    (["Tetris", "\u200b"], "candidates[1]", "tokenizes to nothing"),
    ("Tetris", "candidates", "list of titles"),
])
def test_bad_candidates_raise_typed_errors(rr, candidates, field, match):
    with pytest.raises(InputError, match=match) as e:
        rr.score("Recommend a game.", candidates)
    assert e.value.field == field and e.value.kind == "invalid_input"


def test_bad_ids_and_normalize(rr):
    with pytest.raises(InputError, match="duplicate id 'a'"):
        rr.rank([Request(instruction="x", candidates=["A", "B"], candidate_ids=["a", "a"])])
    with pytest.raises(InputError, match="1 ids for 2 candidates"):
        rr.rank([Request(instruction="x", candidates=["A", "B"], candidate_ids=["a"])])
    with pytest.raises(InputError, match="normalize"):
        rr.score("x", ["A"], normalize="max")
    with pytest.raises(InputError, match="errors"):
        rr.rank([], errors="ignore")


def test_instruction_over_budget(rr):
    with pytest.raises(BudgetExceededError) as e:
        rr.score("Recommend a game. " * 40, ["Tetris"])
    assert e.value.kind == "over_budget" and "64" in str(e.value)


def test_errors_return_keeps_other_requests_intact(rr):
    good = [Request(instruction="A game for my son.", candidates=["Tetris", "Halo 3", "FIFA 19"],
                    candidate_ids=["t", "h", "f"], request_id=f"g{i}") for i in range(2)]
    bad = [Request(instruction="x", candidates=[], request_id="empty"),
           Request(instruction="x " * 200, candidates=["A"], request_id="long"),
           Request(instruction="x", candidates=["A", "A2"], candidate_ids=["1", "1"], request_id="dup"),
           Request(history=["Tetris"], template="no-such-template", candidates=["A"], request_id="tpl")]
    mixed = [good[0], bad[0], bad[1], good[1], bad[2], bad[3]]
    out = rr.rank(mixed, errors="return")
    assert [r.request_id for r in out] == [r.request_id for r in mixed]
    clean = rr.rank(good)
    for r, c in zip([out[0], out[3]], clean):
        assert r.error is None and r.ranked_ids == c.ranked_ids
        np.testing.assert_allclose(r.scores, c.scores, rtol=1e-6)
        assert sorted(r.ranked_ids) == ["f", "h", "t"] and r.n_candidates == 3
    kinds = {r.request_id: r.error_kind for r in out if r.error}
    assert kinds == {"empty": "invalid_input", "long": "over_budget", "dup": "invalid_input",
                     "tpl": "unknown_template"}
    for r in out:
        if r.error:
            assert r.ranked_ids == [] and r.scores == [] and isinstance(r, RankedResult)
    assert out[1].n_candidates == 0 and out[2].n_candidates == 1



# Whitespace variants the T5 normaliser folds into one text (tab, newline, no-break space and runs
# of spaces become one space), among titles of other lengths so that the variants land at
# different places in the packed decoder rows.
SAME_TOKENS_TITLES = ["Halo 3", "Forza Horizon 4 - Standard Edition - Xbox One", "Halo  3", "Tetris",
                      "Halo\t3", "Halo\n3", "Mario Kart 8 Deluxe", "Halo \u00a0 3", "Halo   3", "Doom",
                      "Game 東方", "Game 游戏", "Halo\t\t3"]


def test_titles_with_the_same_tokens_tie_and_keep_their_input_order(rr, tokenizer):
    groups: dict[tuple, list[int]] = {}  # token ids -> candidate numbers, from the tokenizer itself
    for c, title in enumerate(SAME_TOKENS_TITLES):
        groups.setdefault(tuple(tokenizer(text_target=title).input_ids), []).append(c)
    tied = [g for g in groups.values() if len(g) > 1]
    assert any(len(g) >= 6 for g in tied)  # the Halo variants, whatever the tokenizer's vocabulary
    alone = rr.rank([Request(instruction="Pick a shooter.", candidates=SAME_TOKENS_TITLES)])[0]
    # The same request batched behind others: other row shapes, other packing, other rounding.
    crowd = [Request(instruction="Pick a shooter for my son, please.",
                     candidates=[f"Filler title {i}.{j}" for j in range(3)] + SAME_TOKENS_TITLES)
             for i in range(3)]
    batched = rr.rank(crowd + [Request(instruction="Pick a shooter.", candidates=SAME_TOKENS_TITLES)])[-1]
    for result in (alone, batched):
        position = {int(c): n for n, c in enumerate(result.ranked_ids)}
        for g in tied:
            # Equal token ids have one exact score, so the tie is exact and the stable ranking
            # keeps the input order among them, however the candidates were packed.
            assert len({result.scores[position[c]] for c in g}) == 1
            assert [position[c] for c in g] == sorted(position[c] for c in g)
    assert batched.ranked_ids == alone.ranked_ids
def test_structured_request_uses_the_template(rr):
    res = rr.rank([Request(history=["Tetris", "Halo 3"], candidates=["FIFA 19", "Doom"], request_id="s")])[0]
    assert res.error is None and sorted(res.ranked_ids) == ["0", "1"]


def test_history_over_budget_is_trimmed_as_formatting_trims_it(rr):
    """Instructions are tokenized in one batch without a budget check first; a text over budget
    must then come out exactly as budget-aware formatting makes it (oldest history dropped)."""
    from instructrec.engine.formatting import build_instruction

    history = [f"Legendary Adventure Saga Part {i} - Collector's Edition" for i in range(20)]
    fitted = build_instruction(history=history, tokenizer=rr.tokenizer, max_source_tokens=64)
    assert not fitted.count("Part 0 ") and "Part 19" in fitted  # formatting did drop old items
    candidates = ["FIFA 19", "Doom", "Halo 3"]
    short = Request(history=["Tetris"], candidates=candidates, request_id="short")
    long = Request(history=history, candidates=candidates, request_id="long")
    free = Request(instruction=fitted, candidates=candidates, request_id="free")
    got_short, got_long, want = rr.rank([short, long, free])
    assert got_long.ranked_ids == want.ranked_ids and got_long.scores == want.scores
    assert got_short.scores != want.scores  # a different instruction scores differently


def test_stats_count_one_encoder_pass_per_instruction(rr):
    rr.reset_stats()
    assert rr.stats == EngineStats()
    reqs = [Request(instruction=f"Request {i}", candidates=[f"Title {j}" for j in range(1 + i)]) for i in range(5)]
    rr.rank(reqs)
    s = rr.stats
    assert s.requests == 5 and s.encoder_passes == 5 and s.candidates == 15
    assert s.decoder_tokens == sum(len(rr.tokenizer(text_target=f"Title {j}").input_ids)
                                   for i in range(5) for j in range(1 + i))
    assert s.padded_decoder_tokens >= s.decoder_tokens and s.batches >= 1


def test_dtype_and_backend_choices(tiny_t5_dir):
    with pytest.raises(InputError, match="float16"):
        Reranker.from_pretrained(tiny_t5_dir, dtype="float16")
    with pytest.raises(InputError, match="onnx"):
        Reranker.from_pretrained(tiny_t5_dir, backend="onnx")
    auto = Reranker.from_pretrained(tiny_t5_dir)  # dtype="auto" is the default
    # The one precision policy (engine/capabilities.py), measured at the thread count in use.
    policy = auto_dtype_name("cpu", torch.get_num_threads())
    assert auto.dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16}[policy]


def test_from_model_equals_from_pretrained(tiny_t5_dir, rr, tokenizer):
    from transformers import T5ForConditionalGeneration

    hf = T5ForConditionalGeneration.from_pretrained(tiny_t5_dir)
    other = Reranker.from_model(hf, tokenizer, dtype="float32", max_source_tokens=64)
    titles = ["Tetris", "Halo 3 - Xbox 360"]
    np.testing.assert_array_equal(other.score("A game.", titles), rr.score("A game.", titles))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_load_errors_name_the_file(tiny_t5_dir, tmp_path):
    with pytest.raises(ModelSourceError, match="not an existing folder"):
        Reranker.from_pretrained(tmp_path / "nowhere")
    d = _copy(tiny_t5_dir, tmp_path / "no-config")
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json"):
        Reranker.from_pretrained(d)
    d = _copy(tiny_t5_dir, tmp_path / "no-weights")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        Reranker.from_pretrained(d)
    d = _copy(tiny_t5_dir, tmp_path / "truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        Reranker.from_pretrained(d)
    d = _copy(tiny_t5_dir, tmp_path / "no-tokenizer")
    for f in ("tokenizer.json", "spiece.model"):
        if (d / f).exists():
            (d / f).unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Reranker.from_pretrained(d)
    d = _copy(tiny_t5_dir, tmp_path / "wrong-shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["d_ff"] = 256
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="do not match config.json"):
        Reranker.from_pretrained(d)


def test_compiled_model_scores_like_eager(tiny_t5_dir, rr):
    """compile_model=True runs the same model through torch.compile (Inductor): the same scores
    as the eager model, over batches of several shapes (one row, several rows, a tournament)."""
    compiled = Reranker.from_pretrained(tiny_t5_dir, dtype="float32", max_source_tokens=64, compile_model=True)
    requests = [Request(instruction="Pick a racing game", candidates=["Forza", "Gran Turismo 7", "Tetris"]),
                Request(history=["Halo 3", "Doom"], candidates=[f"Shooter {i}" for i in range(7)]),
                Request(instruction="Choose one of {candidates}", candidates=[f"Game {i}" for i in range(23)])]
    for want, got in zip(rr.rank(requests), compiled.rank(requests)):
        assert got.ranked_ids == want.ranked_ids
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-4)


def test_compile_is_refused_where_it_cannot_run(rr):
    with pytest.raises(InputError, match="compile_model"):
        Reranker(rr.backend, rr.tokenizer, device=rr.device, compile_model="yes")


# ---- no single row can stop a job (issue 14) ---------------------------------------------------


def test_an_over_long_title_is_an_over_budget_error_naming_its_index_and_length(rr):
    long_title = "Deluxe Collector Bundle " * 120  # ~2,900 characters: tokenized, then over 256 tokens
    n_tokens = len(rr.tokenizer(text_target=long_title.strip()).input_ids)
    assert n_tokens > rr.max_target_tokens == 256
    with pytest.raises(BudgetExceededError) as caught:
        rr.score("Recommend a game.", ["Tetris", "Halo 3", long_title])
    assert caught.value.field == "candidates[2]" and f"{n_tokens} tokens" in str(caught.value)
    assert "max_target_tokens=256" in str(caught.value)
    # Far over: refused by its length in characters, before any tokenization.
    with pytest.raises(BudgetExceededError, match=r"candidates\[1\]: title is 1,000,000 characters"):
        rr.score("Recommend a game.", ["Tetris", "x" * 1_000_000])
    good = Request(instruction="A game for my son.", candidates=["Tetris", "Halo 3"], request_id="good")
    bad = Request(instruction="A game for my son.", candidates=["Tetris", long_title], request_id="long title")
    out = rr.rank([bad, good], errors="return")
    assert out[0].error_kind == "over_budget" and out[0].n_candidates == 2 and out[0].ranked_ids == []
    assert out[1].error is None and out[1].scores == rr.rank([good])[0].scores


def test_max_target_tokens_is_an_option(tiny_t5_dir):
    short = Reranker.from_pretrained(tiny_t5_dir, dtype="float32", max_target_tokens=4)
    with pytest.raises(BudgetExceededError, match=r"candidates\[0\]: title is \d+ tokens, over max_target_tokens=4"):
        short.score("x", ["Forza Horizon 4 - Standard Edition - Xbox One"])
    with pytest.raises(InputError, match="max_target_tokens"):
        Reranker.from_pretrained(tiny_t5_dir, max_target_tokens=0)


def test_a_huge_free_text_instruction_is_an_error_row(rr):
    out = rr.rank([Request(instruction="word " * 500_000, candidates=["Tetris"], request_id="huge"),
                   Request(instruction="A game.", candidates=["Tetris"], request_id="fine")], errors="return")
    assert out[0].error_kind == "over_budget" and "2,500,000 characters" in out[0].error
    assert out[1].error is None


@pytest.mark.parametrize("item", [{"instruction": "A game.", "candidates": ["Tetris"]}, None, "A game."])
def test_errors_return_gives_a_non_request_item_an_error_result(rr, item):
    good = Request(instruction="A game for my son.", candidates=["Tetris", "Halo 3"], request_id="good")
    out = rr.rank([good, item, good], errors="return")
    assert [r.request_id for r in out] == ["good", None, "good"]
    assert out[1].error_kind == "invalid_input" and f"got {type(item).__name__}" in out[1].error
    assert out[1].ranked_ids == [] and out[1].n_candidates == 0
    assert out[0].error is None and out[0].scores == out[2].scores == rr.rank([good])[0].scores
    with pytest.raises(InputError, match="expected instructrec.engine.Request"):
        rr.rank([good, item])


def test_a_non_string_title_is_reported_as_such(rr):
    with pytest.raises(InputError) as caught:
        rr.score("Recommend a game.", ["Tetris", 7])
    assert caught.value.field == "candidates[1]" and "title must be text, got int 7" in str(caught.value)
    assert "null or empty" not in str(caught.value)


def test_no_sequence_length_warning_where_the_engine_counts_tokens(rr, tokenizer_dir):
    """transformers warns once per tokenizer when a text exceeds its model_max_length; the engine
    counts every text against its own budgets, so the warning would only be noise."""
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(tokenizer_dir)
    fresh.model_max_length = 16  # so that ordinary texts here exceed it
    quiet = Reranker(rr.backend, fresh, max_source_tokens=512)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        history = [f"Legendary Adventure Saga Part {i} - Collector's Edition" for i in range(20)]
        quiet.rank([Request(history=history, candidates=["A long candidate title " * 6, "Tetris"]),
                    Request(instruction="Pick one: {candidates}", candidates=["Halo 3"] * 3)])
        # The tokenizer itself still warns where a caller does not count (once per tokenizer: had
        # the engine warned first, this call would be silent and the message would differ).
        direct = "word " * 40
        fresh(direct)
    finally:
        transformers_logger.removeHandler(handler)
    warned = [r.getMessage() for r in records if "sequence length is longer" in r.getMessage()]
    n_direct = len(fresh(direct, verbose=False).input_ids)
    assert len(warned) == 1 and f"({n_direct} > 16)" in warned[0], warned
