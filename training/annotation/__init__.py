"""Annotation: explicit preferences (P2) and vague / specific intentions (I1 / I2) for instructions.

`OfflineAnnotator` builds them from the data alone; `TeacherAnnotator` asks an LLM behind an
OpenAI-compatible endpoint (see `teacher.py` for its configuration and error policy).
"""

from .base import (
    Annotator, ItemView, clean_category_labels, has_sentence, specific_intention_from_categories, split_sentences)
from .offline import OfflineAnnotator

__all__ = [
    "Annotator", "ItemView", "OfflineAnnotator", "TeacherAnnotator", "clean_category_labels", "has_sentence",
    "make_annotator", "specific_intention_from_categories", "split_sentences",
]


def __getattr__(name):
    # The teacher pulls in urllib/threading machinery only when asked for.
    if name == "TeacherAnnotator":
        from .teacher import TeacherAnnotator

        return TeacherAnnotator
    raise AttributeError(name)


def make_annotator(kind: str, *, progress: bool = True, **teacher_overrides) -> Annotator:
    """"offline" or "teacher" (configured from INSTRUCTREC_TEACHER_* variables; `progress`: its
    progress bar on stderr)."""
    from instructrec.engine.errors import InputError

    if kind == "offline":
        return OfflineAnnotator()
    if kind == "teacher":
        from .teacher import TeacherAnnotator, TeacherConfig

        return TeacherAnnotator(TeacherConfig.from_env(**teacher_overrides), progress=progress)
    raise InputError("annotator", f"unknown annotator {kind!r}", "use 'offline' or 'teacher'")
