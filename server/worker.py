"""`shears worker JOB_ID`: runs one attempt of one job in this process, reporting to the job store.

Started by an executor after it claimed the job. A heartbeat thread renews the lease; when the store
says the job was cancelled or the lease was lost, the thread sends this process SIGTERM, which the
main thread turns into an exception so the engine removes its partial output on the way out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from shears.errors import JOB_ERROR_CODES, ShearsError
from shears.progress import Event
from shears.server.disk import is_disk_full
from shears.server.models import ACTIVE, CANCELLED, FAILED, SUCCEEDED
from shears.server.settings import Settings
from shears.server.store import Store

log = logging.getLogger("shears.worker")
_PROGRESS_EVERY = 0.5  # seconds between stored progress events of one phase
RESUME_DIR = "resume"  # <jobs>/<id>/resume: the job's checkpoints, kept across attempts (pruning.resume)


class Terminated(KeyboardInterrupt):
    """SIGTERM: a cancel, a server shutdown or a lost lease. A KeyboardInterrupt, so that code that
    catches Exception does not swallow it, and the engine cleans up as it does for Ctrl-C."""


class _Signals:
    def __init__(self) -> None:
        self.deferred = False
        self.received = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, _signum: int, _frame: Any) -> None:
        if self.received:
            return
        self.received = True
        if not self.deferred:
            raise Terminated()


class _Heartbeat(threading.Thread):
    def __init__(self, store: Store, job_id: str, attempt: int, settings: Settings) -> None:
        super().__init__(name="shears-heartbeat", daemon=True)
        self.store, self.job_id, self.attempt, self.settings = store, job_id, attempt, settings
        self.halt = threading.Event()
        self.signalled = False

    def run(self) -> None:
        while True:
            try:
                beat = self.store.heartbeat(self.job_id, self.attempt, self.settings.lease_seconds)
                if (not beat.owned or beat.cancel_requested) and not self.signalled:
                    self.signalled = True
                    os.kill(os.getpid(), signal.SIGTERM)
            except Exception:  # the store is unreachable: keep trying; the lease decides
                log.exception("heartbeat failed")
            if self.halt.wait(self.settings.heartbeat_seconds):
                return


def json_safe(value: Any) -> Any:
    """JSON for any store (PostgreSQL's jsonb refuses NaN and infinities: they become null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return json_safe(json.loads(json.dumps(value, default=str)))


class _Reporter:
    def __init__(self, store: Store, job_id: str, attempt: int) -> None:
        self.store, self.job_id, self.attempt = store, job_id, attempt
        self._last_progress: dict[str | None, float] = {}

    def __call__(self, event: Event) -> None:
        if event.kind == "progress" and event.done != event.total:
            now = time.monotonic()
            if now - self._last_progress.get(event.phase, 0.0) < _PROGRESS_EVERY:
                return
            self._last_progress[event.phase] = now
        self.log(
            event.kind,
            event.message,
            phase=event.phase,
            done=event.done,
            total=event.total,
            data=json_safe(event.data),
        )

    def log(self, kind: str, message: str, **fields: Any) -> None:
        if not self.store.add_event(self.job_id, self.attempt, kind, message=message, **fields):
            raise Terminated()  # the job is no longer ours (its lease was taken over)


def run(job_id: str, attempt: int | None, settings: Settings) -> int:
    signals = _Signals()
    signals.install()
    store = Store(settings.resolved_store_url)
    job = store.get_job(job_id)
    if job is None or job.status not in ACTIVE or (attempt is not None and job.attempt != attempt):
        print(f"job {job_id} attempt {attempt} is not running: nothing to do", file=sys.stderr)
        return 3
    attempt = job.attempt
    store.record_worker(job_id, attempt, socket.gethostname(), os.getpid())
    heartbeat = _Heartbeat(store, job_id, attempt, settings)
    heartbeat.start()
    job_dir = settings.jobs_dir / job_id
    out_dir = job_dir / f"attempt-{attempt}" / "out"
    reporter = _Reporter(store, job_id, attempt)
    outcome: str | None = None
    handed_back = False
    try:
        if settings.worker_nice:
            os.nice(settings.worker_nice)
        outcome = _run_job(store, job.request, out_dir, settings, reporter, signals, attempt, job_id)
    except Terminated:
        signals.deferred = True
        beat = store.heartbeat(job_id, attempt, settings.lease_seconds)
        if beat.cancel_requested:
            outcome = store.finish(job_id, attempt, CANCELLED)
        elif beat.owned:
            handed_back = store.requeue(job_id, attempt, "the worker was stopped (SIGTERM)")
    except Exception as exc:
        signals.deferred = True
        code = exc.code if isinstance(exc, ShearsError) and exc.code in JOB_ERROR_CODES else "internal"
        if isinstance(exc, MemoryError):
            code = "out_of_memory"
        message = str(exc) if isinstance(exc, ShearsError) else f"{type(exc).__name__}: {exc}"
        if is_disk_full(exc):  # the server's condition, not a bug: say what to do about it
            code = "out_of_disk"
            message = (
                f"the server's disk filled up while the job ran ({message}); its partial output was "
                "removed; free disk space, then submit the job again"
            )
        elif not isinstance(exc, ShearsError):
            traceback.print_exc()
            store.add_event(
                job_id, attempt, "log", message="traceback", data={"traceback": traceback.format_exc()}
            )
        outcome = store.finish(job_id, attempt, FAILED, error_code=code, error_message=message)
    finally:
        signals.deferred = True
        heartbeat.halt.set()
        # With remote artifact storage the local copy is not needed once uploaded.
        _clean(job_dir, attempt, keep_output=outcome == SUCCEEDED and not settings.artifacts_url)
        if outcome is not None and not handed_back:  # the job is over: nothing will resume it
            shutil.rmtree(job_dir / RESUME_DIR, ignore_errors=True)
        store.close()
    return 0 if outcome == SUCCEEDED else 1


def _run_job(
    store: Store,
    request_data: dict[str, Any],
    out_dir: Path,
    settings: Settings,
    reporter: _Reporter,
    signals: _Signals,
    attempt: int,
    job_id: str,
) -> str | None:
    from shears.pruning.config import PruneRequest
    from shears.server.admission import admit
    from shears.server.artifacts import verify_folder

    request = PruneRequest.model_validate(request_data)
    admit(request, settings, lambda upload_id: store.get_upload(upload_id) is not None)
    storage = settings.artifact_storage()
    if storage is not None:
        _fetch_uploads(request, store, storage, settings)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    from shears.pruning.engine import prune
    from shears.pruning.resume import Checkpoints

    # Another attempt's worker may still hold the checkpoints (its lease ran out, it has not noticed
    # yet): then this attempt starts over in a folder of its own, and saves none.
    checkpoints = Checkpoints.acquire(
        settings.jobs_dir / job_id / RESUME_DIR,
        attempt=attempt,
        min_free_bytes=settings.min_free_disk_bytes,
        interval_seconds=settings.checkpoint_interval_seconds,
    )
    if checkpoints is None:
        reporter.log("log", "the job's checkpoints are held by another worker; starting over without them")
    manifest = prune(
        request, out_dir, reporter=reporter, options=settings.engine_options(), checkpoints=checkpoints
    )
    manifest_file = verify_folder(out_dir, manifest)
    reporter.log("log", "artifacts checked against the manifest")
    artifact_dir = out_dir.relative_to(settings.jobs_dir / job_id).as_posix()
    if storage is not None:
        storage.upload(out_dir, job_id, artifact_dir, manifest)
        reporter.log("log", f"artifacts uploaded to {storage.url}")
    signals.deferred = True  # from here on a SIGTERM no longer interrupts: the job is done
    revision = (manifest.get("model") or {}).get("revision")
    return store.finish(
        job_id,
        attempt,
        SUCCEEDED,
        manifest=json_safe(manifest),
        manifest_file=manifest_file,
        artifact_dir=artifact_dir,
        model_revision=str(revision)[:128] if revision else None,
    )


def _fetch_uploads(request: Any, store: Store, storage: Any, settings: Settings) -> None:
    """Calibration uploads named by the request, copied from shared storage to this host if missing."""
    sources = [request.calibration.source, getattr(request.evaluation, "source", None)]
    for source in sources:
        if isinstance(source, str) and source.startswith("upload:"):
            record = store.get_upload(source.removeprefix("upload:"))
            if record is not None:
                suffix = Path(record.filename).suffix.lower() or ".txt"
                storage.fetch_upload(f"{record.id}{suffix}", settings.uploads_dir)


def _clean(job_dir: Path, attempt: int, *, keep_output: bool) -> None:
    """Remove this attempt's folder unless it holds the job's artifacts, and older attempts' folders."""
    for path in job_dir.glob("attempt-*"):
        if path.name == f"attempt-{attempt}" and keep_output:
            continue
        try:
            number = int(path.name.removeprefix("attempt-"))
        except ValueError:
            continue
        if number <= attempt:
            shutil.rmtree(path, ignore_errors=True)
