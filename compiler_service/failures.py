"""Why a compile job stops: the exceptions the pipeline raises and the worker turns into job states."""

from __future__ import annotations


class CompileError(ValueError):
    """The job cannot succeed; the message is the one-line reason shown to the user."""


class QualityGateFailed(CompileError):
    """The build exists in the store with its report, but is not the model's current build."""

    def __init__(self, message: str, build_id: str):
        super().__init__(message)
        self.build_id = build_id


class JobStopped(Exception):
    """The job was cancelled, or taken from this worker (its lease ran out and another took it)."""
