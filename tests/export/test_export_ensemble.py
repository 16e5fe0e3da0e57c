"""An ensemble of two ONNX exports ranks as the ensemble of the checkpoints they came from: the
engine holds one device runner per backend, whatever the backend."""

from __future__ import annotations

import pytest

from instructrec.engine import Reranker

from ..conftest import TINY_T5, build_t5_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_an_ensemble_of_exports_scores_as_the_ensemble_of_their_checkpoints(tiny_t5_dir, tiny_onnx, tokenizer_dir,
                                                                          tmp_path):
    pytest.importorskip("onnxruntime", reason="the export needs the `onnx` extra")
    from instructrec.export import export_model

    second = build_t5_checkpoint(tmp_path / "seed-1", tokenizer_dir, TINY_T5, seed=1)
    export_model(second, tmp_path / "seed-1-export")
    instruction = "The user bought Halo 3 and Forza Motorsport. Recommend what they buy next."
    titles = ["Tetris", "Gears of War 2", "Mario Kart 8 Deluxe", "Logitech G502 Gaming Mouse", "Z"]
    exports = Reranker.from_pretrained([tiny_onnx[0], tmp_path / "seed-1-export"])
    checkpoints = Reranker.from_pretrained([tiny_t5_dir, second], backend="torch", dtype="float32")
    assert [type(b).__name__ for b in exports.backends] == ["OnnxBackend", "OnnxBackend"]
    for form in ("sum", "calibrated:0.5"):
        assert exports.score(instruction, titles, normalize=form) == pytest.approx(
            checkpoints.score(instruction, titles, normalize=form), abs=1e-4)
