"""What `instructrec export --model` accepts (a folder, a Hub id through a real offline Hugging Face
cache, random:<shape>) and refuses (an export folder, a random model without a tokenizer), the
format-2 file names Optimum cannot mistake for its own, and the refusal of a format-1 export."""

from __future__ import annotations

import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch

from instructrec.engine import ModelLoadError, Reranker
from instructrec.engine.errors import InputError
from instructrec.engine.onnx_backend import GRAPH_FILES, MANIFEST_NAME, OnnxBackend
from instructrec.engine.sources import ModelSourceError
from instructrec.export import export_model

from ..conftest import TINY_HUB_COMMIT, TINY_HUB_ID

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INSTRUCTION = "The user played Mario Kart 8 and Super Smash Bros. Recommend the next game."
TITLES = ["Tetris", "Halo 3 - Xbox 360", "Minecraft", "FIFA 19"]


# ------------------------------------------------------------------------------- Optimum's names
def _optimum_patterns() -> dict[str, str]:
    from optimum.onnxruntime import constants

    return {name: getattr(constants, name) for name in (
        "ENCODER_ONNX_FILE_PATTERN", "DECODER_ONNX_FILE_PATTERN", "DECODER_WITH_PAST_ONNX_FILE_PATTERN",
        "DECODER_MERGED_ONNX_FILE_PATTERN")}


def test_no_graph_file_matches_an_optimum_pattern(tiny_onnx):
    out, manifest = tiny_onnx
    files = [entry["file"] for entry in manifest["graphs"].values()]
    assert sorted(files) == sorted(GRAPH_FILES.values())
    for pattern_name, pattern in _optimum_patterns().items():
        assert not [f for f in files if re.search(pattern, f)], pattern_name


def test_optimum_does_not_load_our_graphs_as_its_own(tiny_onnx):
    """ORTModelForSeq2SeqLM over an export without generation graphs finds no encoder of its own
    (format 1's encoder.onnx / encoder_kv.onnx both matched its encoder pattern)."""
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    from optimum.onnxruntime.constants import ENCODER_ONNX_FILE_PATTERN

    # The first lookup, the encoder's, already finds nothing (format 1 got past it with
    # encoder.onnx, and failed later, on the decoder_with_past pattern).
    with pytest.raises(FileNotFoundError, match=re.escape(f"matching the pattern {ENCODER_ONNX_FILE_PATTERN}")):
        ORTModelForSeq2SeqLM.from_pretrained(tiny_onnx[0])


def test_format_1_export_is_refused_with_the_command_to_export_again(tiny_onnx, tmp_path, tiny_t5_dir):
    out = tmp_path / "v1"
    shutil.copytree(tiny_onnx[0], out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["format_version"] = 1
    manifest["source"] = str(tiny_t5_dir)  # what format 1 recorded: the checkpoint's path
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError) as e:
        Reranker.from_pretrained(out, backend="onnx")
    message = str(e.value)
    assert "format version 1" in message and "Optimum mistakes" in message
    assert f"instructrec export --model {tiny_t5_dir} --out NEW_DIR" in message


# ------------------------------------------------------------------------------------- sources
def test_hub_id_exports_the_same_graphs_as_the_folder(offline_hf_home, tiny_onnx, tmp_path):
    """`--model org/name` through the offline cache: byte-identical graphs, the same scores, and
    the snapshot's commit recorded."""
    from instructrec.cli import main

    out = tmp_path / "from-hub"
    assert main(["export", "--model", TINY_HUB_ID, "--out", str(out)]) == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for name, entry in manifest["graphs"].items():
        assert entry["sha256"] == tiny_onnx[1]["graphs"][name]["sha256"], name
    source = manifest["source"]
    assert source["repo_id"] == TINY_HUB_ID and source["commit"] == TINY_HUB_COMMIT and source["kind"] == "checkpoint"
    from_hub = Reranker.from_pretrained(out, backend="onnx").score(INSTRUCTION, TITLES)
    from_folder = Reranker.from_pretrained(tiny_onnx[0], backend="onnx").score(INSTRUCTION, TITLES)
    np.testing.assert_array_equal(from_hub, from_folder)


def test_hub_revision_is_resolved_and_recorded(offline_hf_home, tmp_path):
    manifest = export_model(TINY_HUB_ID, tmp_path / "pinned", revision=TINY_HUB_COMMIT)
    assert manifest["source"]["commit"] == TINY_HUB_COMMIT and manifest["source"]["revision"] == TINY_HUB_COMMIT


def test_uncached_hub_id_fails_before_any_work(offline_hf_home, tmp_path, capsys):
    from instructrec.cli import main

    assert main(["export", "--model", "instructrec-tests/not-cached", "--out", str(tmp_path / "x")]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_folder_as_model_is_refused_naming_its_checkpoint(tiny_onnx, tiny_t5_dir, tmp_path, capsys):
    from instructrec.cli import main

    assert main(["export", "--model", str(tiny_onnx[0]), "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "already an ONNX export" in err and str(tiny_t5_dir.resolve()) in err
    with pytest.raises(ModelSourceError, match="checkpoint it was made from"):
        export_model(tiny_onnx[0], tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_random_shape_needs_a_tokenizer(tmp_path):
    with pytest.raises(InputError, match="--tokenizer"):
        export_model("random:t5-tiny", tmp_path / "random")
    assert not (tmp_path / "random").exists()


def test_random_shape_exports_loudly(tokenizer_dir, tmp_path, caplog):
    """random:<shape> with --tokenizer: a WARNING at export and at load, random_weights in the
    manifest and the report, and the same seed gives the same graphs."""
    with caplog.at_level(logging.WARNING):
        manifest = export_model("random:t5-tiny", tmp_path / "random", tokenizer=tokenizer_dir, seed=3)
    assert any("RANDOMLY INITIALISED" in r.getMessage() for r in caplog.records)
    assert manifest["random_weights"] is True and manifest["source"] == {
        "spec": "random:t5-tiny", "kind": "random", "shape": "t5-tiny"}
    assert json.loads((tmp_path / "random" / "validation.json").read_text())["random_weights"] is True
    assert manifest["hf_config"]["d_model"] == 64
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        OnnxBackend.load(tmp_path / "random", torch.device("cpu"))
    assert any("RANDOMLY INITIALISED" in r.getMessage() for r in caplog.records)
    # the tokenizer given, copied as it is
    assert (tmp_path / "random" / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_an_export_folder_resolves_with_its_checkpoint_config(tiny_onnx, tiny_t5_dir):
    """resolve_model(export).config() is the config.json dict (format 1 stored the file name there)."""
    from instructrec.engine.sources import ONNX, resolve_model

    source = resolve_model(tiny_onnx[0])
    assert source.kind == ONNX
    assert source.config() == json.loads((tiny_t5_dir / "config.json").read_text())
