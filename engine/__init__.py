"""The runtime: encode-once packed candidate scoring, tournament, and the Python API.

    from instructrec.engine import Reranker, Request
    rr = Reranker.from_pretrained("path/to/flan-t5", dtype="auto")
    rr.score("Recommend a game for a fan of racing.", ["Forza Horizon 4", "Tetris"])
    rr.rank([Request(instruction=..., candidates=[...])])
"""

from .errors import BudgetExceededError, InputError, InstructRecError, ModelLoadError, UnknownTemplateError
from .reranker import Reranker
from .types import EngineStats, RankedResult, Request

__all__ = [
    "Reranker", "Request", "RankedResult", "EngineStats",
    "InstructRecError", "InputError", "UnknownTemplateError", "BudgetExceededError", "ModelLoadError",
]
