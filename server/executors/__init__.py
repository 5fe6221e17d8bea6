"""Executors start and stop workers (`shears worker JOB_ID`). The job store, not the executor, holds
the state, so an executor can be swapped: local processes, or Ray jobs on a cluster (executors/ray.py)."""

from __future__ import annotations

from typing import Protocol

from shears.server.models import Job
from shears.server.settings import Settings


class Executor(Protocol):
    name: str

    def launch(self, job_id: str, attempt: int) -> tuple[str, int | None]:
        """Start the worker for this attempt; returns (host, pid) to record in the store (pid None: the
        worker records where it runs itself)."""

    def exited(self) -> list[tuple[str, int, int]]:
        """(job id, attempt, exit code) of the workers that ended since the last call."""

    def alive(self, job: Job) -> bool | None:
        """Whether the job's worker still runs; None when this executor cannot tell."""

    def signal(self, job: Job, *, kill: bool) -> bool:
        """SIGTERM (kill=False) or SIGKILL the job's worker; False when it is not ours to signal."""

    def running(self) -> list[tuple[str, int]]:
        """(job id, attempt) of the workers this executor started that have not ended."""


def make_executor(settings: Settings) -> Executor:
    if settings.executor == "local":
        from shears.server.executors.local import LocalExecutor

        return LocalExecutor(settings)
    if settings.executor == "ray":
        from shears.server.executors.ray import RayExecutor

        return RayExecutor(settings)
    raise ValueError(f"unknown executor {settings.executor!r}")  # pragma: no cover
