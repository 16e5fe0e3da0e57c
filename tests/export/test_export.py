"""ONNX export (Optimum custom configs) + onnxruntime backend, on the tiny random-weight T5 with the
real tokenizer: the export validates itself, the onnx backend scores like the torch backend,
partial / corrupted directories fail naming the file, and validation failures are raised once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from instructrec.engine import InputError, ModelLoadError, Reranker, Request
from instructrec.engine.onnx_backend import GRAPH_FILES, GRAPH_IO, MANIFEST_NAME, OnnxBackend, sha256_file
from instructrec.export import ExportError, ExportValidationError, export_model, validate_export
from instructrec.export.graphs import GRAPH_NAMES, graph_inputs, graph_outputs

# tests/conftest.py's tiny shape (conftest is not importable under --import-mode=importlib)
TINY_T5 = dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=32128)


def _other_tiny_checkpoint(out: Path, tokenizer_dir: Path) -> Path:
    """The tiny shape with other random weights (seed 1)."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(1)
    T5ForConditionalGeneration(T5Config(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **TINY_T5)
                               ).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


# Model tests run on one torch thread (see the one_torch_thread fixture in conftest).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------ export directory
def test_export_directory_is_self_describing(tiny_onnx, tiny_t5_dir):
    out, manifest = tiny_onnx
    on_disk = json.loads((out / MANIFEST_NAME).read_text())
    assert on_disk == manifest
    assert manifest["format"] == "instructrec-onnx" and manifest["format_version"] == 2
    assert manifest["dtype"] == "float32" and manifest["opset"] == 18
    assert set(manifest["graphs"]) == set(GRAPH_NAMES)
    for name, entry in manifest["graphs"].items():
        assert entry["file"] == GRAPH_FILES[name]
        file = out / entry["file"]
        assert entry["sha256"] == sha256_file(file) and entry["bytes"] == file.stat().st_size
        assert tuple(entry["inputs"]) == GRAPH_IO[name][0] and tuple(entry["outputs"]) == GRAPH_IO[name][1]
    # the checkpoint's own config.json, byte for byte (not Optimum's rewrite with export_model_type)
    assert (out / "config.json").read_bytes() == (tiny_t5_dir / "config.json").read_bytes()
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(manifest["tokenizer_files"])
    assert manifest["t5_config"]["d_model"] == TINY_T5["d_model"]
    assert {"torch", "onnxruntime", "optimum-onnx"} <= set(manifest["versions"])
    # the config.json dict itself (what ModelSource.config() of an export folder returns)
    assert manifest["hf_config"] == json.loads((tiny_t5_dir / "config.json").read_text())
    assert manifest["source"] == {"spec": str(tiny_t5_dir), "kind": "checkpoint", "path": str(tiny_t5_dir.resolve())}
    assert manifest["random_weights"] is False and manifest["generation_graphs"] == []


def test_validation_report_covers_every_graph_and_shape(tiny_onnx):
    out, _ = tiny_onnx
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] is True and report["atol"] == 1e-4
    graphs = {}
    for r in report["results"]:
        graphs.setdefault(r["graph"], []).append(r)
        assert r["passed"] and r["max_abs_diff"] <= r["tolerance"]
    assert set(graphs) == set(GRAPH_NAMES) | {"chain_vs_transformers"}
    for name in GRAPH_NAMES:
        assert len({r["case"] for r in graphs[name]}) == 3  # three shapes per graph
    # the whole chain against transformers' own forward, on sums of token log-probs
    assert graphs["chain_vs_transformers"][0]["max_abs_diff"] < 1e-3


def test_optimum_config_names_match_the_engine(tiny_onnx):
    for name in GRAPH_NAMES:
        assert (tuple(graph_inputs(name)), tuple(graph_outputs(name))) == GRAPH_IO[name]


# ------------------------------------------------------------------------ scores: torch vs onnx
TITLES = ["Tetris", "Halo 3 - Xbox 360",
          "The Legend of Zelda: Breath of the Wild - Nintendo Switch (Special Edition, 2017)",
          "Logitech G502 HERO High Performance Wired Gaming Mouse, 25K Sensor", "FIFA 19", "Minecraft"]


