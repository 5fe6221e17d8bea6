"""Cancel: a running job's worker gets SIGTERM and the job ends cancelled with nothing left behind;
a worker that ignores SIGTERM gets SIGKILL after the grace period."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from shears.client.client import ShearsClient
from shears.server.db import migrate
from shears.server.dispatcher import Dispatcher
from shears.server.executors.local import LocalExecutor
from shears.server.settings import Settings
from shears.server.store import Store
from tests.server.conftest import medium_job, process_gone, wait_for, wait_for_event, worker_pid


def test_cancel_while_running(start_server, model_root: Path) -> None:
    server = start_server()
    client = ShearsClient(server.url)
    job = client.submit(medium_job(model_root))
    wait_for_event(client, job["id"], lambda e: e["kind"] == "phase" and e["phase"] == "pruning")
    pid = worker_pid(server, job["id"])
    start = time.monotonic()
    assert client.cancel(job["id"])["status"] in ("cancelling", "cancelled")
    final = client.wait(job["id"], timeout=60, poll=0.1)
    took = time.monotonic() - start
    assert final["status"] == "cancelled" and final["error"] is None and final["attempt"] == 1
    assert took < 5, f"cancel took {took:.1f} s: SIGTERM should stop the worker well before the SIGKILL"
    assert wait_for(lambda: process_gone(pid), timeout=10)
    assert client.cancel(job["id"])["status"] == "cancelled"  # idempotent
    states = [e["data"]["status"] for e in client.events(job["id"])["events"] if e["kind"] == "state"]
    assert states == ["queued", "running", "cancelling", "cancelled"]
    job_dir = server.data_dir / "jobs" / job["id"]
    assert not list(job_dir.glob("attempt-*")), "the attempt's partial output must be removed"
    assert not (job_dir / "resume").exists(), "a cancelled job's checkpoints must be removed"
    assert 'shears_jobs{status="cancelled"} 1.0' in client.metrics()


class _StubbornExecutor(LocalExecutor):
    """Starts a real process that ignores SIGTERM, in place of a worker."""

    def command(self, job_id: str, attempt: int) -> list[str]:
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
        return [sys.executable, "-c", code, job_id]


def test_sigkill_after_grace_period(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, cancel_grace_seconds=1.0, min_free_disk_bytes=0, max_concurrent_jobs=1
    )
    store = Store(settings.resolved_store_url)
    migrate(store.engine)
    dispatcher = Dispatcher(settings, store, _StubbornExecutor(settings))
    job = store.create_job({"model": "x"}, max_attempts=3)[0]
    dispatcher.tick()
    running = store.get_job(job.id)
    assert running.status == "running" and running.worker_pid
    time.sleep(0.5)  # let the process install its handler
    store.request_cancel(job.id)
    start = time.monotonic()
    dispatcher.tick()  # SIGTERM, ignored
    time.sleep(0.3)
    dispatcher.tick()
    assert not process_gone(running.worker_pid) and store.get_job(job.id).status == "cancelling"
    wait_for(
        lambda: (dispatcher.tick(), store.get_job(job.id).status == "cancelled")[1], timeout=20, interval=0.2
    )
    assert time.monotonic() - start >= 1.0
    assert process_gone(running.worker_pid)
    assert [e.message for e in store.events(job.id)][-1].startswith("cancelled")
