"""The durable job store: every state change is a conditional UPDATE in one short transaction.

A job's owner is (id, attempt): a worker's writes match its attempt and an active status, so a
worker whose lease was taken away cannot touch the job any more, and a job never runs twice at once.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, delete, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shears.errors import WORKER_LOST
from shears.server.db import BEGIN_OPTION, CLAIM_LOCK, make_engine
from shears.server.models import (
    ACTIVE,
    CANCELLED,
    CANCELLING,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    Job,
    JobEvent,
    Upload,
    utcnow,
)


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request."""


class QueueFull(Exception):
    def __init__(self, depth: int) -> None:
        super().__init__(f"the queue holds {depth} jobs, its cap")
        self.depth = depth


class NotTerminal(Exception):
    """Only finished jobs can be deleted."""


def new_id(prefix: str) -> str:
    """Time-ordered, unguessable: microseconds since the epoch in fixed-width hex, then 32 random bits."""
    return f"{prefix}{time.time_ns() // 1000:013x}{secrets.token_hex(4)}"


def request_hash(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sources(request: dict[str, Any]) -> tuple[Any, Any]:
    return (request.get("calibration") or {}).get("source"), (request.get("evaluation") or {}).get("source")


@dataclass(frozen=True)
class Heartbeat:
    owned: bool
    cancel_requested: bool


class Store:
    def __init__(self, url: str | Engine) -> None:
        self.engine = url if isinstance(url, Engine) else make_engine(url)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            session.connection(execution_options={BEGIN_OPTION: "IMMEDIATE"})
            yield session

    # -- events ---------------------------------------------------------------------------------

    @staticmethod
    def _append_event(
        session: Session,
        job_id: str,
        attempt: int,
        kind: str,
        *,
        phase: str | None = None,
        done: int | None = None,
        total: int | None = None,
        message: str = "",
        data: dict[str, Any] | None = None,
    ) -> int:
        # The job row is locked first (PostgreSQL; SQLite's write lock covers it), so seq is gap-free.
        session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
        seq = (session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id)) or 0) + 1
        session.add(
            JobEvent(
                job_id=job_id,
                seq=seq,
                attempt=attempt,
                created_at=utcnow(),
                kind=kind,
                phase=phase,
                done=done,
                total=total,
                message=message,
                data=data or {},
            )
        )
        return seq

    def _state_event(self, session: Session, job: Job, status: str, message: str, **data: Any) -> None:
        self._append_event(
            session, job.id, job.attempt, "state", message=message, data={"status": status, **data}
        )

    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[JobEvent]:
        with self._read() as session:
            query = (
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.seq > after)
                .order_by(JobEvent.seq)
                .limit(limit)
            )
            return list(session.scalars(query))

    def add_event(
        self,
        job_id: str,
        attempt: int,
        kind: str,
        *,
        phase: str | None = None,
        done: int | None = None,
        total: int | None = None,
        message: str = "",
        data: dict[str, Any] | None = None,
    ) -> bool:
        """A worker's event; also moves the job's phase and progress. False: the attempt is not the owner."""
        now = utcnow()
        with self._write() as session:
            job = session.scalar(
                select(Job)
                .where(Job.id == job_id, Job.attempt == attempt, Job.status.in_(ACTIVE))
                .with_for_update()
            )
            if job is None:
                return False
            if kind == "phase" and phase:
                job.phase, job.phase_started_at = phase, now
                job.progress_done = job.progress_total = None
            elif kind == "progress" and total:
                if phase and phase != job.phase:
                    job.phase, job.phase_started_at = phase, now
                job.progress_done, job.progress_total = done, total
            job.updated_at = now
            self._append_event(
                session,
                job_id,
                attempt,
                kind,
                phase=phase,
                done=done,
                total=total,
                message=message,
                data=data,
            )
            return True

    # -- jobs -----------------------------------------------------------------------------------

    def create_job(
        self,
        request: dict[str, Any],
        *,
        max_attempts: int,
        idempotency_key: str | None = None,
        queue_cap: int | None = None,
    ) -> tuple[Job, bool]:
        """Queue a job; returns (job, created). The same Idempotency-Key and request return the first job."""
        digest = request_hash(request)
        for _ in range(3):
            if idempotency_key is not None:
                existing = self._by_key(idempotency_key)
                if existing is not None:
                    if existing.request_hash != digest:
                        raise IdempotencyConflict(idempotency_key)
                    return existing, False
            now = utcnow()
            try:
                with self._write() as session:
                    if queue_cap is not None:
                        depth = session.scalar(
                            select(func.count()).select_from(Job).where(Job.status == QUEUED)
                        )
                        if depth >= queue_cap:
                            raise QueueFull(depth)
                    job = Job(
                        id=new_id("j"),
                        status=QUEUED,
                        request=request,
                        request_hash=digest,
                        idempotency_key=idempotency_key,
                        attempt=0,
                        max_attempts=max_attempts,
                        cancel_requested=False,
                        created_at=now,
                        updated_at=now,
                    )
                    session.add(job)
                    session.flush()
                    self._state_event(session, job, QUEUED, "queued")
                return job, True
            except IntegrityError:
                continue  # a concurrent request with the same key won: read its job
        raise RuntimeError("could not create the job")  # pragma: no cover

    def _by_key(self, key: str) -> Job | None:
        with self._read() as session:
            return session.scalar(select(Job).where(Job.idempotency_key == key))

    def get_job(self, job_id: str) -> Job | None:
        with self._read() as session:
            return session.get(Job, job_id)

    def list_jobs(
        self, *, status: str | None = None, before_id: str | None = None, limit: int = 50
    ) -> list[Job]:
        """Newest first; `before_id` is the last id of the previous page."""
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if status is not None:
            query = query.where(Job.status == status)
        if before_id is not None:
            query = query.where(Job.id < before_id)
        with self._read() as session:
            return list(session.scalars(query))

    def counts(self) -> dict[str, int]:
        with self._read() as session:
            rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
            return {status: count for status, count in rows}

    def durations(self) -> list[tuple[str, float]]:
        """(status, seconds from start to finish) of every finished job that started."""
        with self._read() as session:
            rows = session.execute(
                select(Job.status, Job.started_at, Job.finished_at).where(
                    Job.status.in_(TERMINAL), Job.started_at.is_not(None)
                )
            )
            return [(s, (end - start).total_seconds()) for s, start, end in rows if end is not None]

    def request_cancel(self, job_id: str) -> Job | None:
        """Queued jobs end at once; running ones go to cancelling until their worker stops. Idempotent."""
        now = utcnow()
        with self._write() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                return None
            if job.status == QUEUED:
                job.status, job.finished_at, job.cancel_requested = CANCELLED, now, True
                self._state_event(session, job, CANCELLED, "cancelled before it started")
            elif job.status == RUNNING:
                job.status, job.cancel_requested = CANCELLING, True
                self._state_event(session, job, CANCELLING, "cancel requested")
            job.updated_at = now
            return job

    def delete_job(self, job_id: str) -> Job | None:
        with self._write() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                return None
            if job.status not in TERMINAL:
                raise NotTerminal(job.status)
            session.execute(delete(JobEvent).where(JobEvent.job_id == job_id))
            session.delete(job)
            return job

    # -- scheduling ------------------------------------------------------------------------------

    def claim_next(self, capacity: int, lease_seconds: float) -> Job | None:
        """Start the oldest queued job if fewer than `capacity` run; the conditional UPDATE is the claim."""
        now = utcnow()
        with self._write() as session:
            if self.engine.dialect.name == "postgresql":
                # Claims from several servers take turns, so the count below is exact (capacity is
                # for the whole store, not per server). SQLite's write lock does this already.
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK})
            active = session.scalar(select(func.count()).select_from(Job).where(Job.status.in_(ACTIVE)))
            if active >= capacity:
                return None
            candidate = session.scalar(
                select(Job.id)
                .where(Job.status == QUEUED)
                .order_by(Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if candidate is None:
                return None
            claimed = session.execute(
                update(Job)
                .where(Job.id == candidate, Job.status == QUEUED)
                .values(
                    status=RUNNING,
                    attempt=Job.attempt + 1,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    heartbeat_at=None,
                    started_at=func.coalesce(Job.started_at, now),
                    phase=None,
                    phase_started_at=None,
                    progress_done=None,
                    progress_total=None,
                    worker_host=None,
                    worker_pid=None,
                    updated_at=now,
                )
            ).rowcount
            if claimed != 1:
                return None
            job = session.get(Job, candidate, populate_existing=True)
            assert job is not None
            self._state_event(session, job, RUNNING, f"attempt {job.attempt} of {job.max_attempts} started")
            return job

    def record_worker(self, job_id: str, attempt: int, host: str, pid: int) -> bool:
        with self._write() as session:
            return (
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.attempt == attempt, Job.status.in_(ACTIVE))
                    .values(worker_host=host, worker_pid=pid, updated_at=utcnow())
                ).rowcount
                == 1
            )

    def heartbeat(self, job_id: str, attempt: int, lease_seconds: float) -> Heartbeat:
        now = utcnow()
        with self._write() as session:
            owned = (
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.attempt == attempt, Job.status.in_(ACTIVE))
                    .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds))
                ).rowcount
                == 1
            )
            cancel = bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))
            return Heartbeat(owned=owned, cancel_requested=cancel)

    def extend_lease(self, job_id: str, attempt: int, lease_seconds: float) -> bool:
        """The executor vouches for a worker that cannot heartbeat yet (queued in a cluster)."""
        with self._write() as session:
            return (
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.attempt == attempt, Job.status.in_(ACTIVE))
                    .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
                ).rowcount
                == 1
            )

    def active_jobs(self) -> list[Job]:
        with self._read() as session:
            return list(session.scalars(select(Job).where(Job.status.in_(ACTIVE)).order_by(Job.id)))

    def recover_lost(self, job_id: str, attempt: int, reason: str, *, counts: bool = True) -> str | None:
        """The attempt's worker is gone: re-queue the job, or fail it with worker_lost after max_attempts.

        `counts=False`: the worker handed the job back (it was stopped, not lost): it is re-queued and
        the attempt does not count against max_attempts (which grows by one to make room for it)."""
        with self._write() as session:
            job = session.scalar(
                select(Job)
                .where(Job.id == job_id, Job.attempt == attempt, Job.status.in_(ACTIVE))
                .with_for_update()
            )
            if job is None:
                return None
            now = utcnow()
            job.worker_pid = job.worker_host = job.lease_expires_at = None
            job.updated_at = now
            if job.cancel_requested:
                job.status, job.finished_at = CANCELLED, now
                self._state_event(session, job, CANCELLED, f"cancelled ({reason})")
            elif not counts:
                job.status, job.max_attempts = QUEUED, job.max_attempts + 1
                job.phase = job.phase_started_at = job.progress_done = job.progress_total = None
                self._state_event(
                    session, job, QUEUED, f"handed back ({reason}); re-queued, the attempt does not count"
                )
            elif job.attempt < job.max_attempts:
                job.status = QUEUED
                job.phase = job.phase_started_at = job.progress_done = job.progress_total = None
                self._state_event(session, job, QUEUED, f"worker lost ({reason}); re-queued")
            else:
                job.status, job.finished_at = FAILED, now
                job.error_code = WORKER_LOST
                job.error_message = f"the worker was lost on each of {job.attempt} attempts (last: {reason})"
                self._state_event(session, job, FAILED, job.error_message, code=WORKER_LOST)
            return job.status

    def requeue(self, job_id: str, attempt: int, reason: str) -> bool:
        """A worker stopped from outside (a server shutdown) hands its job back; that attempt does not
        count."""
        return self.recover_lost(job_id, attempt, reason, counts=False) == QUEUED

    def finish(
        self,
        job_id: str,
        attempt: int,
        status: str,
        *,
        error_code: str | None = None,
        error_message: str | None = None,
        manifest: dict[str, Any] | None = None,
        manifest_file: dict[str, Any] | None = None,
        artifact_dir: str | None = None,
        model_revision: str | None = None,
    ) -> str | None:
        """The worker's last word. A cancel request wins over any outcome. None: not the owner."""
        with self._write() as session:
            job = session.scalar(
                select(Job)
                .where(Job.id == job_id, Job.attempt == attempt, Job.status.in_(ACTIVE))
                .with_for_update()
            )
            if job is None:
                return None
            now = utcnow()
            if job.cancel_requested:
                status = CANCELLED
            job.status, job.finished_at, job.updated_at = status, now, now
            job.lease_expires_at = None
            if status == SUCCEEDED:
                job.manifest, job.artifact_dir, job.model_revision = manifest, artifact_dir, model_revision
                job.manifest_file = manifest_file
                # Done: no phase is under way (a failed or cancelled job keeps the phase it stopped in).
                job.phase = job.phase_started_at = job.progress_done = job.progress_total = None
                self._state_event(session, job, SUCCEEDED, "succeeded")
            elif status == FAILED:
                job.error_code, job.error_message = error_code or "internal", error_message or ""
                self._state_event(session, job, FAILED, job.error_message, code=job.error_code)
            else:
                self._state_event(session, job, CANCELLED, "cancelled")
            return status

    # -- uploads --------------------------------------------------------------------------------

    def add_upload(self, upload_id: str, filename: str, size: int, sha256: str) -> Upload:
        with self._write() as session:
            upload = Upload(id=upload_id, filename=filename, size=size, sha256=sha256, created_at=utcnow())
            session.add(upload)
            return upload

    def get_upload(self, upload_id: str) -> Upload | None:
        with self._read() as session:
            return session.get(Upload, upload_id)

    def upload_bytes(self) -> int:
        with self._read() as session:
            return int(session.scalar(select(func.coalesce(func.sum(Upload.size), 0))) or 0)

    def delete_upload(self, upload_id: str) -> bool:
        with self._write() as session:
            return session.execute(delete(Upload).where(Upload.id == upload_id)).rowcount == 1

    def jobs_using_upload(self, upload_id: str) -> list[str]:
        """Queued or running jobs that read the upload (as calibration or evaluation source)."""
        source = f"upload:{upload_id}"
        with self._read() as session:
            rows = session.execute(select(Job.id, Job.request).where(Job.status.in_((QUEUED, *ACTIVE))))
            return [job_id for job_id, request in rows if source in _sources(request)]
