"""Exceptions of the trainer that a user can cause, each with a one-line message.

The CLI turns `CheckpointError`s into one-line errors (exit status 2) instead of tracebacks:

  NoCheckpointError        `eval` (or a restore) on a workdir without checkpoints, or a
                           requested step that is not there (also a FileNotFoundError).
  CheckpointMismatchError  a checkpoint written by another model or config (also a ValueError);
                           `.details` lists every missing, unexpected or reshaped array.
  WarmStartError           (`vlp_jax.train.warm_start`, a CheckpointMismatchError) the
                           `config.init` checkpoint is missing or does not fit.
  NonFiniteError           train.nonfinite='stop' met a non-finite loss or gradient.
"""
from __future__ import annotations


class CheckpointError(Exception):
    """Base of the checkpoint problems a user can cause (wrong workdir, wrong model)."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """There is no (such) checkpoint in the workdir."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint's arrays do not match the model being restored (other model or config).

    str(error) is one line (a summary and the first differences); `details` holds the full
    multi-line listing."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class NonFiniteError(RuntimeError):
    """Raised by the 'stop' non-finite policy after checkpointing the last good state."""


def one_line(listing: str, limit: int = 4) -> str:
    """A multi-line `describe_mismatch` listing -> '; '-joined first `limit` entries."""
    lines = [" ".join(line.split()) for line in listing.splitlines() if line.strip()]
    more = len(lines) - limit
    return "; ".join(lines[:limit]) + (f"; ... and {more} more" if more > 0 else "")
