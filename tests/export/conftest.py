"""Exports shared by the export tests: one per session, each made once (seconds on 2 shared cores)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_onnx(tiny_t5_dir, tmp_path_factory):
    """The tiny checkpoint exported with defaults: (folder, manifest). About 10 s."""
    from instructrec.export import export_model

    out = tmp_path_factory.mktemp("tiny-onnx") / "export"
    manifest = export_model(tiny_t5_dir, out)
    return out, manifest


@pytest.fixture(scope="session")
def tiny_onnx_with_generation(tiny_t5_dir, tmp_path_factory):
    """The tiny checkpoint with Optimum's generation graphs beside ours and every graph's weights
    in external data: (folder, manifest). About 20 s."""
    from instructrec.export import export_model

    out = tmp_path_factory.mktemp("tiny-onnx-generation") / "export"
    manifest = export_model(tiny_t5_dir, out, with_generation_graphs=True, external_data=True)
    return out, manifest