@pytest.fixture(scope="module")
def pair(tiny_onnx, tiny_t5_dir):
    out, _ = tiny_onnx
    torch_rr = Reranker.from_pretrained(tiny_t5_dir, dtype="float32", max_source_tokens=256)
    onnx_rr = Reranker.from_pretrained(out, backend="onnx", max_source_tokens=256)
    return torch_rr, onnx_rr


def _close(a, b):
    # 1e-4 absolute, plus fp32's relative rounding of a sum (3e-7, as tests/engine/test_scoring.py):
    # the random tiny model gives ~-24 per token, so a 35-token title scores -839, where one
    # fp32 ulp is 6e-5 and the backends differ by 1.3e-4 (1.5e-7 relative).
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=3e-7, atol=1e-4)


def test_scores_equal_torch_backend(pair):
    torch_rr, onnx_rr = pair
    instruction = "The user played Mario Kart 8 and Super Smash Bros. Recommend the next game."
    _close(onnx_rr.score(instruction, TITLES), torch_rr.score(instruction, TITLES))
    _close(onnx_rr.score(instruction, TITLES, normalize="mean"), torch_rr.score(instruction, TITLES, normalize="mean"))
    _close(onnx_rr.score(instruction, ["Tetris"]), torch_rr.score(instruction, ["Tetris"]))  # one candidate


def test_rank_many_requests_and_tournament_equal_torch_backend(pair):
    torch_rr, onnx_rr = pair
    rng = np.random.default_rng(3)
    requests = [Request(request_id=f"r{i}", instruction=f"Request {i}: recommend something for a fan of "
                        + " and ".join(TITLES[: 1 + i % 4]),
                        candidates=[TITLES[j] for j in rng.permutation(len(TITLES))[: 1 + i % 6]])
                for i in range(13)]
    # listed candidates: 23 titles in groups of 10 -> a grouped tournament (several rounds)
    listed = [f"{t} ({k})" for k in range(4) for t in TITLES][:23]
    requests.append(Request(request_id="tour", candidates=listed,
                            instruction="Pick the best game for a racing fan among:\n{candidates}"))
    torch_rr.reset_stats()
    onnx_rr.reset_stats()
    got, want = onnx_rr.rank(requests), torch_rr.rank(requests)
    for g, w in zip(got, want):
        assert g.request_id == w.request_id and g.error is None
        assert g.ranked_ids == w.ranked_ids
        _close(g.scores, w.scores)
    # one planning / packing path: identical work counters
    assert onnx_rr.stats.as_dict() == torch_rr.stats.as_dict()
    assert onnx_rr.stats.encoder_passes > len(requests)  # the tournament encoded several groups


# ------------------------------------------------------------------- partial / corrupted exports
SOURCE, CROSS_KV, CANDIDATES, LOGPROBS = (GRAPH_FILES[n] for n in GRAPH_NAMES)


