"""Each job in its own process on this machine: `python -m server worker JOB_ID --attempt N`.

Spawned with subprocess (never forked from the API process, which may hold threads, sockets or a
CUDA context) in a session of its own, so a terminal's Ctrl-C reaches only the server, and
SIGTERM/SIGKILL go to the worker's whole process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

import psutil

from shears.server.models import Job
from shears.server.settings import Settings


@dataclass
class _Worker:
    job_id: str
    attempt: int
    process: subprocess.Popen[bytes]


class LocalExecutor:
    name = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.host = socket.gethostname()
        self._workers: dict[int, _Worker] = {}

    def command(self, job_id: str, attempt: int) -> list[str]:
        return [sys.executable, "-m", "shears.server", "worker", job_id, "--attempt", str(attempt)]

    def launch(self, job_id: str, attempt: int) -> tuple[str, int]:
        job_dir = self.settings.jobs_dir / job_id
        workdir = job_dir / f"attempt-{attempt}"
        workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.settings.worker_env()}
        env.pop("SHEARS_TOKEN", None)
        with open(job_dir / f"worker-{attempt}.log", "ab") as log:
            # cwd: an empty folder, so nothing in a request can name a file relative to the server's.
            process = subprocess.Popen(
                self.command(job_id, attempt),
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._workers[process.pid] = _Worker(job_id, attempt, process)
        return self.host, process.pid

    def exited(self) -> list[tuple[str, int, int]]:
        ended = []
        for pid, worker in list(self._workers.items()):
            code = worker.process.poll()
            if code is not None:
                del self._workers[pid]
                ended.append((worker.job_id, worker.attempt, code))
        return ended

    def running(self) -> list[tuple[str, int]]:
        return [(w.job_id, w.attempt) for w in self._workers.values() if w.process.poll() is None]

    def _ours(self, job: Job) -> int | None:
        """The worker's pid if it runs on this host as this job's worker (guards against pid reuse)."""
        if job.worker_host != self.host or job.worker_pid is None:
            return None
        pid = job.worker_pid
        worker = self._workers.get(pid)
        if worker is not None:
            return pid if worker.job_id == job.id and worker.process.poll() is None else None
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE or job.id not in process.cmdline():
                return None
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return pid

    def alive(self, job: Job) -> bool | None:
        if job.worker_host != self.host or job.worker_pid is None:
            return None
        return self._ours(job) is not None

    def signal(self, job: Job, *, kill: bool) -> bool:
        pid = self._ours(job)
        if pid is None:
            return False
        try:
            os.killpg(pid, signal.SIGKILL if kill else signal.SIGTERM)
        except ProcessLookupError:
            return False
        return True
