"""Typed errors of the engine boundary.

User input gets an `InputError` naming the field and the fix; the batch job turns one into an
error row, so messages are written to be read in a results table.
"""

from __future__ import annotations


class InstructRecError(Exception):
    """Base of every error this project raises on purpose."""


class InputError(InstructRecError, ValueError):
    """Bad user input: names the offending field and says how to fix it."""

    kind = "invalid_input"

    def __init__(self, field: str, problem: str, fix: str | None = None):
        self.field = field
        self.problem = problem
        self.fix = fix
        message = f"{field}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


class UnknownTemplateError(InputError):
    kind = "unknown_template"


class BudgetExceededError(InputError):
    """The instruction cannot fit the source-token budget even after dropping history."""

    kind = "over_budget"


class ModelLoadError(InstructRecError):
    """A model directory is missing, partial or corrupted; the message names the file."""
