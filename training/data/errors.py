"""Typed errors of the data layer. Each names the file (and line, where there is one).

Kept here rather than based on engine.errors.InstructRecError: importing anything under
instructrec.engine runs its __init__, which loads torch (~10 s and ~240 MB here), and data
preparation needs none of it.
"""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """The input data cannot be prepared as asked; the message says which file and why."""


class FormatDetectionError(DataError):
    """The file format could not be recognised, or the review and meta files disagree."""


class MalformedLineError(DataError):
    """One input line could not be read as a record (raised under `strict=True`)."""

    def __init__(self, path: str | Path, line: int, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.path}:{line}: {reason}")

    def as_dict(self) -> dict:
        return {"file": self.path, "line": self.line, "reason": self.reason}


class EmptyResultError(DataError):
    """Filtering left nothing to write (for example a k-core too strict for a small file)."""
