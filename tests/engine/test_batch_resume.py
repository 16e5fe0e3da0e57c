"""Resume after kill -9 of a real `instructrec rerank` subprocess, at several points, equals an
uninterrupted run row for row (bit for bit: same parts, same chunks, same scores)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from instructrec.engine.batch import run_job

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


def start_rerank(model: Path, input_path: Path, output: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "instructrec", "rerank", "--model", str(model), "--input", str(input_path),
         "--output", str(output), "--rows-per-part", str(ROWS_PER_PART), "--chunk-rows", str(CHUNK_ROWS),
         "--dtype", "float32", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when(process: subprocess.Popen, ready, timeout: float = 240.0) -> None:
    """kill -9 the process as soon as `ready()` holds; fail if it finished first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the job ended before the kill point:\n{process.stderr.read()}"
        assert time.monotonic() < deadline, "kill point not reached in time"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL


def parts_in(output: Path) -> list[str]:
    return sorted(p.name for p in output.glob("part-*.parquet"))


def temps_in(output: Path) -> list[str]:
    return sorted(p.name for p in output.glob(".part-*"))


def test_kill_9_at_several_points_then_resume_equals_an_uninterrupted_run(tiny_t5_dir, tmp_path):
    input_path = tmp_path / "requests.parquet"
    write_input(input_path)
    reference = run_job(tiny_t5_dir, input_path, tmp_path / "reference", rows_per_part=ROWS_PER_PART,
                        chunk_rows=CHUNK_ROWS, dtype="float32", progress=False)
    assert reference["errors_by_kind"] == {"duplicate_request_id": 2}
    output = tmp_path / "out"

    # 1. Killed right after the first part appears.
    first = start_rerank(tiny_t5_dir, input_path, output)
    kill_when(first, lambda: (output / "part-00000.parquet").exists())
    assert parts_in(output)[0] == "part-00000.parquet" and len(parts_in(output)) < 5

    # 2. Resumed, then killed in the middle of part 3 (its temp file is open).
    second = start_rerank(tiny_t5_dir, input_path, output, "--resume")
    kill_when(second, lambda: (output / ".part-00003.parquet.tmp").exists())
    assert parts_in(output) == [f"part-{i:05d}.parquet" for i in range(3)]
    assert temps_in(output) == [".part-00003.parquet.tmp"]

    # 3. Resumed to the end: finished parts skipped, the leftover temp file removed.
    third = start_rerank(tiny_t5_dir, input_path, output, "--resume")
    stdout, stderr = third.communicate(timeout=240)
    assert third.returncode == 0, stderr
    assert temps_in(output) == []
    assert parts_in(output) == [f"part-{i:05d}.parquet" for i in range(5)]
    resumed = pq.read_table(output)
    assert resumed.equals(pq.read_table(tmp_path / "reference"))  # row for row, bit for bit
    for index in range(5):
        name = f"part-{index:05d}.parquet"
        assert pq.read_table(output / name).equals(pq.read_table(tmp_path / "reference" / name))

    summary = json.loads((output / "_summary.json").read_text())
    assert summary["parts_skipped"] == 3 and summary["parts_written"] == 2 and summary["resumed"] is True
    assert summary["rows"] == ROWS and summary["rows_ranked"] == 2 * ROWS_PER_PART
    assert summary["errors_by_kind"] == reference["errors_by_kind"]
    assert "req/s" in stderr  # the progress bar, with its rate
    assert f"rows        {ROWS}  (ok {ROWS - 2}, errors 2)" in stdout
    assert "parts       5 (written 2, skipped 3)" in stdout
