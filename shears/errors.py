"""Errors a user can act on. `code` says whose fault it was; the server reports it as the job's error."""

from __future__ import annotations


class ShearsError(Exception):
    code = "internal"


class InvalidRequest(ShearsError):
    """The request cannot be carried out as written (bad pattern for a layer width, bad regex...)."""

    code = "invalid_request"


class CalibrationError(InvalidRequest):
    """A calibration or evaluation source is missing, empty, not text, or too short."""


class ModelUnavailable(ShearsError):
    """The model spec names nothing that can be loaded (missing folder, unknown repo, no weights)."""

    code = "model_unavailable"


class UnsafeWeights(ShearsError):
    """Pickle checkpoints or remote code, refused unless the operator allows them."""

    code = "unsafe_weights"


class OutOfMemory(ShearsError):
    code = "out_of_memory"