@pytest.mark.parametrize("damage, names", [
    ("delete the candidates graph", CANDIDATES),
    ("truncate the logprobs graph", LOGPROBS),
    ("flip a byte of the source graph", SOURCE),
    ("delete the manifest", MANIFEST_NAME),
    ("delete the tokenizer", "tokenizer.json"),
    ("drop a graph from the manifest", MANIFEST_NAME),
])
def test_broken_export_names_the_file(tiny_onnx, tmp_path, damage, names):
    out = _copy(tiny_onnx[0], tmp_path / "copy")
    if damage == "delete the candidates graph":
        (out / CANDIDATES).unlink()
    elif damage == "truncate the logprobs graph":
        data = (out / LOGPROBS).read_bytes()
        (out / LOGPROBS).write_bytes(data[: len(data) // 2])
    elif damage == "flip a byte of the source graph":
        data = bytearray((out / SOURCE).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (out / SOURCE).write_bytes(bytes(data))
    elif damage == "delete the manifest":
        (out / MANIFEST_NAME).unlink()
    elif damage == "delete the tokenizer":
        (out / "tokenizer.json").unlink()
    else:
        m = json.loads((out / MANIFEST_NAME).read_text())
        del m["graphs"]["encoder_kv"]
        (out / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ModelLoadError) as e:
        Reranker.from_pretrained(out, backend="onnx")
    assert names in str(e.value)


def test_truncated_graph_without_checksums_fails_in_onnxruntime_naming_the_file(tiny_onnx, tmp_path):
    out = _copy(tiny_onnx[0], tmp_path / "copy")
    data = (out / CANDIDATES).read_bytes()
    (out / CANDIDATES).write_bytes(data[:1000])
    with pytest.raises(ModelLoadError, match=rf"{CANDIDATES}: onnxruntime cannot load"):
        OnnxBackend.load(out, torch.device("cpu"), checksums=False)


def test_checkpoint_dir_given_to_onnx_backend(tiny_t5_dir):
    with pytest.raises(InputError, match="instructrec export"):
        Reranker.from_pretrained(tiny_t5_dir, backend="onnx")


def test_bf16_refused_on_cpu_with_the_fix(tiny_onnx, tiny_t5_dir, tmp_path):
    with pytest.raises(ExportError, match="export --dtype float32"):
        export_model(tiny_t5_dir, tmp_path / "bf16", dtype="bfloat16")
    assert not (tmp_path / "bf16").exists()  # refused before anything was written
    with pytest.raises(InputError, match="holds float32 graphs"):
        Reranker.from_pretrained(tiny_onnx[0], backend="onnx", dtype="bfloat16")
    out = _copy(tiny_onnx[0], tmp_path / "copy")
    m = json.loads((out / MANIFEST_NAME).read_text())
    m["dtype"] = "bfloat16"  # what a GPU bf16 export says
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(InputError, match="CPU execution provider cannot run"):
        Reranker.from_pretrained(out, backend="onnx", dtype="auto")


def test_export_refuses_a_non_empty_output(tiny_t5_dir, tiny_onnx):
    from instructrec.cli import main

    with pytest.raises(ExportError, match="not empty"):
        export_model(tiny_t5_dir, tiny_onnx[0])
    assert main(["export", "--model", str(tiny_t5_dir), "--out", str(tiny_onnx[0])]) == 2


# --------------------------------------------------------------------------- validation failures
def test_validation_against_another_checkpoint_lists_every_mismatch_once(tiny_onnx, tokenizer_dir, tmp_path):
    other = _other_tiny_checkpoint(tmp_path / "other", tokenizer_dir)
    out = _copy(tiny_onnx[0], tmp_path / "copy")
    with pytest.raises(ExportValidationError) as e:
        validate_export(out, other)
    failed = {m.graph for m in e.value.mismatches}
    assert failed == set(GRAPH_NAMES) | {"chain_vs_transformers"}
    # every failing graph/shape is in the one message, with its numbers
    assert len(e.value.mismatches) == 3 * len(GRAPH_NAMES) + 1
    for m in e.value.mismatches:
        assert m.max_abs_diff > m.tolerance and f"{m.graph}/{m.output} [{m.case}]" in str(e.value)
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] is False and sum(not r["passed"] for r in report["results"]) == len(e.value.mismatches)


def test_zero_tolerance_fails_only_outputs_that_differ(tiny_onnx, tiny_t5_dir, tmp_path):
    out = _copy(tiny_onnx[0], tmp_path / "copy")
    with pytest.raises(ExportValidationError) as e:
        validate_export(out, tiny_t5_dir, atol=0.0)
    report = json.loads((out / "validation.json").read_text())
    differing = {(r["graph"], r["case"]) for r in report["results"] if r["max_abs_diff"] > 0}
    assert {(m.graph, m.case) for m in e.value.mismatches} == differing
    assert {"encoder", "decoder"} <= {m.graph for m in e.value.mismatches}  # float rounding is never all-zero
