"""Resume after kill -9 of a real `instructrec rerank` subprocess, at exact points chosen with the
job's fault-injection hook (engine/job_faults.py), equals an uninterrupted run row for row (bit for
bit: same parts, same chunks, same scores)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from instructrec.engine.batch import run_job
from instructrec.engine.job_faults import FAULT_ENV

ROWS, ROWS_PER_PART, CHUNK_ROWS = 60, 12, 4


def write_input(path: Path) -> None:
    ids = [f"req-{i:03d}" for i in range(ROWS)]
    ids[55] = ids[3]  # a duplicate across parts: resume must still reject both occurrences
    table = pa.table({
        "request_id": ids,
        "candidates": [[f"space adventure {i} part {j}" for j in range(2 + i % 5)] for i in range(ROWS)],
        "instruction": [f"Which game suits a player who loved title {i}?" if i != 30 else None for i in range(ROWS)],
        "history": [None if i != 30 else ["Halo", "Doom"] for i in range(ROWS)],
    })
    pq.write_table(table, path, row_group_size=13)  # row groups straddle parts and chunks


def rerank(model: Path, input_path: Path, output: Path, *extra: str, fault: str | None = None,
           timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run(
        [sys.executable, "-m", "instructrec", "rerank", "--model", str(model), "--input", str(input_path),
         "--output", str(output), "--rows-per-part", str(ROWS_PER_PART), "--chunk-rows", str(CHUNK_ROWS),
         "--dtype", "float32", *extra],
        capture_output=True, text=True, env=env, timeout=timeout)


def names(output: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in output.glob(pattern))


def test_kill_9_at_exact_points_then_resume_equals_an_uninterrupted_run(tiny_t5_dir, tmp_path):
    input_path = tmp_path / "requests.parquet"
    write_input(input_path)
    reference = run_job(tiny_t5_dir, input_path, tmp_path / "reference", rows_per_part=ROWS_PER_PART,
                        chunk_rows=CHUNK_ROWS, dtype="float32", progress=False)
    assert reference["errors_by_kind"] == {"duplicate_request_id": 2}
    output = tmp_path / "out"

    # 1. Killed right after part 0 is committed.
    first = rerank(tiny_t5_dir, input_path, output, fault="kill-after-part:0")
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert names(output, "part-*") == ["part-00000.parquet"] and names(output, "_commit-*") == ["_commit-00000.json"]
    assert names(output, ".*") == []

    # 2. Resumed, then killed in the middle of part 3 (its first chunk is in the temp file).
    second = rerank(tiny_t5_dir, input_path, output, "--resume", fault="kill-in-part:3")
    assert second.returncode == -signal.SIGKILL, second.stderr
    assert names(output, "part-*") == [f"part-{i:05d}.parquet" for i in range(3)]
    [temp] = names(output, ".*")
    assert temp.startswith(".part-00003.") and temp.endswith(".parquet.tmp")

    # 3. Resumed to the end: finished parts skipped, the leftover temp file removed.
    third = rerank(tiny_t5_dir, input_path, output, "--resume")
    assert third.returncode == 0, third.stderr
    assert names(output, ".*") == [] and names(output, "_job.lock") == []
    assert names(output, "part-*") == [f"part-{i:05d}.parquet" for i in range(5)]
    resumed = pq.read_table(output)
    assert resumed.equals(pq.read_table(tmp_path / "reference"))  # row for row, bit for bit
    for index in range(5):
        name = f"part-{index:05d}.parquet"
        assert pq.read_table(output / name).equals(pq.read_table(tmp_path / "reference" / name))

    summary = json.loads((output / "_summary.json").read_text())
    assert summary["parts_skipped"] == 3 and summary["parts_written"] == 2 and summary["resumed"] is True
    assert summary["rows"] == ROWS and summary["rows_ranked"] == 2 * ROWS_PER_PART
    assert summary["errors_by_kind"] == reference["errors_by_kind"]
    assert "req/s" in third.stderr  # the progress bar, with its rate
    assert f"rows        {ROWS}  (ok {ROWS - 2}, errors 2)" in third.stdout
    assert "parts       5 (written 2, skipped 3)" in third.stdout


def test_a_part_without_its_commit_record_is_ranked_again(tiny_t5_dir, tmp_path):
    """A kill between publishing a part and writing its record leaves the part without its
    commit: it does not count, and --resume writes it again."""
    input_path = tmp_path / "requests.parquet"
    write_input(input_path)
    options = dict(rows_per_part=ROWS_PER_PART, chunk_rows=CHUNK_ROWS, dtype="float32", progress=False)
    run_job(tiny_t5_dir, input_path, tmp_path / "out", **options)
    reference = pq.read_table(tmp_path / "out")
    (tmp_path / "out" / "_commit-00001.json").unlink()
    summary = run_job(tiny_t5_dir, input_path, tmp_path / "out", resume=True, **options)
    assert summary["parts_written"] == 1 and summary["parts_skipped"] == 4 and summary["rows"] == ROWS
    assert pq.read_table(tmp_path / "out").equals(reference)


def test_calibrated_scores_of_a_resumed_part_are_bit_identical(tiny_t5_dir, tmp_path):
    """normalize="calibrated" caches each title's prior, and a prior's last bits depend on the batch
    it was scored in. Titles shared across parts: in the first run part 1 finds part 0's priors
    cached, in the resumed run it scores them itself; the job clears the cache at every part, so
    both runs give the same bits (and the manifest records the score form)."""
    catalogue = [f"starship tactics volume {k}" for k in range(23)]
    table = pa.table({
        "request_id": [f"req-{i:03d}" for i in range(ROWS)],
        "candidates": [[catalogue[(5 * i + 3 * j) % len(catalogue)] for j in range(3 + i % 4)] for i in range(ROWS)],
        "instruction": [f"Which game suits a player who loved title {i}?" for i in range(ROWS)],
    })
    pq.write_table(table, tmp_path / "requests.parquet", row_group_size=13)
    options = dict(rows_per_part=ROWS_PER_PART, chunk_rows=CHUNK_ROWS, dtype="float32", progress=False,
                   normalize="calibrated")
    run_job(tiny_t5_dir, tmp_path / "requests.parquet", tmp_path / "out", **options)
    reference = pq.read_table(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "_job.json").read_text())["options"]["normalize"] == "calibrated"
    for part in (1, 3):
        (tmp_path / "out" / f"_commit-{part:05d}.json").unlink()
    summary = run_job(tiny_t5_dir, tmp_path / "requests.parquet", tmp_path / "out", resume=True, **options)
    assert summary["parts_written"] == 2 and summary["engine_stats"]["title_priors"] > 0
    assert pq.read_table(tmp_path / "out").equals(reference)
