"""The job on Ray Data, on a local Ray cluster on 127.0.0.1 with two 1-CPU actors: it writes
exactly the in-process job's output (the same parts, bit for bit); an actor killed mid-part by its
pid is restarted by Ray and the output is complete; a driver killed mid-job is finished by
`--resume`, here against an S3-compatible server on loopback. Ray is the optional `ray` extra (in
the dev extra); these tests skip where it is not installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructrec.cli import main as cli_main
from instructrec.engine.batch import OUTPUT_SCHEMA, run_job
from instructrec.engine.job_faults import FAULT_DIR_ENV, FAULT_ENV

from .s3_loopback import s3_loopback, s3_names  # noqa: F401 (a fixture)

OPTIONS = dict(rows_per_part=10, chunk_rows=4, dtype="float32", threads=1)


@pytest.fixture(scope="module")
def ray_cluster(s3_loopback):
    """One local Ray cluster for the module (starting one takes seconds): 3 logical CPUs, for two
    1-CPU actors and Ray Data's own tasks. Started after the S3 server, so that its workers inherit
    the S3 settings. Other drivers (a `rerank --ray` subprocess) join it by its address."""
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
    # The calibrated score: each actor scores title priors for its own parts, and the job clears
    # them at every part, so the bits cannot depend on which actor ranked which part after which.
    options = dict(OPTIONS, normalize="calibrated")
    expected_summary = run_job(tiny_t5_dir, tmp_path / "in", tmp_path / "local", progress=False, **options)
    summary = run_ray_job(tiny_t5_dir, tmp_path / "in", tmp_path / "ray", actors=2, **options)
    assert json.loads((tmp_path / "ray" / "_job.json").read_text())["options"]["normalize"] == "calibrated"

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


def wait_for(condition, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_an_actor_killed_mid_part_is_restarted_and_the_output_is_complete(ray_cluster, tiny_t5_dir, tmp_path,
                                                                           monkeypatch):
    from instructrec.engine.ray_job import run_ray_job

    write_inputs(tmp_path / "in")
    run_job(tiny_t5_dir, tmp_path / "in", tmp_path / "local", progress=False, **OPTIONS)
    hook = tmp_path / "hook"
    hook.mkdir()
    # The actor that ranks part 2 pauses with the part's first chunk in its temp file and names its
    # pid; the test kills that process. Once only: the restarted actor ranks part 2 through.
    monkeypatch.setenv(FAULT_ENV, "pause-in-part:2")
    monkeypatch.setenv(FAULT_DIR_ENV, str(hook))
    outcome = {}

    def drive():
        try:
            outcome["summary"] = run_ray_job(tiny_t5_dir, tmp_path / "in", tmp_path / "ray", actors=2, **OPTIONS)
        except BaseException as exc:  # reported by the test thread
            outcome["error"] = exc

    driver = threading.Thread(target=drive)
    driver.start()
    wait_for(lambda: list(hook.glob("paused-*")) or not driver.is_alive(), "the actor to pause in part 2")
    assert "error" not in outcome, outcome.get("error")
    [paused] = hook.glob("paused-*")
    pid = int(paused.read_text())
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    driver.join(timeout=300)
    assert not driver.is_alive() and "error" not in outcome, outcome.get("error")

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # that process is gone: part 2 was ranked again by a restarted actor
    ranked = pq.read_table(tmp_path / "ray")
    assert ranked.column("request_id").to_pylist() == pq.read_table(tmp_path / "in").column("request_id").to_pylist()
    assert ranked.equals(pq.read_table(tmp_path / "local"))  # complete, in input order, bit for bit
    assert outcome["summary"]["parts_written"] == 5 and outcome["summary"]["rows"] == 48
    assert not [p.name for p in (tmp_path / "ray").iterdir() if p.name.startswith(".")]


def test_a_killed_driver_is_finished_by_resume_against_the_bucket(ray_cluster, s3_loopback, tiny_t5_dir, tmp_path):
    from instructrec.engine.ray_job import run_ray_job

    bucket, s3 = s3_loopback
    write_inputs(tmp_path / "in")
    run_job(tiny_t5_dir, tmp_path / "in", tmp_path / "local", progress=False, **OPTIONS)
    for name in ("a.parquet", "b.parquet"):
        with open(tmp_path / "in" / name, "rb") as source, \
                s3.open_output_stream(f"{bucket.removeprefix('s3://')}/ray-requests/{name}") as target:
            target.write(source.read())
    address = ray_cluster.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "instructrec", "rerank", "--ray", "--ray-address", address, "--actors", "2",
               "--model", str(tiny_t5_dir), "--input", f"{bucket}/ray-requests", "--output", f"{bucket}/ray-ranked",
               "--rows-per-part", "10", "--chunk-rows", "4", "--dtype", "float32", "--threads", "1"]
    # The driver kills itself (SIGKILL) once two parts are committed.
    killed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, FAULT_ENV: "kill-driver-after-parts:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    prefix = f"{bucket.removeprefix('s3://')}/ray-ranked"
    committed = [n for n in s3_names(s3, prefix) if n.startswith("_commit-")]
    assert 2 <= len(committed) < 5, committed

    # Rerun with --resume (from this process, a driver on the same cluster).
    summary = run_ray_job(tiny_t5_dir, f"{bucket}/ray-requests", f"{bucket}/ray-ranked", actors=2, resume=True,
                          **OPTIONS)
    with s3.open_input_stream(f"{prefix}/_summary.json") as stream:
        assert json.loads(stream.read()) == summary
    assert summary["resumed"] is True and summary["runner"] == "ray"
    assert summary["parts_skipped"] >= 2 and summary["parts_skipped"] + summary["parts_written"] == 5
    assert pq.read_table(f"{prefix}/", filesystem=s3).equals(pq.read_table(tmp_path / "local"))
