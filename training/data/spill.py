"""Review texts spilled to disk while the compact columns stay in memory.

A multi-GB review file is mostly text. Each record's text and summary are appended, UTF-8, to one
scratch file; memory keeps 16 bytes a record (offset, two lengths), and the texts of the records
that survive filtering are read back with pread when the tables are written (not a memory map,
whose touched pages would count in the process's resident memory).
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path

_ABSENT = -1  # length marking a null field
_BUFFER_BYTES = 1 << 20


class TextSpill:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._offset = 0
        self.offsets = array("q")
        self.text_lengths = array("i")
        self.summary_lengths = array("i")
        self._reader: int | None = None  # file descriptor, after finish()

    def __len__(self) -> int:
        return len(self.offsets)

    def append(self, text: str | None, summary: str | None) -> None:
        self.offsets.append(self._offset)
        for value, lengths in ((text, self.text_lengths), (summary, self.summary_lengths)):
            if value is None:
                lengths.append(_ABSENT)
                continue
            data = value.encode("utf-8")
            lengths.append(len(data))
            self._buffer.append(data)
            self._buffered += len(data)
            self._offset += len(data)
        if self._buffered >= _BUFFER_BYTES:
            self._flush()

    def _flush(self) -> None:
        self._file.write(b"".join(self._buffer))
        self._buffer.clear()
        self._buffered = 0

    def finish(self) -> None:
        """Stop writing and open the file for reading."""
        self._flush()
        self._file.close()
        self._reader = os.open(self.path, os.O_RDONLY)

    def get(self, index: int) -> tuple[str | None, str | None]:
        """(text, summary) of record `index`; call finish() first."""
        text_length = self.text_lengths[index]
        summary_length = self.summary_lengths[index]
        size = max(text_length, 0) + max(summary_length, 0)
        data = os.pread(self._reader, size, self.offsets[index]) if size else b""
        split = max(text_length, 0)
        text = data[:split].decode("utf-8") if text_length != _ABSENT else None
        summary = data[split:].decode("utf-8") if summary_length != _ABSENT else None
        return text, summary

    def close(self) -> None:
        if self._reader is not None:
            os.close(self._reader)
            self._reader = None
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)
