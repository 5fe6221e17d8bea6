"""Two `shears serve` processes in front of one PostgreSQL store (and one shared data folder, as on a
shared file system): both take jobs, no job is claimed twice, each job's events are ordered and gap-free
whichever server is asked."""

from __future__ import annotations

from pathlib import Path

from shears.client.client import ShearsClient
from tests.server.conftest import job_request, wait_for


def test_two_servers_one_postgres_store(start_server, postgres, model_root: Path, tmp_path: Path) -> None:
    url = postgres.new_database()
    shared = tmp_path / "shared"
    flags = ("--store", url, "--max-concurrent-jobs", "2")
    servers = [start_server(*flags, data_dir=shared), start_server(*flags, data_dir=shared)]
    clients = [ShearsClient(server.url) for server in servers]
    ids = []
    for i in range(4):
        request = job_request(model_root / "tiny")
        request["calibration"]["seed"] = i
        ids.append(clients[i % 2].submit(request)["id"])
    assert {j["id"] for j in clients[0].iter_jobs()} == {j["id"] for j in clients[1].iter_jobs()} == set(ids)

    finished = wait_for(
        lambda: all(clients[0].job(i)["status"] in ("succeeded", "failed", "cancelled") for i in ids),
        timeout=300,
        interval=0.5,
    )
    assert finished
    for job_id in ids:
        job = clients[0].job(job_id)
        assert job["status"] == "succeeded", job["error"]
        assert job["attempt"] == 1, "claimed once: one attempt"
        events = [client.events(job_id)["events"] for client in clients]
        assert events[0] == events[1], "both servers read the same store"
        seqs = [e["id"] for e in events[0]]
        assert seqs == list(range(1, len(seqs) + 1)), "event ids gap-free and in order"
        times = [e["time"] for e in events[0]]
        assert times == sorted(times), "events in the order they happened"
        states = [e["data"]["status"] for e in events[0] if e["kind"] == "state"]
        assert states == ["queued", "running", "succeeded"], "one claim, one run"
        assert len(clients[1].artifacts(job_id)["files"]) > 2
