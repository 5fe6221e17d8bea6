"""The Ray executor against a local Ray head (127.0.0.1, 2 CPUs) with a PostgreSQL store: a job runs
through Ray end to end under the Shears job id as Ray's submission id; cancel stops the Ray job; a killed
worker's job is re-queued and run again (Ray submission id <job id>-2), never twice at once; a restarted
server reconciles with Ray (adopts running Ray jobs, re-queues the ones that ended while it was down)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from shears.client.client import ShearsClient
from shears.server.store import Store
from tests.server.conftest import (
    first_block_done,
    job_request,
    medium_job,
    process_gone,
    wait_for,
    wait_for_event,
)


@pytest.fixture
def ray_server(start_server, ray_head, postgres, tmp_path: Path):
    """start_ray_server(*flags) -> a `shears serve --executor ray` on a fresh PostgreSQL database."""
    store_url = postgres.new_database()

    def start(*flags: str):
        server = start_server(
            "--store",
            store_url,
            "--executor",
            "ray",
            "--ray-address",
            ray_head.address,
            "--ray-python",
            sys.executable,
            "--ray-gpus-per-job",
            "0",
            "--max-concurrent-jobs",
            "1",
            *flags,
            data_dir=tmp_path / "data",
        )
        server.store_url = store_url
        return server

    return start


def _worker_pid(store_url: str, job_id: str, attempt: int) -> int:
    store = Store(store_url)
    try:
        return wait_for(
            lambda: (job := store.get_job(job_id)).attempt == attempt and job.worker_pid, timeout=120
        )
    finally:
        store.close()


def _states(client: ShearsClient, job_id: str) -> list[tuple[int, str]]:
    events = client.events(job_id)["events"]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1)), "event ids must be gap-free"
    return [(e["attempt"], e["data"]["status"]) for e in events if e["kind"] == "state"]


def _ray_status(ray_head: Any, job_id: str) -> tuple[str, dict[str, str]]:
    info = ray_head.client().get_job_info(job_id)
    return str(getattr(info.status, "value", info.status)), info.metadata or {}


def test_job_runs_as_a_ray_job(ray_server, ray_head, model_root: Path) -> None:
    server = ray_server()
    client = ShearsClient(server.url)
    job = client.wait(client.submit(job_request(model_root / "tiny"))["id"], timeout=300, poll=0.3)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 1
    assert _states(client, job["id"]) == [(0, "queued"), (1, "running"), (1, "succeeded")]
    _, metadata = wait_for(lambda: (s := _ray_status(ray_head, job["id"]))[0] == "SUCCEEDED" and s)
    assert metadata["shears_attempt"] == "1"
    info = ray_head.client().get_job_info(job["id"])
    assert f"-m server worker {job['id']} --attempt 1" in info.entrypoint
    assert len(client.artifacts(job["id"])["files"]) > 2


def test_cancel_stops_the_ray_job(ray_server, ray_head, model_root: Path) -> None:
    server = ray_server()
    client = ShearsClient(server.url)
    job = client.submit(medium_job(model_root))
    wait_for_event(client, job["id"], lambda e: e["kind"] == "phase" and e["phase"] == "pruning", 180)
    pid = _worker_pid(server.store_url, job["id"], 1)
    client.cancel(job["id"])
    final = client.wait(job["id"], timeout=90, poll=0.2)
    assert final["status"] == "cancelled" and final["attempt"] == 1
    assert wait_for(lambda: process_gone(pid), timeout=30)
    assert wait_for(lambda: _ray_status(ray_head, job["id"])[0] in ("STOPPED", "FAILED", "SUCCEEDED"))
    assert _states(client, job["id"])[-2:] == [(1, "cancelling"), (1, "cancelled")]


def test_killed_ray_worker_is_requeued_and_run_again(ray_server, ray_head, model_root: Path) -> None:
    server = ray_server()
    client = ShearsClient(server.url)
    job = client.submit(medium_job(model_root))
    wait_for_event(client, job["id"], first_block_done, 180)
    os.kill(_worker_pid(server.store_url, job["id"], 1), signal.SIGKILL)
    final = client.wait(job["id"], timeout=300, poll=0.3)
    assert final["status"] == "succeeded", final["error"]
    assert final["attempt"] == 2
    assert _states(client, job["id"]) == [
        (0, "queued"),
        (1, "running"),
        (1, "queued"),
        (2, "running"),
        (2, "succeeded"),
    ]
    assert _ray_status(ray_head, job["id"])[0] == "FAILED"  # attempt 1, killed
    second = wait_for(lambda: (s := _ray_status(ray_head, f"{job['id']}-2"))[0] != "RUNNING" and s)
    assert second == ("SUCCEEDED", {"shears_attempt": "2"})
    # Attempt 1 wrote nothing after it was taken away: its last event precedes the re-queue.
    events = client.events(job["id"])["events"]
    requeue = next(
        e["id"]
        for e in events
        if e["kind"] == "state" and e["data"]["status"] == "queued" and e["attempt"] == 1
    )
    assert all(e["id"] <= requeue for e in events if e["attempt"] == 1)
    # Attempt 2 continued from attempt 1's last finished block (its checkpoint).
    resumed = [e for e in events if e["kind"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["attempt"] == 2 and resumed[0]["data"]["from_block"] >= 1


def test_restarted_server_reconciles_with_ray(ray_server, ray_head, model_root: Path) -> None:
    # A long lease: anything noticed below comes from asking Ray, not from a lease running out.
    slow_lease = ("--lease-seconds", "600")
    first = ray_server(*slow_lease)
    client = ShearsClient(first.url)
    job = client.submit(medium_job(model_root))
    wait_for_event(client, job["id"], first_block_done, 180)
    first.kill()  # the API server crashes; the Ray job goes on
    pid = _worker_pid(first.store_url, job["id"], 1)
    os.kill(pid, signal.SIGKILL)  # and the worker dies while no server watches
    wait_for(lambda: _ray_status(ray_head, job["id"])[0] in ("FAILED", "STOPPED"), timeout=60)

    second = ray_server(*slow_lease)
    client = ShearsClient(second.url)
    # The new server finds the attempt's Ray job ended: re-queued and run again (not after 600 s).
    # (It resumes after attempt 1's last block: its first progress event is not necessarily block 1.)
    wait_for_event(client, job["id"], lambda e: e["attempt"] == 2 and e["kind"] == "progress", 240)
    second.kill()  # crash again, this time with the worker alive: the next server adopts it
    third = ray_server(*slow_lease)
    client = ShearsClient(third.url)
    final = client.wait(job["id"], timeout=300, poll=0.3)
    assert final["status"] == "succeeded", final["error"]
    assert final["attempt"] == 2
    assert _states(client, job["id"]) == [
        (0, "queued"),
        (1, "running"),
        (1, "queued"),
        (2, "running"),
        (2, "succeeded"),
    ]
