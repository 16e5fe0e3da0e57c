"""`train --compact-vocab`: the compact tokenizer spells every text it was built from exactly as the
full one does (ids mapped through its pieces), spells other text without <unk>, keeps the special
tokens and sentinels; a compact run trains, resumes, and leaves a model folder the engine scores
with, its scores equal to Hugging Face's own forward under that tokenizer; the flags' checks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from instructrec.engine.errors import InputError
from instructrec.engine.templates import REGISTRY
from instructrec.training.compact_vocab import VOCAB_ROWS_MULTIPLE, compact_tokenizer, template_wording, vocab_rows
from instructrec.training.tune import TrainConfig, train

from ..conftest import write_train_and_valid

TITLES = ["Halo 3 - Xbox 360", "Mario Kart 8 Deluxe", "Portal 2 - PC", "Tetris Effect: Connected",
          "The Legend of Zelda: Breath of the Wild", "Forza Horizon 4 - Xbox One"]
TEXTS = [f"Past purchases of this shopper, oldest to newest: {a}; {b}. Name the item they want next."
         for a, b in zip(TITLES, TITLES[1:])] + TITLES
# A title none of the texts holds, with words whose own pieces the compact vocabulary drops.
UNSEEN = "Quantum Break: Zyxel Vengeance - Nintendo Wii"


def source_ids(full_tokenizer, compact, ids=None):
    """The full tokenizer's id of each compact id (all of them by default), through the pieces' text."""
    ids = range(len(compact)) if ids is None else ids
    return full_tokenizer.convert_tokens_to_ids(compact.convert_ids_to_tokens(list(ids)))


def pieces(tokenizer, text):
    return tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])


@pytest.fixture(scope="module")
def compact(tokenizer):
    return compact_tokenizer(tokenizer, TEXTS)


def test_the_texts_it_was_built_from_tokenize_exactly_as_before(tokenizer, compact):
    assert len(compact) < len(tokenizer) / 4
    for text in TEXTS + template_wording():
        full_ids = tokenizer(text)["input_ids"]
        compact_ids = compact(text)["input_ids"]
        assert pieces(compact, text) == pieces(tokenizer, text)
        assert source_ids(tokenizer, compact, compact_ids) == full_ids
    # Ids ascend with the source's, so T5's special ids stay where the model expects them.
    mapped = source_ids(tokenizer, compact)
    assert mapped == sorted(mapped) and len(set(mapped)) == len(mapped)
    assert (compact.pad_token_id, compact.eos_token_id, compact.unk_token_id) == (
        tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)


def test_other_text_is_spelt_from_kept_pieces_without_unk(tokenizer, compact):
    full, small = pieces(tokenizer, UNSEEN), pieces(compact, UNSEEN)
    assert small != full  # some of its words' own pieces were dropped...
    assert compact.unk_token not in small  # ...and it is spelt in smaller ones, never <unk>
    assert compact.decode(compact(UNSEEN)["input_ids"], skip_special_tokens=True) == \
        tokenizer.decode(tokenizer(UNSEEN)["input_ids"], skip_special_tokens=True)


def test_sentinels_and_template_wording_are_kept(tokenizer, compact):
    sentinels = [t for t in tokenizer.all_special_tokens if t.startswith("<extra_id_")]
    for token in sentinels:
        assert compact.convert_tokens_to_ids(token) != compact.unk_token_id
    assert len(compact) == len(set(compact.get_vocab().values()))
    wording = template_wording()
    assert not any("{" in text for text in wording)
    # Every registered template's fixed words are among them (the first test tokenizes them).
    assert len(wording) >= len(REGISTRY) and "Past purchases of this shopper, oldest to newest: " in wording


def test_the_model_rows_are_rounded_up():
    class Sized:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    assert vocab_rows(Sized(VOCAB_ROWS_MULTIPLE)) == VOCAB_ROWS_MULTIPLE
    assert vocab_rows(Sized(VOCAB_ROWS_MULTIPLE + 1)) == 2 * VOCAB_ROWS_MULTIPLE


def test_a_tokenizer_without_a_unigram_model_is_refused():
    class WordLevel:
        backend_tokenizer = None

    with pytest.raises(InputError) as excinfo:
        compact_tokenizer(WordLevel(), TEXTS)
    assert excinfo.value.field == "tokenizer"


# --------------------------------------------------------------------------- the trainer

@pytest.fixture(scope="module")
def instructions(tmp_path_factory):
    directory = tmp_path_factory.mktemp("instructions")
    rows = {"instruction": TEXTS[:5], "target": TITLES[1:6], "template": ["seq-rec-01"] * 5}
    return write_train_and_valid(directory, rows)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    directory = tmp_path_factory.mktemp("prepared")
    pq.write_table(pa.table({"item_id": ["a", "b"], "title": [UNSEEN, TITLES[0]]}), directory / "items.parquet")
    return directory


def config(instructions, out, tokenizer_dir, **overrides) -> TrainConfig:
    base = dict(instructions=instructions, model="random:t5-tiny", tokenizer=tokenizer_dir, out=out, precision="fp32",
                device="cpu", progress=False, batch_size=2, max_steps=3, rank_eval=False, threads=1,
                compact_vocab=True, optimizer="adamw", lr=1e-3, save_every=0)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def compact_run(instructions, catalogue, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compact") / "run"
    train(config(instructions, out, tokenizer_dir, vocab_catalog=catalogue))
    return out


def test_a_compact_run_saves_the_compact_tokenizer_and_a_model_of_its_size(compact_run, tokenizer):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    saved = AutoTokenizer.from_pretrained(compact_run)
    model = T5ForConditionalGeneration.from_pretrained(compact_run)
    assert len(saved) < len(tokenizer) / 4
    assert model.config.vocab_size == vocab_rows(saved) < 32128
    assert model.shared.weight.shape[0] == model.lm_head.weight.shape[0] == model.config.vocab_size
    assert not (compact_run / "spiece.model").exists()  # the full vocabulary's slow tokenizer
    assert json.loads((compact_run / "training_config.json").read_text())["compact_vocab"] is True
    # --vocab-catalog: the catalogue's title, in no instruction, tokenizes as the full tokenizer does.
    assert pieces(saved, UNSEEN) == pieces(tokenizer, UNSEEN)


def test_the_engine_scores_a_compact_model_as_hugging_face_does(compact_run):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from instructrec.engine import Reranker

    reranker = Reranker.from_pretrained(str(compact_run), backend="torch", dtype="float32")
    instruction, candidates = TEXTS[0], TITLES[2:5] + [UNSEEN]
    got = reranker.score(instruction, candidates)
    # Reference: Hugging Face's forward with the saved tokenizer, each candidate on its own.
    tokenizer = AutoTokenizer.from_pretrained(compact_run)
    model = T5ForConditionalGeneration.from_pretrained(compact_run).eval()
    source = tokenizer(instruction, return_tensors="pt")
    want = []
    for title in candidates:
        labels = tokenizer(title, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(**source, labels=labels).logits
        want.append(float(torch.log_softmax(logits.double(), -1)[0, torch.arange(labels.shape[1]), labels[0]].sum()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_compact_run_resumes_with_its_own_tokenizer(instructions, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    train(config(instructions, out, tokenizer_dir, max_steps=4, stop_after=2, save_every=2))
    first = AutoTokenizer.from_pretrained(sorted((out / "checkpoints").iterdir())[-1])
    result = train(config(instructions, out, tokenizer_dir, max_steps=4, resume=True, save_every=2))
    assert result.steps_done == 4
    assert AutoTokenizer.from_pretrained(out).get_vocab() == first.get_vocab()


def test_compact_vocab_with_trained_weights_is_refused(instructions, tmp_path, tokenizer_dir, tiny_t5_dir):
    with pytest.raises(InputError, match="own vocabulary") as excinfo:
        train(config(instructions, tmp_path / "run", tokenizer_dir, model=str(tiny_t5_dir)))
    assert excinfo.value.field == "compact_vocab" and not (tmp_path / "run").exists()


def test_a_catalogue_without_compact_vocab_is_refused(instructions, catalogue, tmp_path, tokenizer_dir):
    with pytest.raises(InputError) as excinfo:
        train(config(instructions, tmp_path / "run", tokenizer_dir, compact_vocab=False, vocab_catalog=catalogue))
    assert excinfo.value.field == "vocab_catalog" and not (tmp_path / "run").exists()


def test_a_catalogue_folder_without_items_is_refused(instructions, tmp_path, tokenizer_dir):
    with pytest.raises(InputError, match="items.parquet") as excinfo:
        train(config(instructions, tmp_path / "run", tokenizer_dir, vocab_catalog=tmp_path))
    assert excinfo.value.field == "vocab_catalog" and not (tmp_path / "run").exists()


def test_an_onnx_export_of_a_compact_model_scores_as_the_torch_model(compact_run, tmp_path, onnx_and_torch_scores):
    onnx, torch_scores = onnx_and_torch_scores(compact_run, tmp_path / "onnx", TEXTS[2], TITLES[1:4] + [UNSEEN])
    np.testing.assert_allclose(onnx, torch_scores, rtol=1e-4, atol=1e-4)
