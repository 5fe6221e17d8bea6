"""Each job attempt as a Ray job on a Ray cluster: `python -m server worker JOB_ID --attempt N`, the
entry point the local executor runs, placed by Ray on a node with the GPUs it asks for.

Ray's submission id is the Shears job id (attempt 1; a re-run attempt N is `<job id>-<N>`), so a
restarted server finds its jobs again (reconcile): a Ray job that ended for the store's running attempt
means the worker is gone. (Re-using the bare id after `delete_job` races with Ray tearing down the old
job's supervisor: the new job fails at once, hence the suffix; Ray also keeps each attempt's logs.)
Before an attempt is submitted, any earlier attempt's Ray job still running is stopped, so an attempt
never runs twice. Ray jobs outlive the API server: a server shutdown leaves them running, and the next
server adopts them.

Imports Ray only when this executor is chosen (`pip install 'shears[ray]'`).
"""

from __future__ import annotations

import logging
import shlex
import time
from typing import Any

from shears.server.models import Job
from shears.server.settings import Settings

log = logging.getLogger("shears.server")
_TERMINAL = {"STOPPED", "SUCCEEDED", "FAILED"}
_CACHE_SECONDS = 0.2  # one status query per job per dispatcher tick


def submission_id(job_id: str, attempt: int) -> str:
    """Ray's submission id for a job's attempt: the job id itself for the first."""
    return job_id if attempt <= 1 else f"{job_id}-{attempt}"


class RayExecutor:
    name = "ray"

    def __init__(self, settings: Settings) -> None:
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError as exc:
            raise RuntimeError("--executor ray needs Ray's job client: pip install 'shears[ray]'") from exc
        self.settings = settings
        self.client = JobSubmissionClient(settings.ray_address)
        self._launched: dict[str, int] = {}  # job id -> attempt this server submitted, not seen ending
        self._info: dict[str, tuple[float, Any]] = {}

    # -- Ray's view of a job ---------------------------------------------------------------------

    def _job_info(self, job_id: str, *, fresh: bool = False) -> Any | None:
        """Ray's JobDetails for the submission id, or None when Ray has no such job."""
        cached = self._info.get(job_id)
        if cached is not None and not fresh and time.monotonic() - cached[0] < _CACHE_SECONDS:
            return cached[1]
        try:
            info = self.client.get_job_info(job_id)
        except RuntimeError as exc:  # the client raises RuntimeError for HTTP errors
            if "does not exist" not in str(exc):
                raise
            info = None
        self._info[job_id] = (time.monotonic(), info)
        return info

    @staticmethod
    def _status(info: Any) -> str:
        return str(getattr(info.status, "value", info.status))

    def _stop_earlier(self, job_id: str, attempt: int) -> None:
        """Stop any earlier attempt's Ray job that still runs (its lease ran out, say) and wait for it."""
        for earlier in range(1, attempt):
            sid = submission_id(job_id, earlier)
            info = self._job_info(sid, fresh=True)
            if info is None or self._status(info) in _TERMINAL:
                continue
            log.warning("job %s: stopping the Ray job %s of attempt %d first", job_id, sid, earlier)
            self.client.stop_job(sid)
            deadline = time.monotonic() + 60
            while self._status(self._job_info(sid, fresh=True)) not in _TERMINAL:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the earlier Ray job {sid} did not stop within 60 s")
                time.sleep(0.5)

    # -- the Executor protocol ---------------------------------------------------------------------

    def entrypoint(self, job_id: str, attempt: int) -> str:
        # exec: the worker is the entry point's process itself, so Ray's stop signal reaches it.
        python = shlex.quote(self.settings.ray_python)
        return f"exec {python} -m server worker {shlex.quote(job_id)} --attempt {attempt}"

    def launch(self, job_id: str, attempt: int) -> tuple[str, int | None]:
        self._stop_earlier(job_id, attempt)
        sid = submission_id(job_id, attempt)
        self.client.submit_job(
            entrypoint=self.entrypoint(job_id, attempt),
            submission_id=sid,
            runtime_env={"env_vars": self.settings.worker_env()},
            metadata={"shears_attempt": str(attempt)},
            entrypoint_num_gpus=self.settings.ray_gpus_per_job or None,
            entrypoint_num_cpus=self.settings.ray_cpus_per_job or None,
        )
        self._launched[job_id] = attempt
        # The worker records its own host and pid once Ray starts it.
        return f"ray:{sid}", None

    def exited(self) -> list[tuple[str, int, int]]:
        ended = []
        for job_id, attempt in list(self._launched.items()):
            info = self._job_info(submission_id(job_id, attempt))
            if info is not None and self._status(info) not in _TERMINAL:
                continue
            del self._launched[job_id]
            code = getattr(info, "driver_exit_code", None) if info is not None else None
            ended.append((job_id, attempt, code if code is not None else -1))
        return ended

    def alive(self, job: Job) -> bool | None:
        """False only on Ray's word that this attempt's Ray job ended; None while Ray has no job for
        the attempt yet (another server may be between its claim and its submit): the lease decides."""
        info = self._job_info(submission_id(job.id, job.attempt))
        if info is None:
            return None
        return self._status(info) not in _TERMINAL

    def pending(self, job: Job) -> bool:
        """Ray holds the job until a node has the GPUs it asks for: its worker cannot heartbeat yet."""
        info = self._job_info(submission_id(job.id, job.attempt))
        return info is not None and self._status(info) == "PENDING"

    def signal(self, job: Job, *, kill: bool) -> bool:
        """Stop the attempt's Ray job (Ray sends SIGTERM, then SIGKILL after its own grace period)."""
        sid = submission_id(job.id, job.attempt)
        info = self._job_info(sid, fresh=True)
        if info is None or self._status(info) in _TERMINAL:
            return False
        return bool(self.client.stop_job(sid))

    def running(self) -> list[tuple[str, int]]:
        # Ray jobs do not end with the API server: nothing for a shutdown to stop; the next server
        # finds them by submission id.
        return []
