"""/v1/jobs: submit, list, read, cancel and delete pruning jobs."""

from __future__ import annotations

import base64
import binascii
import re
import shutil
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from shears.errors import ShearsError
from shears.pruning.config import PruneRequest
from shears.server.admission import admit
from shears.server.deps import DispatcherDep, SettingsDep, StoreDep
from shears.server.models import TERMINAL, Job
from shears.server.problems import Problem, quoted
from shears.server.schemas import JobList, JobOut, Status, job_out
from shears.server.store import IdempotencyConflict, NotTerminal, QueueFull, Store

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
_JOB_ID = re.compile(r"^j[0-9a-f]{21}$")

JobId = Annotated[str, Path(description="the job id returned on submit")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="the same key and body return the first job; the same key with another body is a 422",
    ),
]


def find_job(store: Store, job_id: str) -> Job:
    job = store.get_job(job_id) if len(job_id) <= 64 else None
    if job is None:
        raise Problem(404, "not_found", f"no job {quoted(job_id)}")
    return job


def _admission_problem(exc: ShearsError) -> Problem:
    return Problem(422, exc.code if exc.code != "internal" else "invalid_request", str(exc))


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    summary="Submit a pruning job",
    responses={
        202: {"headers": {"Location": {"description": "the job's URL", "schema": {"type": "string"}}}}
    },
)
def submit(
    request: PruneRequest,
    response: Response,
    settings: SettingsDep,
    store: StoreDep,
    dispatcher: DispatcherDep,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    try:
        admit(request, settings, lambda upload_id: store.get_upload(upload_id) is not None)
    except ShearsError as exc:
        raise _admission_problem(exc) from exc
    if not dispatcher.disk_ok():
        raise Problem(
            507,
            "insufficient_storage",
            f"less than {settings.min_free_disk_bytes} bytes free on the server's data volume",
        )
    try:
        job, created = store.create_job(
            request.model_dump(mode="json"),
            max_attempts=settings.max_attempts,
            idempotency_key=idempotency_key,
            queue_cap=settings.queue_cap,
        )
    except IdempotencyConflict as exc:
        raise Problem(
            422,
            "idempotency_conflict",
            f"Idempotency-Key {idempotency_key!r} was used with a different request",
        ) from exc
    except QueueFull as exc:
        if settings.concurrency == 0:  # draining: the queue moves only once an operator resumes it
            raise Problem(
                429, "queue_full", f"{exc}, and this server starts no jobs (max concurrent jobs is 0)"
            ) from exc
        retry = _retry_after(store, exc.depth, settings.concurrency)
        raise Problem(
            429, "queue_full", f"{exc}; retry in {retry} s", headers={"Retry-After": str(retry)}
        ) from exc
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(job)


def _retry_after(store: Store, depth: int, concurrency: int) -> int:
    finished = [seconds for _, seconds in store.durations()[-50:]]
    typical = sum(finished) / len(finished) if finished else 60.0
    return int(min(3600, max(5, typical * depth / concurrency)))


def _decode_cursor(cursor: str) -> str:
    try:
        padded = cursor.encode() + b"=" * (-len(cursor) % 4)
        decoded = base64.b64decode(padded, altchars=b"-_", validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise Problem(400, "bad_cursor", "cursor is not one this server returned") from exc
    if not _JOB_ID.fullmatch(decoded):
        raise Problem(400, "bad_cursor", "cursor is not one this server returned")
    return decoded


@router.get("", response_model=JobList, summary="List jobs, newest first")
def list_jobs(
    store: StoreDep,
    status: Status | None = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobList:
    before = _decode_cursor(cursor) if cursor else None
    jobs = store.list_jobs(status=status, before_id=before, limit=limit + 1)
    next_cursor = None
    if len(jobs) > limit:
        jobs = jobs[:limit]
        next_cursor = base64.urlsafe_b64encode(jobs[-1].id.encode()).decode().rstrip("=")
    return JobList(jobs=[job_out(job) for job in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, summary="A job's status, phase, progress and result")
def get_job(job_id: JobId, store: StoreDep) -> JobOut:
    return job_out(find_job(store, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    status_code=202,
    summary="Cancel a queued or running job (idempotent)",
)
def cancel(job_id: JobId, store: StoreDep) -> JobOut:
    find_job(store, job_id)
    job = store.request_cancel(job_id)
    if job is None:
        raise Problem(404, "not_found", f"no job {quoted(job_id)}")
    return job_out(job)


@router.delete("/{job_id}", status_code=204, summary="Delete a finished job and its artifacts")
async def delete(job_id: JobId, request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    job = await run_in_threadpool(find_job, store, job_id)
    if job.status not in TERMINAL:
        raise Problem(409, "conflict", f"job {job_id} is {job.status}; cancel it first")
    try:
        await run_in_threadpool(store.delete_job, job_id)
    except NotTerminal as exc:
        raise Problem(409, "conflict", f"job {job_id} is {exc}; cancel it first") from exc
    storage = request.app.state.storage

    def remove_files() -> None:
        shutil.rmtree(settings.jobs_dir / job.id, True)
        if storage is not None:
            storage.remove(job.id)

    # Downloads of the job that have begun finish first; its files go when the last one ends.
    await run_in_threadpool(request.app.state.downloads.remove_when_idle, job.id, remove_files)
    return Response(status_code=204)
