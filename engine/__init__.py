"""The runtime: encode-once packed candidate scoring, tournament, and the Python API.

    from instructrec.engine import Reranker, Request
    rr = Reranker.from_pretrained("google/flan-t5-base", dtype="auto")
    rr.score("Recommend a game for a fan of racing.", ["Forza Horizon 4", "Tetris"])
    rr.rank([Request(instruction=..., candidates=[...])])

`Reranker` (and with it torch) is imported on first use, so that `instructrec --help` and the
commands that never score (data, instructions) start without loading torch.
"""

from .errors import BudgetExceededError, InputError, InstructRecError, ModelLoadError, UnknownTemplateError
from .types import EngineStats, RankedResult, Request

__all__ = [
    "Reranker", "Request", "RankedResult", "EngineStats",
    "InstructRecError", "InputError", "UnknownTemplateError", "BudgetExceededError", "ModelLoadError",
]


def __getattr__(name: str):
    if name == "Reranker":
        from .reranker import Reranker

        return Reranker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
