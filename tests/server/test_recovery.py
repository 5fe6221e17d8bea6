"""Crashes: kill -9 the worker (re-queued, resumes from its last block and succeeds; or worker_lost
after max_attempts), kill -9 the server (the worker carries on and the restarted server adopts it),
kill -9 both (re-queued on restart), a graceful stop (handed back, resumed). No job is lost and none
runs twice."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from shears.client.client import ShearsClient
from shears.client.launch import ServerProcess
from shears.pruning.config import PruneRequest
from shears.pruning.engine import prune
from shears.server.settings import Settings
from tests.server.conftest import (
    first_block_done,
    medium_job,
    process_gone,
    store_of,
    wait_for,
    wait_for_event,
    worker_pid,
)


def _states(client: ShearsClient, job_id: str) -> list[tuple[int, str]]:
    events = client.events(job_id)["events"]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1)), "event ids must be gap-free"
    return [(e["attempt"], e["data"]["status"]) for e in events if e["kind"] == "state"]


def _check_succeeded(client: ShearsClient, server: ServerProcess, job: dict[str, Any], attempt: int) -> None:
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == attempt
    files = client.artifacts(job["id"])["files"]
    assert any(f["name"].endswith(".safetensors") for f in files)
    job_dir = server.data_dir / "jobs" / job["id"]
    assert sorted(p.name for p in job_dir.glob("attempt-*")) == [f"attempt-{attempt}"]
    assert not list(job_dir.glob("attempt-*/.*partial*"))


def test_killed_worker_resumes_from_its_last_block(start_server, model_root: Path, tmp_path: Path) -> None:
    """Issue 14: SIGKILL in the middle of block k > 0; the next attempt starts at block k and writes
    the same bytes as an uninterrupted run (the engine, in this process, with the server's options)."""
    server = start_server()
    client = ShearsClient(server.url)
    request = medium_job(model_root)
    job = client.submit(request)
    reported = wait_for_event(
        client, job["id"], lambda e: e["kind"] == "progress" and e["phase"] == "pruning" and e["done"] >= 2
    )
    os.kill(worker_pid(server, job["id"]), signal.SIGKILL)  # in block k: its checkpoint precedes the event
    block = reported["done"]
    final = client.wait(job["id"], timeout=600, poll=0.2)
    _check_succeeded(client, server, final, attempt=2)
    assert _states(client, job["id"]) == [
        (0, "queued"),
        (1, "running"),
        (1, "queued"),
        (2, "running"),
        (2, "succeeded"),
    ]
    events = client.events(job["id"])["events"]
    lost = [e for e in events if e["kind"] == "state" and e["attempt"] == 1][-1]
    assert "worker lost" in lost["message"]
    resumed = [e for e in events if e["kind"] == "resumed"]
    assert [(e["attempt"], e["data"]["from_block"]) for e in resumed] == [(2, block)]
    second = [e["done"] for e in events if e["attempt"] == 2 and e["kind"] == "progress"]
    assert second[0] == block + 1 and second[-1] == 6
    manifest = client.artifacts(job["id"])["manifest"]
    assert manifest["attempts"] == [{"attempt": 1, "from_block": 0}, {"attempt": 2, "from_block": block}]
    assert not (server.data_dir / "jobs" / job["id"] / "resume").exists()  # deleted with the job's end

    # The same request, uninterrupted, through the engine with the options the server gives workers.
    options = Settings(data_dir=server.data_dir, model_dirs=[model_root]).engine_options()
    reference = prune(PruneRequest.model_validate(request), tmp_path / "reference", options=options)
    served = {f["name"]: f["sha256"] for f in client.artifacts(job["id"])["files"]}
    assert served.pop("manifest.json")
    assert served == {e["name"]: e["sha256"] for e in reference["files"]}


def test_worker_lost_after_max_attempts(start_server, model_root: Path) -> None:
    server = start_server("--max-attempts", "1")
    client = ShearsClient(server.url)
    job = client.submit(medium_job(model_root))
    os.kill(worker_pid(server, job["id"]), signal.SIGKILL)
    final = client.wait(job["id"], timeout=60, poll=0.2)
    assert final["status"] == "failed" and final["attempt"] == 1
    assert final["error"]["code"] == "worker_lost"
    assert _states(client, job["id"]) == [(0, "queued"), (1, "running"), (1, "failed")]
    assert not list((server.data_dir / "jobs" / job["id"]).glob("attempt-*"))
    assert not (server.data_dir / "jobs" / job["id"] / "resume").exists()


def test_killed_server_restarts_and_adopts_the_running_worker(start_server, model_root: Path) -> None:
    server = start_server()
    client = ShearsClient(server.url)
    job = client.submit(medium_job(model_root))
    wait_for_event(client, job["id"], first_block_done)
    pid = worker_pid(server, job["id"])
    server.kill()
    assert not process_gone(pid), "the worker must outlive its server"
    restarted = start_server(data_dir=server.data_dir, port=server.port)
    final = client.wait(job["id"], timeout=240, poll=0.2)
    _check_succeeded(client, restarted, final, attempt=1)
    assert worker_pid(restarted, job["id"]) == pid
    assert _states(client, job["id"]) == [(0, "queued"), (1, "running"), (1, "succeeded")]  # ran once
    assert wait_for(lambda: process_gone(pid), timeout=30)


def test_killed_server_and_worker_requeue_on_restart(start_server, model_root: Path) -> None:
    server = start_server()
    client = ShearsClient(server.url)
    job = client.submit(medium_job(model_root))
    wait_for_event(client, job["id"], lambda e: e["kind"] == "phase" and e["phase"] == "pruning")
    pid = worker_pid(server, job["id"])
    server.kill()
    os.kill(pid, signal.SIGKILL)
    restarted = start_server(data_dir=server.data_dir, port=server.port)
    final = client.wait(job["id"], timeout=240, poll=0.2)
    _check_succeeded(client, restarted, final, attempt=2)
    assert _states(client, job["id"]) == [
        (0, "queued"),
        (1, "running"),
        (1, "queued"),
        (2, "running"),
        (2, "succeeded"),
    ]


def test_lease_expiry_requeues_a_silent_worker(tmp_path: Path, model_root: Path) -> None:
    """A worker on another host (or hung) that stops heartbeating loses its job when the lease ends."""
    from shears.server.db import migrate
    from shears.server.dispatcher import Dispatcher
    from shears.server.executors.local import LocalExecutor
    from shears.server.settings import Settings
    from shears.server.store import Store

    settings = Settings(data_dir=tmp_path, lease_seconds=0.5, min_free_disk_bytes=0, max_concurrent_jobs=0)
    store = Store(settings.resolved_store_url)
    migrate(store.engine)
    job = store.create_job({"model": "x"}, max_attempts=2)[0]
    claimed = store.claim_next(capacity=1, lease_seconds=0.5)
    store.record_worker(job.id, claimed.attempt, "another-host", 12345)
    dispatcher = Dispatcher(settings, store, LocalExecutor(settings))
    dispatcher.tick()
    assert store.get_job(job.id).status == "running"  # lease still valid, other host: left alone
    wait_for(
        lambda: (dispatcher.tick(), store.get_job(job.id).status == "queued")[1], timeout=10, interval=0.2
    )
    assert "no heartbeat" in store.events(job.id)[-1].message


def test_graceful_stop_hands_the_job_back(start_server, model_root: Path) -> None:
    """Issue 14, item 10: a graceful restart does not use up an attempt, even the only one."""
    server = start_server("--max-attempts", "1")
    client = ShearsClient(server.url)
    job = client.submit(medium_job(model_root))
    wait_for_event(client, job["id"], lambda e: e["kind"] == "phase" and e["phase"] == "pruning")
    wait_for_event(client, job["id"], first_block_done)
    pid = worker_pid(server, job["id"])
    server.stop()  # SIGTERM: the server stops its workers; each hands its job back to the queue
    assert process_gone(pid)
    store = store_of(server)
    stored = store.get_job(job["id"])
    assert stored.status == "queued" and stored.error_code is None
    assert "handed back" in store.events(job["id"])[-1].message
    store.close()
    restarted = start_server("--max-attempts", "1", data_dir=server.data_dir, port=server.port)
    final = client.wait(job["id"], timeout=240, poll=0.2)
    _check_succeeded(client, restarted, final, attempt=2)
    assert final["max_attempts"] == 2  # the handed-back attempt made room for itself
    resumed = [e for e in client.events(job["id"])["events"] if e["kind"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["attempt"] == 2 and resumed[0]["data"]["from_block"] >= 1
