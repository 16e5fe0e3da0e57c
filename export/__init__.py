"""ONNX export with Optimum (custom ONNX configs for the engine's four graphs) and its
validation against torch. `instructrec export --model MODEL --out DIR` (MODEL: a folder, a Hub
id or random:<shape>).

Names are resolved lazily: the CLI dispatcher imports instructrec.export.cli at startup, and
torch / optimum load only when an export runs."""

from importlib import import_module

__all__ = ["export_model", "validate_export", "ExportError", "ExportValidationError", "Mismatch", "DEFAULT_ATOL"]
_WHERE = {"export_model": ".exporter", "validate_export": ".exporter", "DEFAULT_ATOL": ".exporter",
          "ExportError": ".errors", "ExportValidationError": ".errors", "Mismatch": ".errors"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
