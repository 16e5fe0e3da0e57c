"""The batch job on object storage: requests read from s3://bucket/requests/, ranked parts written
to s3://bucket/ranked/ on an S3-compatible server on 127.0.0.1 (tests/engine/s3_loopback.py),
equal to the local run; kill -9 of the job then --resume against the bucket gives the identical
output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from instructrec.engine.batch import run_job, summarize_output
from instructrec.engine.job_faults import FAULT_ENV

from .s3_loopback import s3_loopback, s3_names  # noqa: F401 (a fixture)

ROWS, ROWS_PER_PART, CHUNK_ROWS = 30, 6, 4
OPTIONS = dict(rows_per_part=ROWS_PER_PART, chunk_rows=CHUNK_ROWS, dtype="float32", threads=1)


def requests_table() -> pa.Table:
    ids = [f"s3-req-{i}" for i in range(ROWS)]
    ids[25] = ids[2]  # a duplicate across files
    candidates = [[f"board game {i} edition {j}" for j in range(2 + i % 4)] for i in range(ROWS)]
    candidates[9] = []
    return pa.table({"request_id": ids, "candidates": candidates,
                     "instruction": [f"Pick a game for a fan of strategy title {i}" for i in range(ROWS)]})


def write_requests(table: pa.Table, folder: str, filesystem=None) -> None:
    """Two files, row groups that straddle parts and chunks."""
    pq.write_table(table.slice(0, 17), f"{folder}/a.parquet", filesystem=filesystem, row_group_size=5)
    pq.write_table(table.slice(17), f"{folder}/b.parquet", filesystem=filesystem, row_group_size=5)


def test_requests_from_s3_ranked_into_s3_equal_the_local_run(s3_loopback, tiny_t5_dir, tmp_path):
    bucket, s3 = s3_loopback
    table = requests_table()
    (tmp_path / "requests").mkdir()
    write_requests(table, str(tmp_path / "requests"))
    write_requests(table, bucket.removeprefix("s3://") + "/requests", s3)

    local = run_job(tiny_t5_dir, tmp_path / "requests", tmp_path / "ranked", progress=False, **OPTIONS)
    remote = run_job(tiny_t5_dir, f"{bucket}/requests/", f"{bucket}/ranked/", progress=False, **OPTIONS)

    prefix = bucket.removeprefix("s3://") + "/ranked"
    names = s3_names(s3, prefix)
    assert [n for n in names if n.startswith("part-")] == [f"part-{i:05d}.parquet" for i in range(5)]
    assert [n for n in names if n.startswith("_commit-")] == [f"_commit-{i:05d}.json" for i in range(5)]
    assert "_job.json" in names and "_summary.json" in names and not [n for n in names if n.startswith(".")]
    ranked = pq.read_table(f"{prefix}/", filesystem=s3)
    assert ranked.equals(pq.read_table(tmp_path / "ranked"))
    for key in ("rows", "ok", "errors", "errors_by_kind", "candidates", "parts"):
        assert remote[key] == local[key], key
    assert remote["errors_by_kind"] == {"duplicate_request_id": 2, "invalid_input": 1}
    assert summarize_output(f"{bucket}/ranked") == {k: local[k] for k in
                                                    ("rows", "ok", "errors", "errors_by_kind", "candidates")}
    with s3.open_input_stream(f"{prefix}/_job.json") as stream:
        manifest = json.loads(stream.read())
    assert manifest["input"]["path"] == f"{bucket}/requests"
    assert [f["path"] for f in manifest["input"]["files"]] == [f"{bucket}/requests/a.parquet",
                                                               f"{bucket}/requests/b.parquet"]


def test_kill_9_then_resume_against_the_bucket_gives_the_identical_output(s3_loopback, tiny_t5_dir, tmp_path):
    bucket, s3 = s3_loopback
    table = requests_table()
    (tmp_path / "requests").mkdir()
    write_requests(table, str(tmp_path / "requests"))
    write_requests(table, bucket.removeprefix("s3://") + "/kill-requests", s3)
    run_job(tiny_t5_dir, tmp_path / "requests", tmp_path / "reference", progress=False, **OPTIONS)

    command = [sys.executable, "-m", "instructrec", "rerank", "--model", str(tiny_t5_dir),
               "--input", f"{bucket}/kill-requests", "--output", f"{bucket}/kill-ranked",
               "--rows-per-part", str(ROWS_PER_PART), "--chunk-rows", str(CHUNK_ROWS), "--dtype", "float32",
               "--threads", "1", "--no-progress"]
    # Killed with part 2 half written (parts 0 and 1 committed).
    killed = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, FAULT_ENV: "kill-in-part:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    prefix = bucket.removeprefix("s3://") + "/kill-ranked"
    assert [n for n in s3_names(s3, prefix) if n.startswith("_commit-")] == ["_commit-00000.json",
                                                                             "_commit-00001.json"]

    # Resumed (in this process: a second interpreter start would only cost time).
    summary = run_job(tiny_t5_dir, f"{bucket}/kill-requests", f"{bucket}/kill-ranked", resume=True, progress=False,
                      **OPTIONS)
    assert summary["parts_written"] == 3 and summary["parts_skipped"] == 2 and summary["resumed"] is True
    assert not [n for n in s3_names(s3, prefix) if n.startswith(".")]  # no debris left
    assert pq.read_table(f"{prefix}/", filesystem=s3).equals(pq.read_table(tmp_path / "reference"))
    for index in range(5):
        name = f"part-{index:05d}.parquet"
        assert pq.read_table(f"{prefix}/{name}", filesystem=s3).equals(pq.read_table(tmp_path / "reference" / name))
