"""engine/sources.py: one resolver for folders, Hub ids (through a real offline HF cache layout)
and random:<shape>; bare shape names are refused with both spellings named."""

from __future__ import annotations

import json
import logging

import pytest

from instructrec.engine.errors import ModelLoadError
from instructrec.engine.presets import SHAPES
from instructrec.engine.sources import (CHECKPOINT, ONNX, RANDOM, EXPORT_MANIFEST_NAME, ModelSourceError,
                                        resolve_model)

from ..conftest import TINY_HUB_COMMIT, TINY_HUB_ID, populate_hf_cache


def test_local_folder_is_used_as_it_is(tiny_t5_dir):
    source = resolve_model(str(tiny_t5_dir))
    assert source.kind == CHECKPOINT and source.path == tiny_t5_dir.resolve()
    assert source.repo_id is None and source.commit is None
    assert source.config()["d_model"] == 64


def test_export_folder_is_recognised_by_its_manifest(tmp_path):
    (tmp_path / EXPORT_MANIFEST_NAME).write_text(json.dumps({"t5_config": {"d_model": 8}}))
    source = resolve_model(tmp_path)
    assert source.kind == ONNX and source.config() == {"d_model": 8}
    with pytest.raises(ModelSourceError, match="ONNX export"):
        resolve_model(tmp_path, allowed=(CHECKPOINT,))


def test_hub_id_resolves_from_the_offline_cache(offline_hf_home, tiny_t5_dir):
    source = resolve_model(TINY_HUB_ID)
    assert source.kind == CHECKPOINT
    assert source.repo_id == TINY_HUB_ID and source.commit == TINY_HUB_COMMIT
    assert source.path == offline_hf_home / "hub" / "models--instructrec-tests--tiny-t5" / "snapshots" / TINY_HUB_COMMIT
    assert (source.path / "config.json").read_bytes() == (tiny_t5_dir / "config.json").read_bytes()
    assert source.identity()["commit"] == TINY_HUB_COMMIT


def test_hub_revision_selects_a_ref(offline_hf_home, tiny_t5_dir):
    other = "fedcba9876543210fedcba9876543210fedcba98"
    populate_hf_cache(offline_hf_home, TINY_HUB_ID, tiny_t5_dir, other, refs=("v2",))
    assert resolve_model(TINY_HUB_ID, revision="v2").commit == other
    assert resolve_model(TINY_HUB_ID, revision=TINY_HUB_COMMIT).commit == TINY_HUB_COMMIT
    assert resolve_model(TINY_HUB_ID).commit == TINY_HUB_COMMIT


def test_uncached_hub_id_offline_names_the_id_and_the_fetch(offline_hf_home):
    with pytest.raises(ModelSourceError) as info:
        resolve_model("google/flan-t5-base")
    message = str(info.value)
    assert "google/flan-t5-base" in message and "HF_HUB_OFFLINE" in message
    assert "huggingface-cli download google/flan-t5-base" in message
    assert info.value.field == "model"


@pytest.mark.parametrize("name", ["flan-t5-xl", "t5-mini", "flan-t5-base/"])
def test_bare_shape_names_are_refused_with_both_spellings(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    with pytest.raises(ModelSourceError) as info:
        resolve_model(name)
    message = str(info.value)
    bare = name.rstrip("/")
    assert f"random:{bare}" in message
    assert ("google/" + bare in message) == (bare != "t5-mini")


def test_random_shapes_warn_and_carry_their_config(caplog):
    with caplog.at_level(logging.WARNING, logger="instructrec.engine.sources"):
        source = resolve_model("random:t5-tiny")
    assert source.kind == RANDOM and source.is_random and source.path is None
    assert source.config() == dict(SHAPES["t5-tiny"])
    assert any("RANDOM" in r.message for r in caplog.records if r.levelno == logging.WARNING)
    with pytest.raises(ModelSourceError, match="unknown random shape"):
        resolve_model("random:t5-huge")
    with pytest.raises(ModelSourceError, match="random-weight"):
        resolve_model("random:t5-tiny", allowed=(CHECKPOINT, ONNX))


def test_folders_that_are_no_model_and_unknown_names(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="not a model folder"):
        resolve_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="is a file"):
        resolve_model(tmp_path / "weights.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError, match="not an existing folder"):
        resolve_model("no-such-model")
    with pytest.raises(ModelSourceError, match="--revision"):
        resolve_model(tmp_path, revision="main")
