"""The job on Ray Data (a local Ray instance on 127.0.0.1, two CPU actors) gives the same rows
and scores as the in-process job. Skipped where Ray is not installed (it is the `ray` extra)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructrec.engine.batch import OUTPUT_SCHEMA, run_job

ray = pytest.importorskip("ray", reason="Ray Data is the optional `ray` extra: pip install 'instructrec[ray]'")


def write_inputs(folder):
    folder.mkdir()
    rows = 48
    ids = [f"q{i}" for i in range(rows)]
    ids[40] = ids[7]  # duplicate across files
    ids[12] = None
    candidates = [[f"puzzle game {i} volume {j}" for j in range(2 + i % 4)] for i in range(rows)]
    candidates[20] = []
    table = pa.table({"request_id": ids, "candidates": candidates,
                      "instruction": [f"Suggest a game for someone who liked number {i}" for i in range(rows)]})
    pq.write_table(table.slice(0, 30), folder / "a.parquet", row_group_size=8)
    pq.write_table(table.slice(30), folder / "b.parquet", row_group_size=8)


def test_ray_job_equals_the_in_process_job(tiny_t5_dir, tmp_path):
    from instructrec.engine.ray_job import run_ray_job

    write_inputs(tmp_path / "in")
    expected_summary = run_job(tiny_t5_dir, tmp_path / "in", tmp_path / "local", chunk_rows=8, dtype="float32",
                               progress=False)
    ray.init(address="local", num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="warning")
    try:
        summary = run_ray_job(tiny_t5_dir, tmp_path / "in", tmp_path / "ray", actors=2, chunk_rows=8, dtype="float32")
    finally:
        ray.shutdown()

    local, distributed = pq.read_table(tmp_path / "local"), pq.read_table(tmp_path / "ray")
    assert distributed.schema == OUTPUT_SCHEMA and distributed.num_rows == 48
    for column in ("request_id", "ranked_ids", "error", "error_kind", "n_candidates"):
        assert distributed.column(column).to_pylist() == local.column(column).to_pylist(), column
    # Ray cuts batches at its block boundaries, the local job at chunk boundaries: float32 sums
    # in another order (~1e-7 relative), same function.
    for got, want in zip(distributed.column("scores").to_pylist(), local.column("scores").to_pylist()):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    for key in ("rows", "ok", "errors", "errors_by_kind", "candidates"):
        assert summary[key] == expected_summary[key], key
    assert summary["errors_by_kind"] == {"duplicate_request_id": 2, "invalid_input": 1, "missing_request_id": 1}
