"""Typed errors of the export pipeline."""

from __future__ import annotations

from dataclasses import dataclass

from instructrec.engine.errors import InstructRecError

__all__ = ["ExportError", "ExportValidationError", "Mismatch"]


class ExportError(InstructRecError):
    """The export could not be produced (bad input folder, unsupported dtype on this device, ...);
    the message names the file or option and the fix."""


@dataclass(frozen=True)
class Mismatch:
    graph: str
    case: str  # the input shapes, e.g. "B=3 S=17"
    output: str
    max_abs_diff: float
    tolerance: float

    def __str__(self) -> str:
        return (f"{self.graph}/{self.output} [{self.case}]: max |onnx - torch| = {self.max_abs_diff:.3g} "
                f"> tolerance {self.tolerance:.3g}")


class ExportValidationError(ExportError):
    """onnxruntime disagrees with torch: every mismatch of the run, listed once."""

    def __init__(self, mismatches: list[Mismatch], report_path: str | None = None):
        self.mismatches = list(mismatches)
        self.report_path = report_path
        lines = "\n  ".join(str(m) for m in self.mismatches)
        where = f" (report: {report_path})" if report_path else ""
        super().__init__(f"{len(self.mismatches)} ONNX output(s) differ from torch{where}:\n  {lines}")
