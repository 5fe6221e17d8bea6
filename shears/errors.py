"""Errors a user can act on. `code` says whose fault it was; the server reports it as the job's error.

JOB_ERROR_CODES lists every code a failed job may report (the server's schema and worker read it
from here); an error class's `code` must be one of them.
"""

from __future__ import annotations

JOB_ERROR_CODES: dict[str, str] = {
    "invalid_request": "the request cannot be carried out as written: fix it and submit again",
    "model_unavailable": "the model names nothing that can be loaded",
    "runtime_unavailable": "verify_runtimes names a runtime this installation has no Python for",
    "unsafe_weights": "pickle checkpoints or remote code, which the operator has not allowed",
    "out_of_memory": "the job did not fit the device's memory: fewer samples or a smaller batch",
    "out_of_disk": "the server's disk filled up while the job ran: retry once space is freed",
    "worker_lost": "the worker process died or stopped answering (retried up to max_attempts)",
    "internal": "a failure of Shears or of the machine, not of the request",
}
WORKER_LOST = "worker_lost"


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
