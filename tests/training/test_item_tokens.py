"""`train --item-tokens`: every training target's title becomes one token of the compact vocabulary,
found as a whole word in any text (histories, candidates) and nowhere else; `--spell-rows` adds rows
whose target is the same title spelt in pieces. A run saves the extended tokenizer, the engine and
the ONNX export score its model as Hugging Face's own forward does, a resumed run keeps its
tokens; the flags' checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from instructrec.engine.errors import InputError
from instructrec.training.compact_vocab import compact_tokenizer, vocab_rows, with_item_tokens, without_added_titles
from instructrec.training.tune import TrainConfig, train
from instructrec.training.tune_data import spelled_picks, spelled_rows, tokenize_rows

from ..conftest import write_train_and_valid

TITLES = ["Halo 3 - Xbox 360", "Mario Kart 8 Deluxe", "Portal 2 - PC", "Doom", "Tetris Effect: Connected",
          "Forza Horizon 4 - Xbox One"]
HISTORY = "Past purchases of this shopper, oldest to newest: {}; {}. Name the item they want next."
TEXTS = [HISTORY.format(a, b) for a, b in zip(TITLES, TITLES[1:])] + ["They loved Doomsday and doom metal."]
UNSEEN = "Quantum Break: Zyxel Vengeance - Nintendo Wii"


@pytest.fixture(scope="module")
def pieces_only(tokenizer):
    return compact_tokenizer(tokenizer, TEXTS + TITLES + [UNSEEN])


@pytest.fixture(scope="module")
def extended(pieces_only):
    return with_item_tokens(pieces_only, TITLES[1:5])


def title_id(tokenizer, title):
    return tokenizer.convert_tokens_to_ids(title)


def test_each_title_is_one_new_token(pieces_only, extended):
    ids = [title_id(extended, t) for t in TITLES[1:5]]
    assert len(extended) == len(pieces_only) + 4
    assert sorted(ids) == list(range(len(pieces_only), len(pieces_only) + 4))
    for title, token in zip(TITLES[1:5], ids):
        assert extended(title)["input_ids"] == [token, extended.eos_token_id]
    assert extended.eos_token_id == pieces_only.eos_token_id and extended.pad_token_id == pieces_only.pad_token_id


def test_a_history_reads_its_titles_as_tokens_and_the_rest_as_pieces(pieces_only, extended):
    text = HISTORY.format(TITLES[0], TITLES[1])  # TITLES[0] has no token, TITLES[1] has
    ids = extended(text)["input_ids"]
    added = [i for i in ids if i >= len(pieces_only)]
    assert added == [title_id(extended, TITLES[1])]
    # What is not a title is spelt by the pieces as before: the text with the title cut out.
    without = [i for i in ids if i < len(pieces_only)]
    head, tail = text.split(TITLES[1])
    want = pieces_only(head.rstrip(), add_special_tokens=False)["input_ids"]
    assert without[:len(want)] == want
    assert extended.decode(pieces_only(tail.lstrip())["input_ids"], skip_special_tokens=True) in \
        extended.decode(ids, skip_special_tokens=True)


def test_a_title_is_matched_as_whole_words_only(pieces_only, extended):
    text = "They loved Doomsday and doom metal."
    assert extended(text)["input_ids"] == pieces_only(text)["input_ids"]
    assert title_id(extended, "Doom") in extended("Doom, then Doom II")["input_ids"]


def test_other_text_and_unseen_titles_tokenize_as_before(pieces_only, extended):
    for text in (UNSEEN, TITLES[0], TITLES[5], "", "Recommend the item they should get next."):
        assert extended(text)["input_ids"] == pieces_only(text)["input_ids"]


def test_the_tokens_survive_saving_and_can_be_dropped_again(pieces_only, extended, tmp_path):
    from transformers import AutoTokenizer

    extended.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + TITLES:
        assert again(text)["input_ids"] == extended(text)["input_ids"]
    back = without_added_titles(again)
    assert len(back) == len(pieces_only)
    for text in TEXTS + TITLES + [UNSEEN]:
        assert back(text)["input_ids"] == pieces_only(text)["input_ids"]


def test_spelled_rows_repeat_the_source_with_the_title_in_pieces(pieces_only, extended):
    instructions, targets = TEXTS[:3], TITLES[1:4]
    rows = tokenize_rows(extended, instructions, targets, 512, 64, "train")
    picks = np.array([2, 0, 2])
    grown = spelled_rows(rows, picks, targets, pieces_only, 64)
    assert len(grown) == 6
    for i in range(3):  # the original rows untouched
        assert grown.source(i).tolist() == extended(instructions[i])["input_ids"]
        assert grown.target(i).tolist() == extended(targets[i])["input_ids"]
    for k, i in enumerate(picks):
        assert grown.source(3 + k).tolist() == extended(instructions[i])["input_ids"]
        assert grown.target(3 + k).tolist() == pieces_only(targets[i])["input_ids"]
        # Spelt, not the title's token: pieces only (a short title may be one piece and </s>).
        assert grown.target(3 + k).max() < len(pieces_only)
        assert grown.target(3 + k).tolist() != extended(targets[i])["input_ids"]
    assert spelled_picks(100, 0.2, 0).tolist() == spelled_picks(100, 0.2, 0).tolist()
    assert len(spelled_picks(100, 0.2, 0)) == 20 and len(spelled_picks(100, 0.0, 0)) == 0


# --------------------------------------------------------------------------- the trainer

@pytest.fixture(scope="module")
def instructions(tmp_path_factory):
    directory = tmp_path_factory.mktemp("instructions")
    rows = {"instruction": TEXTS[:5], "target": TITLES[1:6], "template": ["seq-rec-01"] * 5}
    return write_train_and_valid(directory, rows)


def config(instructions, out, tokenizer_dir, **overrides) -> TrainConfig:
    base = dict(instructions=instructions, model="random:t5-tiny", tokenizer=tokenizer_dir, out=out, precision="fp32",
                device="cpu", progress=False, batch_size=2, max_steps=3, rank_eval=False, threads=1,
                compact_vocab=True, item_tokens=True, optimizer="adamw", lr=1e-3, save_every=0)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def item_run(instructions, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("items") / "run"
    train(config(instructions, out, tokenizer_dir))
    return out


def test_a_run_saves_one_token_per_target_title_and_a_model_of_its_size(item_run):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    saved = AutoTokenizer.from_pretrained(item_run)
    model = T5ForConditionalGeneration.from_pretrained(item_run)
    for title in TITLES[1:6]:  # the training targets
        ids = saved(title)["input_ids"]
        assert len(ids) == 2 and ids[0] == title_id(saved, title)
    assert len(saved(TITLES[0])["input_ids"]) > 2  # only in a history: spelt
    assert model.config.vocab_size == vocab_rows(saved) >= len(saved)
    recorded = json.loads((item_run / "training_config.json").read_text())
    assert recorded["item_tokens"] is True and recorded["spell_rows"] is None


def test_a_fifth_of_the_rows_are_spelt_by_default(instructions, tokenizer_dir, tmp_path, caplog):
    caplog.set_level("INFO", logger="instructrec.training.tune")
    train(config(instructions, tmp_path / "run", tokenizer_dir, max_steps=1))
    assert "spelled rows: 1 training rows again" in caplog.text  # round(0.2 x 5)
    assert "train: 6 rows over 2 templates" in caplog.text


def test_the_engine_scores_an_item_token_model_as_hugging_face_does(item_run, hf_log_likelihoods):
    from instructrec.engine import Reranker

    reranker = Reranker.from_pretrained(str(item_run), backend="torch", dtype="float32")
    instruction, candidates = TEXTS[1], TITLES[2:5] + [UNSEEN, TITLES[0]]
    # Reference: Hugging Face's forward with the saved tokenizer (title tokens and spelt titles alike).
    np.testing.assert_allclose(reranker.score(instruction, candidates),
                               hf_log_likelihoods(item_run, instruction, candidates), rtol=1e-4, atol=1e-4)


def test_an_onnx_export_scores_as_the_torch_model(item_run, tmp_path, onnx_and_torch_scores):
    onnx, torch_scores = onnx_and_torch_scores(item_run, tmp_path / "onnx", TEXTS[2], TITLES[1:4] + [UNSEEN])
    np.testing.assert_allclose(onnx, torch_scores, rtol=1e-4, atol=1e-4)


def test_a_resumed_run_keeps_its_tokens(instructions, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    train(config(instructions, out, tokenizer_dir, max_steps=4, stop_after=2, save_every=2, spell_rows=0.5))
    first = AutoTokenizer.from_pretrained(sorted((out / "checkpoints").iterdir())[-1])
    result = train(config(instructions, out, tokenizer_dir, max_steps=4, resume=True, save_every=2, spell_rows=0.5))
    assert result.steps_done == 4
    assert AutoTokenizer.from_pretrained(out).get_vocab() == first.get_vocab()
    assert len(first(TITLES[3])["input_ids"]) == 2


@pytest.mark.parametrize("overrides, field", [
    (dict(compact_vocab=False), "item_tokens"),
    (dict(item_tokens=False, spell_rows=0.2), "spell_rows"),
    (dict(spell_rows=1.5), "spell_rows"),
    (dict(spell_rows=float("nan")), "spell_rows"),
    (dict(init_embeddings="minilm"), "item_tokens"),
])
def test_bad_flags_are_refused_before_any_work(instructions, tokenizer_dir, tmp_path, overrides, field):
    with pytest.raises(InputError) as excinfo:
        train(config(instructions, tmp_path / "run", tokenizer_dir, **overrides))
    assert excinfo.value.field == field and not (tmp_path / "run").exists()
