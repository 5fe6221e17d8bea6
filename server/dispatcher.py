"""The server's scheduling loop (a thread of the API process; the jobs themselves never run here).

Each tick: notice workers that ended or went silent (re-queue or fail their jobs), carry out cancel
requests (SIGTERM, then SIGKILL after a grace period), and start queued jobs while there is room.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time

from shears.server.executors import Executor
from shears.server.models import CANCELLING, QUEUED, Job, utcnow
from shears.server.settings import Settings
from shears.server.store import Store
from shears.server.worker import RESUME_DIR

log = logging.getLogger("shears.server")


class Dispatcher:
    def __init__(self, settings: Settings, store: Store, executor: Executor) -> None:
        self.settings, self.store, self.executor = settings, store, executor
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._terminated_at: dict[tuple[str, int], float] = {}
        self._low_disk_logged = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="shears-dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop scheduling, then stop the workers this process started: each hands its job back to the
        queue (or, after max_attempts, the job fails); nothing keeps running after the server exits."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._stop_workers()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a database hiccup must not end scheduling for good
                log.exception("dispatcher tick failed")
            self._stop.wait(self.settings.dispatch_interval_seconds)

    def tick(self) -> None:
        for job_id, attempt, code in self.executor.exited():
            log_name = f"jobs/{job_id}/worker-{attempt}.log"
            self._lost(job_id, attempt, f"worker exited with code {code} without finishing ({log_name})")
        now = utcnow()
        for job in self.store.active_jobs():
            alive = self.executor.alive(job)
            pending = getattr(self.executor, "pending", None)
            if alive is False:
                self._lost(job.id, job.attempt, "the worker process is gone")
            elif pending is not None and job.status != CANCELLING and pending(job):
                # Waiting in the cluster's queue for a GPU: no worker to heartbeat yet, not lost.
                self.store.extend_lease(job.id, job.attempt, self.settings.lease_seconds)
            elif job.lease_expires_at is not None and job.lease_expires_at < now:
                self.executor.signal(job, kill=True)
                self._lost(job.id, job.attempt, "no heartbeat before the lease expired")
            elif job.status == CANCELLING:
                self._cancel(job)
        self._start_queued()

    def disk_ok(self) -> bool:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.settings.data_dir).free
        ok = free >= self.settings.min_free_disk_bytes
        if not ok and not self._low_disk_logged:
            log.warning(
                "only %d bytes free under %s (minimum %d): queued jobs wait",
                free,
                self.settings.data_dir,
                self.settings.min_free_disk_bytes,
            )
        self._low_disk_logged = not ok
        return ok

    def _start_queued(self) -> None:
        capacity = self.settings.concurrency
        if capacity == 0 or not self.disk_ok():
            return
        while (job := self.store.claim_next(capacity, self.settings.lease_seconds)) is not None:
            try:
                host, pid = self.executor.launch(job.id, job.attempt)
            except Exception as exc:
                log.exception("could not start the worker of %s", job.id)
                self.store.finish(
                    job.id,
                    job.attempt,
                    "failed",
                    error_code="internal",
                    error_message=f"could not start the worker: {exc}",
                )
                continue
            if pid is not None:
                self.store.record_worker(job.id, job.attempt, host, pid)
            log.info("job %s attempt %d: worker %s pid %s", job.id, job.attempt, host, pid)

    def _cancel(self, job: Job) -> None:
        key = (job.id, job.attempt)
        sent = self._terminated_at.get(key)
        if sent is None:
            if self.executor.signal(job, kill=False):
                self._terminated_at[key] = time.monotonic()
        elif time.monotonic() - sent > self.settings.cancel_grace_seconds:
            log.warning("job %s: worker ignored SIGTERM for %.0f s; SIGKILL", job.id, time.monotonic() - sent)
            self.executor.signal(job, kill=True)

    def _lost(self, job_id: str, attempt: int, reason: str) -> None:
        self._terminated_at.pop((job_id, attempt), None)
        status = self.store.recover_lost(job_id, attempt, reason)
        if status is not None:
            log.warning("job %s attempt %d: %s -> %s", job_id, attempt, reason, status)
            shutil.rmtree(self.settings.jobs_dir / job_id / f"attempt-{attempt}", ignore_errors=True)
            if status != QUEUED:  # over: its checkpoints will not be resumed
                shutil.rmtree(self.settings.jobs_dir / job_id / RESUME_DIR, ignore_errors=True)

    def _stop_workers(self) -> None:
        running = self.executor.running()
        jobs = [job for job_id, _ in running if (job := self.store.get_job(job_id)) is not None]
        for job in jobs:
            self.executor.signal(job, kill=False)
        deadline = time.monotonic() + self.settings.cancel_grace_seconds
        while self.executor.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        for job in jobs:
            self.executor.signal(job, kill=True)
        deadline = time.monotonic() + 5
        while self.executor.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        for job_id, attempt, code in self.executor.exited():
            self._lost(job_id, attempt, f"worker stopped with the server (exit code {code})")
