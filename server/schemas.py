"""What the API returns: response models, built from the store's rows."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, ValidationError

from shears.errors import JOB_ERROR_CODES
from shears.pruning.config import PruneRequest
from shears.server.models import Job, JobEvent, Upload, utcnow

Status = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
JobErrorCode = Literal[tuple(JOB_ERROR_CODES)]  # type: ignore[valid-type]


class Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Progress(Out):
    done: int
    total: int
    fraction: float
    eta_seconds: float | None = Field(
        None, description="remaining time of the current phase, from its pace so far"
    )


class JobError(Out):
    code: JobErrorCode = Field(
        description="; ".join(f"{code}: {what}" for code, what in JOB_ERROR_CODES.items())
    )
    message: str


class JobLinks(Out):
    self: str
    events: str
    artifacts: str


class JobOut(Out):
    id: str
    status: Status
    phase: str | None
    progress: Progress | None
    attempt: int
    max_attempts: int
    cancel_requested: bool
    # Validated when read from the store (see _stored_request), not again here.
    request: Annotated[PruneRequest, SkipValidation]  # type: ignore[valid-type]
    error: JobError | None
    model_revision: str | None
    result: dict[str, Any] | None = Field(
        None, description="perplexity, sparsity and (structured jobs) sizes and speed from the manifest"
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    links: JobLinks


class JobList(Out):
    jobs: list[JobOut]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page; null on the last")


class EventOut(Out):
    id: int = Field(description="increasing within the job; the SSE id and the `after` cursor")
    attempt: int
    time: datetime
    kind: Literal["state", "phase", "progress", "log", "result", "resumed"]
    phase: str | None
    done: int | None
    total: int | None
    message: str
    data: dict[str, Any]


class EventList(Out):
    events: list[EventOut]
    next_cursor: int = Field(description="the last event id returned (or the cursor given): pass as `after`")
    status: Status


class ArtifactFile(Out):
    name: str
    size: int
    sha256: str
    url: str


class ArtifactList(Out):
    files: list[ArtifactFile]
    archive: str = Field(description="the whole folder as one uncompressed tar")
    manifest: dict[str, Any]


class UploadOut(Out):
    id: str
    source: str = Field(description="the value to use as calibration.source or evaluation.source")
    filename: str
    size: int
    sha256: str
    created_at: datetime


def _progress(job: Job) -> Progress | None:
    if not job.progress_total or job.progress_done is None:
        return None
    done, total = job.progress_done, job.progress_total
    eta = None
    if job.phase_started_at is not None and 0 < done < total:
        elapsed = (utcnow() - job.phase_started_at).total_seconds()
        eta = round(elapsed / done * (total - done), 1)
    return Progress(done=done, total=total, fraction=round(done / total, 4), eta_seconds=eta)


def _stored_request(data: dict[str, Any]) -> Any:
    """The request as stored. One stored before a rule was tightened (a longer ignore list, a seed
    past 64 bits) fails today's validation: shown as stored, rather than failing every listing."""
    try:
        return PruneRequest.model_validate(data)
    except ValidationError:
        return data


def job_out(job: Job) -> JobOut:
    base = f"/v1/jobs/{job.id}"
    result = None
    if job.manifest:
        result = {key: job.manifest.get(key) for key in ("perplexity", "sparsity", "timings")}
        structure = job.manifest.get("structure")
        if structure:  # the summary; per-block indices stay in the manifest
            result["structure"] = {
                key: structure.get(key) for key in ("plan", "parameters", "bytes", "speed")
            }
    return JobOut(
        id=job.id,
        status=job.status,
        phase=job.phase,
        progress=_progress(job),
        attempt=job.attempt,  # type: ignore[arg-type]
        max_attempts=job.max_attempts,
        cancel_requested=job.cancel_requested,
        request=_stored_request(job.request),
        error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
        model_revision=job.model_revision,
        result=result,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        updated_at=job.updated_at,
        links=JobLinks(self=base, events=f"{base}/events", artifacts=f"{base}/artifacts"),
    )


def event_out(event: JobEvent) -> EventOut:
    return EventOut(
        id=event.seq,
        attempt=event.attempt,
        time=event.created_at,
        kind=event.kind,  # type: ignore[arg-type]
        phase=event.phase,
        done=event.done,
        total=event.total,
        message=event.message,
        data=event.data,
    )


def upload_out(upload: Upload) -> UploadOut:
    return UploadOut(
        id=upload.id,
        source=f"upload:{upload.id}",
        filename=upload.filename,
        size=upload.size,
        sha256=upload.sha256,
        created_at=upload.created_at,
    )
