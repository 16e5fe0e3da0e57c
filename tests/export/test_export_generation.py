"""`export --with-generation-graphs` (Optimum's stock seq2seq graphs beside ours, generate() through
ORTModelForSeq2SeqLM equal to transformers') and external data (every graph's weights in
<file>.onnx_data, hashed by the manifest, loaded back)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from instructrec.engine import ModelLoadError, Reranker
from instructrec.engine.onnx_backend import GRAPH_FILES, MANIFEST_NAME, sha256_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INSTRUCTION = "Pick a game for a fan of Mario Kart 8 and Super Smash Bros. who likes racing."
TITLES = ["Tetris", "Halo 3 - Xbox 360", "Minecraft", "FIFA 19", "Neon Drift Turbo Kart Racer"]


def test_optimum_loads_the_folder_and_greedy_generation_equals_transformers(tiny_onnx_with_generation,
                                                                             tiny_t5_dir, tokenizer):
    from optimum.onnxruntime import ORTModelForSeq2SeqLM
    from transformers import T5ForConditionalGeneration

    out, manifest = tiny_onnx_with_generation
    assert {"encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"} <= set(
        manifest["generation_graphs"])
    ort_model = ORTModelForSeq2SeqLM.from_pretrained(out)
    # Optimum picked its own files, not ours
    assert ort_model.encoder.path.name == "encoder_model.onnx"
    hf = T5ForConditionalGeneration.from_pretrained(tiny_t5_dir).eval()
    batch = tokenizer([INSTRUCTION, "Recommend a racing game."], return_tensors="pt", padding=True)
    options = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, num_beams=1)
    with torch.inference_mode():
        got = ort_model.generate(**batch, **options)
        want = hf.generate(**batch, **options)
    assert got.shape == want.shape == (2, 17)
    assert torch.equal(got, want)
    report = json.loads((out / "validation.json").read_text())
    assert [r["passed"] for r in report["results"] if r["graph"] == "generation_graphs"] == [True]


def test_engine_still_loads_its_own_graphs_beside_optimums(tiny_onnx_with_generation, tiny_onnx):
    """Only our four graphs (and their data files) are in the manifest, all hashes valid, scores as
    the export without generation graphs."""
    out, manifest = tiny_onnx_with_generation
    assert {e["file"] for e in manifest["graphs"].values()} == set(GRAPH_FILES.values())
    got = Reranker.from_pretrained(out, backend="onnx").score(INSTRUCTION, TITLES)
    want = Reranker.from_pretrained(tiny_onnx[0], backend="onnx").score(INSTRUCTION, TITLES)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_external_data_files_are_hashed_and_loaded(tiny_onnx_with_generation):
    out, manifest = tiny_onnx_with_generation
    for name, entry in manifest["graphs"].items():
        data = entry["external_data"]
        assert [d["file"] for d in data] == [GRAPH_FILES[name] + "_data"], name
        for d in data:
            assert d["sha256"] == sha256_file(out / d["file"]) and d["bytes"] == (out / d["file"]).stat().st_size
    # the graph files themselves hold no weights any more
    assert (out / GRAPH_FILES["decoder"]).stat().st_size < 200_000 < manifest["graphs"]["decoder"][
        "external_data"][0]["bytes"]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_external_data_names_the_file(tiny_onnx_with_generation, tmp_path, damage):
    out = tmp_path / "copy"
    shutil.copytree(tiny_onnx_with_generation[0], out)
    data = out / (GRAPH_FILES["decoder"] + "_data")
    if damage == "delete":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[:1024])
    with pytest.raises(ModelLoadError, match=data.name):
        Reranker.from_pretrained(out, backend="onnx")


def test_manifest_lists_generation_graphs_for_information_only(tiny_onnx_with_generation):
    out, manifest = tiny_onnx_with_generation
    on_disk = json.loads((out / MANIFEST_NAME).read_text())
    assert on_disk["generation_graphs"] == manifest["generation_graphs"]
    assert all((out / f).exists() for f in manifest["generation_graphs"])
    assert not (out / ".generation-graphs.partial").exists()
