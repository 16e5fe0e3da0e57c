"""Where a batch job reads and writes: a local path or a URI, through `pyarrow.fs`.

`--input` and `--output` are local paths (relative ones are made absolute) or URIs that
`pyarrow.fs.FileSystem.from_uri` understands: `s3://bucket/prefix` (credentials and endpoint from
the usual AWS settings, e.g. `AWS_ENDPOINT_URL` for an S3-compatible store), `gs://bucket/prefix`,
`hdfs://namenode:port/path`, `file:///path`. Both jobs go through the same `Location`, so input
discovery, schema checks, part writing and resume are the same code on every store.

What differs between stores is only whether a rename is atomic (the job publishes a finished part
by renaming its temp file; see engine/job_output.py) and whether a lock file can be held.
"""

from __future__ import annotations

import errno
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from .errors import InputError

__all__ = ["Location", "resolve_location", "is_disk_full", "short_error"]

# Stores whose rename is one atomic metadata operation. S3 and GCS "move" is copy-then-delete,
# so on them a part's commit record, not its name, says that it is finished.
_ATOMIC_RENAME = ("LocalFileSystem", "HadoopFileSystem")


@dataclass(frozen=True)
class Location:
    """A file or folder on some filesystem. Picklable (Ray ships it to every actor)."""

    filesystem: pafs.FileSystem
    path: str  # as the filesystem names it ("/abs/path" locally, "bucket/key" on S3)
    uri: str  # as shown to the user and recorded in manifests

    @property
    def is_local(self) -> bool:
        return type(self.filesystem).__name__ == "LocalFileSystem"

    @property
    def atomic_rename(self) -> bool:
        return type(self.filesystem).__name__ in _ATOMIC_RENAME

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def local_path(self) -> Path | None:
        return Path(self.path) if self.is_local else None

    def child(self, name: str) -> "Location":
        return Location(self.filesystem, posixpath.join(self.path, name), self.uri.rstrip("/") + "/" + name)

    def info(self) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path)

    def __str__(self) -> str:
        return self.uri


def resolve_location(spec: str | os.PathLike | Location, field: str) -> Location:
    """A Location from a local path or a URI; InputError naming `field` when no filesystem fits."""
    if isinstance(spec, Location):
        return spec
    text = os.fspath(spec)
    if "://" not in text:
        path = Path(text).expanduser().resolve()
        return Location(pafs.LocalFileSystem(), path.as_posix(), str(path))
    try:
        filesystem, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as exc:
        raise InputError(field, f"cannot open {text} ({short_error(exc)})",
                         "use a local path or an s3://, gs://, hdfs:// or file:// URI whose filesystem pyarrow "
                         "supports here (hdfs needs a JVM and libhdfs)") from exc
    uri = text.rstrip("/")
    if type(filesystem).__name__ == "LocalFileSystem":
        uri = path
    return Location(filesystem, path.rstrip("/") or path, uri)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, however the layer that met it reported it (pyarrow raises OSError with
    the errno in its message, not in `errno`)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return isinstance(exc, OSError) and ("No space left on device" in text or "Disk quota exceeded" in text)


def short_error(exc: BaseException, limit: int = 300) -> str:
    """The first line of an error, bounded: pyarrow's filesystem errors can run to pages."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."
