"""The output folder of a batch job: lock, manifest, parts and the commit protocol.

Both runners (`engine.batch`, in-process, and `engine.ray_job`, on Ray Data) write the same
folder through this module, on any store `engine.job_storage` opens:

    part-00000.parquet ...    the results; input row r is in part r // rows_per_part
    _commit-00000.json ...    one commit record per finished part: rows, bytes, counts
    _job.json                 the manifest: input fingerprint, parts, model, options
    _summary.json             written at the end of a run
    _job.lock                 held while a run works here (local folders only)

Commit protocol of a part: stream it into a hidden temp file `.part-NNNNN.<random>.parquet.tmp`,
close it (fsync locally), rename it to `part-NNNNN.parquet` (atomic on local disks and HDFS; on
S3 and GCS a server-side copy, whose result appears whole), then write its commit record. The
record is the commit: a part is finished when its record exists and the part matches it (row
count, size, readable footer). A kill at any point leaves either a finished part or debris that
the next `--resume` removes (temp files, a part without its record), never a partial part that
counts. Readers (`pyarrow.parquet.read_table(OUTPUT)`) skip names starting with `.` or `_`.

A run that fails before committing any part leaves the folder as it found it: it writes no
manifest or removes the one it wrote, removes `_job.lock`, and removes the folder if it created
it. An output that holds only a manifest (a start killed before any part) counts as empty.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .errors import InputError, InstructRecError
from .job_storage import Location, is_disk_full, resolve_location, short_error

__all__ = [
    "MANIFEST_NAME", "SUMMARY_NAME", "LOCK_NAME", "MANIFEST_FORMAT", "JobOutputError", "OutputWriteError",
    "PartPlan", "OutputFolder", "PartWriter", "part_name", "commit_name", "manifest_differences", "list_parts",
    "DEFAULT_ROWS_PER_PART", "DEFAULT_CHUNK_ROWS",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "_job.json"
SUMMARY_NAME = "_summary.json"
LOCK_NAME = "_job.lock"
# 10k rows: small enough that a kill loses minutes of a 3B-model run, large enough that a
# million-row input is ~100 files (and ~100 calls for a Ray actor pool to spread).
DEFAULT_ROWS_PER_PART = 10_000
# Requests handed to one `Reranker.rank` call: the engine sorts by length and packs inside it.
DEFAULT_CHUNK_ROWS = 1024
# 2: the model recorded as its source's identity (a Hub id's commit), commit records per part.
MANIFEST_FORMAT = 2
_PART = re.compile(r"^part-(\d{5,})\.parquet$")
_COMMIT = re.compile(r"^_commit-(\d{5,})\.json$")


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def commit_name(index: int) -> str:
    return f"_commit-{index:05d}.json"


def list_parts(folder: str | os.PathLike | Location) -> list[str]:
    """The part files of an output folder, in part order (= input order)."""
    location = resolve_location(folder, "output")
    infos = location.filesystem.get_file_info(pafs.FileSelector(location.path))
    return sorted(i.base_name for i in infos if _PART.match(i.base_name))


def _is_debris(name: str) -> bool:
    """Temp files of an interrupted write (parts, manifest, records, summary)."""
    return name.startswith(".") and name.endswith(".tmp")


class JobOutputError(InstructRecError):
    """The output folder cannot be used as asked (not empty, incompatible run, locked, damaged)."""


class OutputWriteError(JobOutputError):
    """Writing to the output failed (disk full, permissions, the store refused): finished parts are
    kept, the unfinished one is discarded, `--resume` continues."""


@dataclass(frozen=True)
class PartPlan:
    """How the input's rows map to parts and engine chunks. Fixed by the input alone, so a rerun
    cuts the same parts and hands the engine the same chunks."""

    total_rows: int
    rows_per_part: int
    chunk_rows: int

    def __post_init__(self):
        for name in ("rows_per_part", "chunk_rows"):
            if getattr(self, name) < 1:
                raise InputError(name, f"must be at least 1, got {getattr(self, name)}")

    @property
    def parts(self) -> int:
        return max(1, -(-self.total_rows // self.rows_per_part))  # an empty input gets one empty part

    def rows_in(self, index: int) -> int:
        start = index * self.rows_per_part
        return max(0, min(self.rows_per_part, self.total_rows - start))

    def bounds(self, index: int) -> tuple[int, int]:
        start = index * self.rows_per_part
        return start, start + self.rows_in(index)


def manifest_differences(previous: Mapping, current: Mapping, prefix: str = "") -> list[str]:
    """`key: was X, now Y` for every leaf that differs between two manifests."""
    differences = []
    for key in sorted(set(previous) | set(current)):
        old, new = previous.get(key), current.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            differences += manifest_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            shown_old, shown_new = (json.dumps(v)[:200] for v in (old, new))
            differences.append(f"{prefix}{key}: was {shown_old}, now {shown_new}")
    return differences


class _Lock:
    """`_job.lock` held with flock for the life of a run (local folders; the kernel drops it when the
    holder dies, even by kill -9). Released by removing the file while still holding it; whoever
    locked a file that is no longer at the path retries, so two runs never both hold a lock."""

    def __init__(self, folder: Location):
        self.path = os.path.join(folder.path, LOCK_NAME)
        self.handle = None

    def acquire(self, output_uri: str) -> None:
        for _ in range(100):
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                handle.close()
                raise JobOutputError(f"{output_uri} is being written by another running job (it holds "
                                     f"{LOCK_NAME}); wait for it to finish or choose another --output") from exc
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.handle = handle
                return
            handle.close()  # the holder released (removed) it between our open and our lock
        raise JobOutputError(f"{output_uri}: could not take {LOCK_NAME} (it keeps being replaced)")

    def release(self) -> None:
        if self.handle is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.handle.close()
        self.handle = None


class OutputFolder:
    """One run's hold on the output folder. Use as a context manager:

        with OutputFolder.claim(output, resume=...) as folder:   # lock, first checks
            folder.check(manifest)      # against the run being resumed; finds the finished parts
            ...load the model...
            folder.start()              # the manifest, once the run can really start
            with folder.part_writer(i) as writer: writer.write(batch); writer.commit(counts)
            folder.write_summary(summary)

    Leaving the block with an exception before any part was committed undoes the claim.
    """

    def __init__(self, location: Location, *, resume: bool, created: bool, lock: _Lock | None,
                 entries: dict[str, int]):
        self.location = location
        self.resume = resume
        self._created = created
        self._lock = lock
        self._entries = entries  # name -> size at claim time
        self.previous_manifest: dict | None = None
        self.manifest: dict | None = None
        self.finished_parts: frozenset[int] = frozenset()
        self.resumed = False
        self._wrote_manifest = False
        self.schema: pa.Schema | None = None

    # ------------------------------------------------------------------------------ claim
    @classmethod
    def claim(cls, output: str | os.PathLike | Location, *, resume: bool) -> "OutputFolder":
        """Take the folder for this run: refuse a file, a busy folder (locked), a non-empty folder
        without `--resume`, a folder this job did not write. Reads the previous manifest."""
        location = resolve_location(output, "output")
        info = _info(location)
        if info.type == pafs.FileType.File:
            raise JobOutputError(f"--output {location} is a file; the job writes a folder of parts there. "
                                 "Choose a folder path")
        created = False
        if info.type == pafs.FileType.NotFound and location.atomic_rename:  # object stores need no folders
            _guard_write(lambda: location.filesystem.create_dir(location.path, recursive=True),
                         f"creating {location}", location)
            created = True
        lock = None
        if location.is_local:
            lock = _Lock(location)
            try:
                lock.acquire(str(location))
            except BaseException:
                if created:
                    _remove_empty_dir(location)
                raise
        folder = cls(location, resume=resume, created=created, lock=lock, entries={})
        try:
            folder._entries = folder._list()
            folder._first_checks()
        except BaseException:
            folder._undo_claim()
            raise
        return folder

    @classmethod
    def for_workers(cls, output: Location, *, schema: pa.Schema) -> "OutputFolder":
        """A view for processes that only write parts into a folder a driver has claimed and
        checked (Ray actors): no lock, no checks, no manifest."""
        folder = cls(output, resume=True, created=False, lock=None, entries={})
        folder.schema = schema
        return folder

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._holds_data():
            self._undo_claim()
        else:
            self._release_lock()

    def _list(self) -> dict[str, int]:
        if _info(self.location).type == pafs.FileType.NotFound:
            return {}
        selector = pafs.FileSelector(self.location.path, allow_not_found=True)
        try:
            infos = self.location.filesystem.get_file_info(selector)
        except OSError as exc:
            raise JobOutputError(f"cannot list --output {self.location} ({short_error(exc)})") from exc
        return {i.base_name: (i.size or 0) for i in infos if i.base_name != LOCK_NAME}

    def _first_checks(self) -> None:
        data = {n for n in self._entries if n != MANIFEST_NAME and not _is_debris(n)}
        if MANIFEST_NAME in self._entries:
            previous = self._read_json(MANIFEST_NAME)
            if not data:
                log.info("%s holds only the manifest of a run that wrote nothing: starting afresh", self.location)
                return
            if not self.resume:
                raise JobOutputError(
                    f"--output {self.location} is not empty ({len(data)} entries, e.g. {sorted(data)[0]}); the job "
                    "never overwrites. Pass --resume to continue the run that wrote it, or delete the folder, or "
                    "choose a new --output")
            self.previous_manifest = previous
            return
        if data:
            if self.resume:
                raise JobOutputError(f"--resume: {self.location} has no {MANIFEST_NAME} but holds {sorted(data)[:5]}; "
                                     "it was not written by this job. Choose a new --output")
            raise JobOutputError(
                f"--output {self.location} is not empty ({len(data)} entries, e.g. {sorted(data)[0]}); the job never "
                "overwrites. Delete the folder or choose a new --output")

    # ------------------------------------------------------------------------------ check
    def check(self, manifest: dict, *, schema: pa.Schema, model_change: str | None = None,
              option_defaults: Mapping[str, Any] | None = None) -> None:
        """Compare this run with the one being resumed (refuse any difference, naming it), remove
        the debris of an interrupted run and find the finished parts. `option_defaults`: options
        added since a manifest may have been written, with the value its run used."""
        self.manifest, self.schema = manifest, schema
        self._remove_debris(self._entries)
        previous = self.previous_manifest
        if previous is None:
            return
        if option_defaults and isinstance(previous.get("options"), dict):
            previous = {**previous, "options": {**option_defaults, **previous["options"]}}
        if previous.get("format") != manifest["format"]:
            raise JobOutputError(f"--resume: {self.location} was written by another version of this job (manifest "
                                 f"format {previous.get('format')}, this one writes {manifest['format']}); "
                                 "write to a new --output")
        if model_change:
            raise JobOutputError(f"--resume: the model changed since the run that wrote {self.location}: "
                                 f"{model_change}. Or write to a new --output")
        informational = ("model", "runtime")
        differences = manifest_differences({k: v for k, v in previous.items() if k not in informational},
                                           {k: v for k, v in manifest.items() if k not in informational})
        if differences:
            raise JobOutputError(
                f"--resume: {self.location} was written by an incompatible run; it differs in "
                + "; ".join(differences[:8]) + (f" (and {len(differences) - 8} more)" if len(differences) > 8 else "")
                + ". Rerun with the same input and options, or write to a new --output")
        self.resumed = True
        self.finished_parts = frozenset(self._finished_parts(_plan_of(manifest)))

    def _finished_parts(self, plan: PartPlan) -> set[int]:
        parts = {int(m.group(1)): n for n in self._entries if (m := _PART.match(n))}
        commits = {int(m.group(1)): n for n in self._entries if (m := _COMMIT.match(n))}
        finished = set()
        for index in sorted(set(parts) | set(commits)):
            if index >= plan.parts:
                continue
            if index not in commits:  # published, but killed before its record: not finished
                log.info("removing %s: it has no commit record (interrupted before its commit)", parts[index])
                self._delete(parts[index])
                continue
            if index not in parts:
                log.warning("%s has a commit record but no part (deleted since): ranking it again",
                            part_name(index))
                self._delete(commits[index])
                continue
            self._verify_part(index, plan.rows_in(index))
            finished.add(index)
        return finished

    def _verify_part(self, index: int, expected_rows: int) -> None:
        name = part_name(index)
        where = self.location.child(name)
        record = self._read_json(commit_name(index))
        fix = f"Delete {where} and rerun with --resume (only that part is ranked again)"
        if record.get("rows") != expected_rows:
            raise JobOutputError(f"--resume: {where} was committed with {record.get('rows')} rows, expected "
                                 f"{expected_rows}; it was not written by this run. {fix}")
        if record.get("bytes") is not None and self._entries.get(name) != record["bytes"]:
            raise JobOutputError(f"--resume: {where} is damaged: {self._entries.get(name)} bytes, committed with "
                                 f"{record['bytes']}. {fix}")
        try:
            with self.location.filesystem.open_input_file(where.path) as handle:
                rows = pq.read_metadata(handle).num_rows
        except (pa.ArrowInvalid, OSError) as exc:
            raise JobOutputError(f"--resume: {where} is damaged ({short_error(exc)}). {fix}") from exc
        if rows != expected_rows:
            raise JobOutputError(f"--resume: {where} has {rows} rows, expected {expected_rows}; it was not "
                                 f"written by this run. {fix}")

    # ------------------------------------------------------------------------------ write
    def start(self) -> None:
        """Write the manifest (unless resuming): call once the run can really start."""
        if self.resumed:
            return
        self.write_json(MANIFEST_NAME, self.manifest)
        self._wrote_manifest = True

    def remove_debris(self) -> None:
        """Remove the temp files of interrupted writes (a Ray actor killed mid-part leaves one; the
        retry wrote the part under another temp name)."""
        self._remove_debris(self._list())

    def _remove_debris(self, names) -> None:
        for name in sorted(n for n in names if _is_debris(n)):
            log.info("removing %s left by an interrupted write", name)
            self._delete(name)

    def part_writer(self, index: int) -> "PartWriter":
        return PartWriter(self, index)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        self.write_json(SUMMARY_NAME, summary)

    def commit_records(self) -> dict[int, dict]:
        """Every part's commit record (what a summary is made of: no part is read)."""
        names = [n for n in self._list() if _COMMIT.match(n)]
        return {int(_COMMIT.match(n).group(1)): self._read_json(n) for n in names}

    def write_json(self, name: str, payload: Mapping) -> None:
        data = (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()
        target = self.location.child(name)
        fs = self.location.filesystem

        def write() -> None:
            if self.location.atomic_rename:  # a reader never sees half a manifest
                temp = self.location.child(f".{name}.{uuid.uuid4().hex[:8]}.tmp")
                with fs.open_output_stream(temp.path) as stream:
                    stream.write(data)
                fs.move(temp.path, target.path)
            else:  # one PUT: an object store shows the whole object or none
                with fs.open_output_stream(target.path) as stream:
                    stream.write(data)

        _guard_write(write, f"writing {name}", self.location)

    def _read_json(self, name: str) -> dict:
        where = self.location.child(name)
        try:
            with self.location.filesystem.open_input_stream(where.path) as stream:
                return json.loads(stream.read())
        except (OSError, ValueError) as exc:
            raise JobOutputError(f"{where} is unreadable ({short_error(exc)}); it was not written by this job, "
                                 "or damaged. Choose a new --output") from exc

    def _delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.location.filesystem.delete_file(self.location.child(name).path)

    # ------------------------------------------------------------------------------ release
    def _holds_data(self) -> bool:
        with contextlib.suppress(JobOutputError, OSError):
            return any(n != MANIFEST_NAME and not _is_debris(n) for n in self._list())
        return True  # cannot tell: keep what is there

    def _undo_claim(self) -> None:
        """A failed start: leave the folder as it was found (debris of this run included)."""
        try:
            if self._wrote_manifest:
                self._delete(MANIFEST_NAME)
        finally:
            self._release_lock()
            if self._created and self.location.is_local:
                _remove_empty_dir(self.location)

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()


class PartWriter:
    """Streams one part into a hidden temp file; `commit` publishes it and writes its record."""

    def __init__(self, folder: OutputFolder, index: int):
        self.folder, self.index = folder, index
        self.final = folder.location.child(part_name(index))
        self.temp = folder.location.child(f".part-{index:05d}.{uuid.uuid4().hex[:8]}.parquet.tmp")
        self.rows = 0
        fs = folder.location.filesystem
        self._stream = self._guard(lambda: fs.open_output_stream(self.temp.path))
        self._writer = self._guard(lambda: pq.ParquetWriter(self._stream, folder.schema))

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()

    def write(self, batch: pa.RecordBatch) -> None:
        self._guard(lambda: self._writer.write_batch(batch))
        self.rows += batch.num_rows

    def commit(self, counts: Mapping[str, Any]) -> dict:
        """Close, publish under the part's name, write the commit record (`counts` + rows, bytes)."""
        folder, fs = self.folder, self.folder.location.filesystem

        def publish() -> int:
            self._writer.close()
            self._stream.close()
            if self.temp.is_local:  # on disk before the rename makes it a part
                fd = os.open(self.temp.path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fs.move(self.temp.path, self.final.path)
            return fs.get_file_info(self.final.path).size

        size = self._guard(publish)
        record = {"part": self.index, "rows": self.rows, "bytes": size, **dict(counts)}
        folder.write_json(commit_name(self.index), record)
        return record

    def discard(self) -> None:
        with contextlib.suppress(Exception):  # best effort: --resume removes debris anyway
            self._writer.close()
        with contextlib.suppress(Exception):
            self._stream.close()
        with contextlib.suppress(Exception):
            self.folder.location.filesystem.delete_file(self.temp.path)

    def _guard(self, action):
        try:
            return action()
        except OSError as exc:
            self.discard()
            raise _write_error(exc, f"writing {self.final.name}", self.folder.location) from exc


def _guard_write(action, what: str, location: Location):
    try:
        return action()
    except OSError as exc:
        raise _write_error(exc, what, location) from exc


def _write_error(exc: OSError, what: str, location: Location) -> OutputWriteError:
    cause = "disk full" if is_disk_full(exc) else "write failed"
    return OutputWriteError(
        f"{cause} while {what} to {location} ({short_error(exc)}). No data was lost: finished parts are "
        "complete and the unfinished part was discarded. "
        + ("Free some space (or choose another --output), then rerun " if is_disk_full(exc) else "Fix it, then rerun ")
        + "the same command with --resume")


def _info(location: Location) -> pafs.FileInfo:
    try:
        return location.info()
    except OSError as exc:
        raise JobOutputError(f"cannot reach --output {location} ({short_error(exc)})") from exc


def _remove_empty_dir(location: Location) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(location.path)


def _plan_of(manifest: Mapping) -> PartPlan:
    return PartPlan(manifest["input"]["rows"], manifest["rows_per_part"], manifest["chunk_rows"])

