"""What the nightly job does when something else goes wrong: a model that fails to load, a refused
run, a damaged finished part, a full disk, SIGTERM. Each leaves the output usable and says, in one
line, what to do next."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instructrec.cli import main as cli_main
from instructrec.engine.batch import JobOutputError, run_job
from instructrec.engine.job_faults import FAULT_DIR_ENV, FAULT_ENV

ROWS, ROWS_PER_PART = 12, 4
OPTIONS = dict(rows_per_part=ROWS_PER_PART, chunk_rows=2, dtype="float32", progress=False)


def write_requests(path: Path, rows: int = ROWS, candidates: int = 3) -> Path:
    pq.write_table(pa.table({
        "request_id": [f"r{i}" for i in range(rows)],
        "candidates": [[f"strategy game {i} expansion {j}" for j in range(candidates)] for i in range(rows)],
        "instruction": [f"Recommend a game to a fan of puzzle number {i}" for i in range(rows)],
    }), path)
    return path


def rerank_cli(*args) -> int:
    return cli_main(["rerank", "--no-progress", "--dtype", "float32", "--rows-per-part", str(ROWS_PER_PART),
                     *map(str, args)])


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- a failed start blocks nothing ----------------------------------------------------------


def test_a_model_that_fails_to_load_leaves_no_manifest_and_the_rerun_needs_no_resume(tiny_t5_dir, tmp_path, caplog):
    requests = write_requests(tmp_path / "requests.parquet")
    broken = shutil.copytree(tiny_t5_dir, tmp_path / "broken-model")
    (broken / "model.safetensors").unlink()  # resolves (config.json is there), fails to load

    assert rerank_cli("--model", broken, "--input", requests, "--output", tmp_path / "new-out") == 2
    assert "model.safetensors" in caplog.text
    assert not (tmp_path / "new-out").exists()  # it created the folder, so it removed it

    (tmp_path / "out").mkdir()
    assert rerank_cli("--model", broken, "--input", requests, "--output", tmp_path / "out") == 2
    assert listing(tmp_path / "out") == []  # no _job.json, no _job.lock

    # The right model, without --resume: not refused.
    assert rerank_cli("--model", tiny_t5_dir, "--input", requests, "--output", tmp_path / "out") == 0
    assert pq.read_table(tmp_path / "out").num_rows == ROWS


def test_a_refused_run_leaves_no_lock_in_the_folder_it_refused(tiny_t5_dir, tmp_path, caplog):
    folder = tmp_path / "requests"
    folder.mkdir()
    write_requests(folder / "a.parquet")
    before = listing(folder)
    # --output pointed at the input folder by mistake: refused as not empty.
    assert rerank_cli("--model", tiny_t5_dir, "--input", folder, "--output", folder) == 2
    assert "is not empty" in caplog.text
    assert listing(folder) == before

    run_job(tiny_t5_dir, folder, tmp_path / "out", **OPTIONS)
    written = listing(tmp_path / "out")
    assert "_job.lock" not in written  # a finished run releases its lock too
    caplog.clear()
    assert rerank_cli("--model", tiny_t5_dir, "--input", folder, "--output", tmp_path / "out", "--resume",
                      "--group-size", 5) == 2  # an incompatible resume: refused
    assert "options.group_size: was 10, now 5" in caplog.text
    assert listing(tmp_path / "out") == written


def test_a_start_that_only_wrote_its_manifest_counts_as_empty(tiny_t5_dir, tmp_path):
    """A run killed between its manifest and its first part blocks neither a plain rerun nor
    one with other options."""
    requests = write_requests(tmp_path / "requests.parquet")
    run_job(tiny_t5_dir, requests, tmp_path / "out", **OPTIONS)
    for name in listing(tmp_path / "out"):
        if name != "_job.json":
            (tmp_path / "out" / name).unlink()
    summary = run_job(tiny_t5_dir, requests, tmp_path / "out", **{**OPTIONS, "rows_per_part": 5})
    assert summary["rows"] == ROWS and summary["parts"] == 3 and summary["resumed"] is False


# --- damaged finished parts ------------------------------------------------------------------


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[: len(data) // 2], "is damaged: {half} bytes, committed with {full}"),
    (lambda data: b"\0" * len(data), "is damaged (Parquet magic bytes not found"),
])
def test_resume_over_a_damaged_finished_part_names_the_part(tiny_t5_dir, tmp_path, caplog, damage, message):
    requests = write_requests(tmp_path / "requests.parquet")
    output = tmp_path / "out"
    run_job(tiny_t5_dir, requests, output, **OPTIONS)
    part = output / "part-00001.parquet"
    data = part.read_bytes()
    part.write_bytes(damage(data))
    expected = message.format(half=len(data) // 2, full=len(data))
    with pytest.raises(JobOutputError) as refused:
        run_job(tiny_t5_dir, requests, output, resume=True, **OPTIONS)
    assert f"--resume: {part} {expected}" in str(refused.value)
    assert f"Delete {part} and rerun with --resume" in str(refused.value)
    # The CLI: one line, exit 2.
    assert rerank_cli("--model", tiny_t5_dir, "--input", requests, "--output", output, "--resume",
                      "--chunk-rows", 2) == 2
    assert str(part) in caplog.text and "Traceback" not in caplog.text
    # As the message says: delete it, resume, and only that part is ranked again.
    part.unlink()
    summary = run_job(tiny_t5_dir, requests, output, resume=True, **OPTIONS)
    assert summary["parts_written"] == 1 and summary["rows"] == ROWS


# --- disk full ---------------------------------------------------------------------------------


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d && rmdir $d"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and a tmpfs mount in a user namespace")
def test_disk_full_while_writing_a_part_is_one_line_and_resume_finishes(tiny_t5_dir, tmp_path):
    """A real full disk: a small tmpfs mounted in a private mount namespace (gone with it)."""
    requests = write_requests(tmp_path / "requests.parquet", rows=40, candidates=40)
    options = {**OPTIONS, "rows_per_part": 8}
    run_job(tiny_t5_dir, requests, tmp_path / "reference", **options)
    pages = sum(-(-p.stat().st_size // 4096) for p in (tmp_path / "reference").iterdir() if p.name != "_summary.json")
    disk, saved = tmp_path / "disk", tmp_path / "saved"
    disk.mkdir()
    saved.mkdir()
    command = (f"{sys.executable} -m instructrec rerank --model {tiny_t5_dir} --input {requests} --output {disk}/out "
               f"--rows-per-part 8 --chunk-rows 2 --dtype float32 --no-progress")
    script = f"""
        mount -t tmpfs -o size={(pages + 64) * 4}k tmpfs {disk}
        # Leave room for about half of the output.
        head -c {(64 + pages // 2) * 4096} /dev/zero > {disk}/filler
        {command} 2> {saved}/full.err; echo $? > {saved}/full.rc
        ls -a {disk}/out > {saved}/after-full.ls
        rm {disk}/filler
        {command} --resume 2> {saved}/resume.err; echo $? > {saved}/resume.rc
        cp -r {disk}/out {saved}/out
    """
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    errors = (saved / "full.err").read_text()
    assert (saved / "full.rc").read_text().strip() == "2", errors
    [line] = [line for line in errors.splitlines() if " ERROR " in line]
    assert "disk full while writing" in line and "No data was lost" in line
    assert "rerun the same command with --resume" in line and "Traceback" not in errors
    left = (saved / "after-full.ls").read_text().split()
    assert not [name for name in left if name.endswith(".tmp")]  # the unfinished part was discarded
    committed = [name for name in left if name.startswith("_commit-")]
    assert 0 < len(committed) < 5  # it filled up mid-job, after some parts
    assert (saved / "resume.rc").read_text().strip() == "0", (saved / "resume.err").read_text()
    assert pq.read_table(saved / "out").equals(pq.read_table(tmp_path / "reference"))


# --- SIGTERM -----------------------------------------------------------------------------------


def test_sigterm_says_the_job_can_be_resumed_and_resume_finishes_it(tiny_t5_dir, tmp_path):
    requests = write_requests(tmp_path / "requests.parquet")
    run_job(tiny_t5_dir, requests, tmp_path / "reference", **OPTIONS)
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    command = [sys.executable, "-m", "instructrec", "rerank", "--model", str(tiny_t5_dir), "--input", str(requests),
               "--output", str(tmp_path / "out"), "--rows-per-part", str(ROWS_PER_PART), "--chunk-rows", "2",
               "--dtype", "float32", "--no-progress"]
    # The test hook pauses the job inside part 1 (part 0 committed) and names its pid.
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, FAULT_ENV: "pause-in-part:1", FAULT_DIR_ENV: str(hook_dir)})
    deadline = time.monotonic() + 240
    while not list(hook_dir.glob("paused-*")):  # written once the job is paused: no race
        assert job.poll() is None, job.stderr.read()
        assert time.monotonic() < deadline, "the job never reached part 1"
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "rerun the same command with --resume" in stderr
    assert "Traceback" not in stderr
    assert listing(tmp_path / "out") == ["_commit-00000.json", "_job.json", "part-00000.parquet"]

    summary = run_job(tiny_t5_dir, requests, tmp_path / "out", resume=True, **OPTIONS)
    assert summary["parts_skipped"] == 1 and summary["parts_written"] == 2
    assert pq.read_table(tmp_path / "out").equals(pq.read_table(tmp_path / "reference"))
