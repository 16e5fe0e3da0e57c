"""Loading (engine/loading.py): every model source `Reranker.from_pretrained` takes gives the scores
of the same weights passed as a folder, streamed checkpoints of every layout, random models, the
backend choice, and `from_model`'s copy; plus titles scored exactly as training targets are made."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from instructrec.engine import InputError, ModelLoadError, Reranker, Request
from instructrec.engine.sources import EXPORT_MANIFEST_NAME, ModelSourceError, resolve_model
from ..conftest import TINY_HUB_COMMIT, TINY_HUB_ID

# Model tests run on one torch thread (see the one_torch_thread fixture in conftest).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

INSTRUCTION = "The user played Halo 3 and Forza Horizon 4. Recommend the next game."
TITLES = ["Tetris", "Halo 3 - Xbox 360", "Forza Horizon 4 - Standard Edition", "Game {Deluxe} Edition"]
# The same tolerance as tests/engine/test_scoring.py: fp32 against an fp64-exact reference.
FP32 = dict(rtol=3e-7, atol=1e-4)


@pytest.fixture(scope="module")
def folder_rr(tiny_t5_dir):
    return Reranker.from_pretrained(tiny_t5_dir, dtype="float32")


def test_hub_id_gives_exactly_the_scores_of_the_same_folder(offline_hf_home, folder_rr):
    hub = Reranker.from_pretrained(TINY_HUB_ID, dtype="float32")
    np.testing.assert_array_equal(hub.score(INSTRUCTION, TITLES), folder_rr.score(INSTRUCTION, TITLES))
    # The source stays on the reranker, so a job manifest can record exactly which weights ran.
    assert hub.source.repo_id == TINY_HUB_ID and hub.source.identity()["commit"] == TINY_HUB_COMMIT
    assert folder_rr.source.kind == "checkpoint" and folder_rr.source.commit is None


def test_a_resolved_model_source_is_accepted_and_kept(tiny_t5_dir, folder_rr):
    source = resolve_model(tiny_t5_dir)
    rr = Reranker.from_pretrained(source, dtype="float32")
    assert rr.source is source
    np.testing.assert_array_equal(rr.score(INSTRUCTION, TITLES), folder_rr.score(INSTRUCTION, TITLES))


def test_random_model_needs_a_tokenizer(caplog):
    with caplog.at_level(logging.WARNING), pytest.raises(InputError) as caught:
        Reranker.from_pretrained("random:t5-tiny")
    assert caught.value.field == "tokenizer" and "tokenizer=" in str(caught.value)
    assert any("RANDOM" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_random_model_with_a_tokenizer_folder_or_hub_id_scores_reproducibly(offline_hf_home, tokenizer_dir,
                                                                            folder_rr):
    first = Reranker.from_pretrained("random:t5-tiny", tokenizer=tokenizer_dir, dtype="float32")
    again = Reranker.from_pretrained("random:t5-tiny", tokenizer=TINY_HUB_ID, dtype="float32")
    assert first.source.is_random and first.source.shape == "t5-tiny"
    scores = first.score(INSTRUCTION, TITLES)
    assert scores.shape == (len(TITLES),) and np.isfinite(scores).all() and (scores < 0).all()
    np.testing.assert_array_equal(again.score(INSTRUCTION, TITLES), scores)  # seeded weights
    assert not np.allclose(scores, folder_rr.score(INSTRUCTION, TITLES))  # not the checkpoint's weights
    # Drawn as Hugging Face initialises T5: q at (d_model * d_kv) ** -0.5 (64 * 16), k and v at d_model ** -0.5.
    qkv = first.backend.model.encoder[0].qkv.weight
    inner = qkv.shape[0] // 3
    assert abs(qkv[:inner].std().item() - (64 * 16) ** -0.5) < 0.003
    assert abs(qkv[inner:].std().item() - 64 ** -0.5) < 0.01


def test_a_tokenizer_hub_id_missing_from_the_cache_is_a_clear_error(offline_hf_home):
    with pytest.raises(ModelSourceError, match="not in the Hugging Face cache"):
        Reranker.from_pretrained("random:t5-tiny", tokenizer="nobody/no-such-tokenizer")


def _save(hf_model, tokenizer_dir, out, **save_options):
    from transformers import AutoTokenizer

    hf_model.save_pretrained(out, **save_options)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("layout, save_options, weight_files", [
    ("sharded safetensors", dict(max_shard_size="1MB"), "model-*-of-*.safetensors"),
    ("pytorch_model.bin", dict(safe_serialization=False), "pytorch_model.bin"),
    ("sharded pytorch_model.bin", dict(safe_serialization=False, max_shard_size="1MB"), "pytorch_model-*-of-*.bin"),
])
def test_every_checkpoint_layout_streams_to_the_same_scores(tiny_t5_dir, tokenizer_dir, folder_rr, tmp_path,
                                                            layout, save_options, weight_files):
    from transformers import T5ForConditionalGeneration

    hf = T5ForConditionalGeneration.from_pretrained(tiny_t5_dir)
    out = _save(hf, tokenizer_dir, tmp_path / "checkpoint", **save_options)
    files = sorted(out.glob(weight_files))
    assert len(files) >= (2 if "sharded" in layout else 1) and not (out / "model.safetensors").exists()
    rr = Reranker.from_pretrained(out, dtype="float32")
    np.testing.assert_array_equal(rr.score(INSTRUCTION, TITLES), folder_rr.score(INSTRUCTION, TITLES))


def test_a_missing_shard_and_a_damaged_shard_are_named(tiny_t5_dir, tokenizer_dir, tmp_path):
    from transformers import T5ForConditionalGeneration

    out = _save(T5ForConditionalGeneration.from_pretrained(tiny_t5_dir), tokenizer_dir, tmp_path / "c",
                max_shard_size="1MB")
    shards = sorted(out.glob("model-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=shards[1].name):
        Reranker.from_pretrained(out)
    shards[1].unlink()
    with pytest.raises(ModelLoadError, match=f"{shards[1].name}: shard listed in model.safetensors.index.json"):
        Reranker.from_pretrained(out)


def test_bf16_load_converts_every_tensor_as_a_cast_of_the_fp32_weights(tiny_t5_dir, folder_rr):
    bf16 = Reranker.from_pretrained(tiny_t5_dir, dtype="bfloat16")
    ours = dict(bf16.backend.model.named_parameters())
    for name, weight in folder_rr.backend.model.named_parameters():
        assert ours[name].dtype == torch.bfloat16
        assert torch.equal(ours[name], weight.to(torch.bfloat16)), name


def test_backend_auto_and_the_wrong_explicit_backend(tiny_t5_dir, tmp_path):
    with pytest.raises(InputError, match="backend='torch' or 'auto'") as caught:
        Reranker.from_pretrained(tiny_t5_dir, backend="onnx")
    assert "instructrec export" in str(caught.value)
    with pytest.raises(InputError, match="onnx backend loads an export"):
        Reranker.from_pretrained("random:t5-tiny", backend="onnx", tokenizer=tiny_t5_dir)
    # A folder with an export manifest is an export: "torch" says which backend reads it, "auto"
    # hands it to the onnx backend, which reads (and here refuses) the manifest.
    export = tmp_path / "export"
    export.mkdir()
    (export / EXPORT_MANIFEST_NAME).write_text(json.dumps({"format": "something else"}))
    shutil.copy(tiny_t5_dir / "config.json", export / "config.json")
    with pytest.raises(InputError, match="use backend='onnx' or 'auto'"):
        Reranker.from_pretrained(export, backend="torch")
    with pytest.raises(ModelLoadError, match=f"{EXPORT_MANIFEST_NAME}: not an instructrec ONNX manifest"):
        Reranker.from_pretrained(export)
    with pytest.raises(InputError, match="unknown backend"):
        Reranker.from_pretrained(tiny_t5_dir, backend="tensorrt")


def test_both_backends_answer_the_backend_protocol(folder_rr, tiny_t5_dir):
    from instructrec.engine.backend import Backend
    from instructrec.engine.model import T5Config
    from instructrec.engine.onnx_backend import OnnxBackend

    assert isinstance(folder_rr.backend, Backend)
    cfg = T5Config.from_hf(json.loads((tiny_t5_dir / "config.json").read_text()))
    onnx = OnnxBackend({}, cfg, torch.float32, torch.device("cpu"), tiny_t5_dir)  # no sessions: members only
    assert isinstance(onnx, Backend)
    assert not isinstance(object(), Backend)


def test_from_model_copies_the_weights(tiny_t5_dir, tokenizer):
    """A training step after building must not change a reranker built before it (fp32 on the
    same device is where a cast would have returned the training model's own tensors)."""
    from transformers import T5ForConditionalGeneration

    hf = T5ForConditionalGeneration.from_pretrained(tiny_t5_dir)
    rr = Reranker.from_model(hf, tokenizer, dtype="float32")
    before = rr.score(INSTRUCTION, TITLES)
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(1.5)  # an "optimiser step" on every weight, in place
    np.testing.assert_array_equal(rr.score(INSTRUCTION, TITLES), before)
    changed = Reranker.from_model(hf, tokenizer, dtype="float32").score(INSTRUCTION, TITLES)
    assert not np.allclose(changed, before)  # the step does change scores for a reranker built after it
    ours = {p.data_ptr() for p in rr.backend.model.parameters()}
    assert not ours & {p.data_ptr() for p in hf.parameters()}


# ---- fidelity with training targets ---------------------------------------------------------------


def test_titles_are_scored_exactly_as_training_targets_are_written(folder_rr, tiny_t5_dir, hf_log_likelihoods):
    """Training writes a target title through the template's sanitiser (braces become
    parentheses; T5 has no braces and would read <unk>); the engine scores the raw title the
    same way, and lists it the same way."""
    from instructrec.engine.formatting import render_template, sanitize_text
    from instructrec.engine.templates import Intention, Preference, default_template

    raw = "Game {Deluxe}\tEdition"
    template = default_template(Preference.HISTORY, Intention.NONE, False)
    training_row = render_template(template, {"history": ["Tetris", "Halo 3"], "target_title": raw})
    assert training_row.target == sanitize_text(raw) == "Game (Deluxe) Edition"  # the training end

    request = Request(history=["Tetris", "Halo 3"], candidates=[raw, "Tetris"], template=template.id)
    result = folder_rr.rank([request])[0]
    engine_score = result.scores[result.ranked_ids.index("0")]
    # The reference: Hugging Face's own forward over the training row's source and target text.
    reference = hf_log_likelihoods(tiny_t5_dir, training_row.source, [training_row.target])[0]
    np.testing.assert_allclose(engine_score, reference, **FP32)
    # Exactly: the same request with the sanitised title given (same packing, so same rounding).
    assert engine_score == folder_rr.score(training_row.source, [training_row.target, "Tetris"])[0]
    # Listed candidates read the same sanitised title the target is scored as.
    listed = folder_rr.score("Pick one of: {candidates}", [raw])[0]
    assert listed == folder_rr.score("Pick one of: 1. Game (Deluxe) Edition", [training_row.target])[0]
