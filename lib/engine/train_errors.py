"""The errors a training run stops with (each one line on the command line, exit status 2)."""

from __future__ import annotations

__all__ = ["NonFiniteError", "NonFiniteLossError", "TrainingError"]


class TrainingError(ValueError):
    """A training run that cannot start or continue; the message says why."""


class NonFiniteError(TrainingError):
    """A NaN or infinite number where training needs a finite one: the loss, an update, a
    checkpoint being written or resumed from."""


class NonFiniteLossError(NonFiniteError):
    """The loss became NaN or infinite."""
