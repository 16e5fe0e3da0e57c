"""The job on Ray Data (a local Ray instance on 127.0.0.1, two CPU actors) writes exactly the
in-process job's output: the same parts, bit for bit. Ray is the optional `ray` extra (in the dev
extra); its tests skip where it is not installed."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructrec.cli import main as cli_main
from instructrec.engine.batch import OUTPUT_SCHEMA, run_job


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance for the module (starting one takes seconds): 3 logical CPUs, for two
    1-CPU actors and Ray Data's own tasks."""
    ray = pytest.importorskip("ray", reason="Ray Data is the optional `ray` extra: pip install 'instructrec[ray]'")
    ray.init(address="local", num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="warning")
    yield ray
    ray.shutdown()


def write_inputs(folder, rows=48):
    folder.mkdir()
    ids = [f"q{i}" for i in range(rows)]
    ids[40] = ids[7]  # duplicate across files
    ids[12] = None
    candidates = [[f"puzzle game {i} volume {j}" for j in range(2 + i % 4)] for i in range(rows)]
    candidates[20] = []
    table = pa.table({"request_id": ids, "candidates": candidates,
                      "instruction": [f"Suggest a game for someone who liked number {i}" for i in range(rows)]})
    pq.write_table(table.slice(0, 30), folder / "a.parquet", row_group_size=8)
    pq.write_table(table.slice(30), folder / "b.parquet", row_group_size=8)


def part_names(folder):
    return sorted(p.name for p in folder.glob("part-*"))


def test_ray_job_equals_the_in_process_job(ray_cluster, tiny_t5_dir, tmp_path):
    from instructrec.engine.ray_job import run_ray_job

    write_inputs(tmp_path / "in")
    options = dict(rows_per_part=10, chunk_rows=4, dtype="float32", threads=1)
    expected_summary = run_job(tiny_t5_dir, tmp_path / "in", tmp_path / "local", progress=False, **options)
    summary = run_ray_job(tiny_t5_dir, tmp_path / "in", tmp_path / "ray", actors=2, **options)

    local, distributed = pq.read_table(tmp_path / "local"), pq.read_table(tmp_path / "ray")
    assert distributed.schema == OUTPUT_SCHEMA and distributed.num_rows == 48
    assert part_names(tmp_path / "ray") == part_names(tmp_path / "local") == [f"part-{i:05d}.parquet"
                                                                            for i in range(5)]
    # Same parts, same chunks, same engine: the same bits.
    assert distributed.equals(local)
    for key in ("rows", "ok", "errors", "errors_by_kind", "candidates", "parts"):
        assert summary[key] == expected_summary[key], key
    assert summary["errors_by_kind"] == {"duplicate_request_id": 2, "invalid_input": 1, "missing_request_id": 1}
    assert summary["runner"] == "ray" and summary["parts_written"] == 5


def test_ray_on_cuda_without_gpus_per_actor_is_refused_before_any_work(tiny_t5_dir, tmp_path, caplog):
    """Without a GPU reserved per actor, Ray starts the actors with no GPU visible and the model
    load fails inside them, with a traceback: refused up front instead. Needs neither CUDA nor Ray."""
    write_inputs(tmp_path / "in")
    assert cli_main(["rerank", "--ray", "--device", "cuda", "--model", str(tiny_t5_dir), "--input",
                     str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 2
    assert "--ray --device cuda needs GPUs reserved for each actor" in caplog.text
    assert "pass --gpus-per-actor 1" in caplog.text
    assert not (tmp_path / "out").exists()
    caplog.clear()
    assert cli_main(["rerank", "--ray", "--device", "cuda", "--gpus-per-actor", "0", "--model", str(tiny_t5_dir),
                     "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]) == 2
    assert "gpus_per_actor: is 0 with --device cuda" in caplog.text
