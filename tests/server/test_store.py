"""The job store on a real SQLite file and a real PostgreSQL database (every test runs on both): claims,
ownership, recovery, idempotency, events, migrations."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from shears.server.db import make_engine, migrate, schema_is_current
from shears.server.models import Base
from shears.server.store import IdempotencyConflict, NotTerminal, QueueFull, Store

REQUEST = {"model": "smollm2-135m", "method": "wanda", "sparsity": 0.5}


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    store = Store(store_url)
    migrate(store.engine)
    yield store
    store.close()


def test_migrations_build_the_models_schema(store_url: str) -> None:
    engine = make_engine(store_url)
    assert not schema_is_current(engine)
    migrate(engine)
    migrate(engine)  # idempotent
    assert schema_is_current(engine)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        if engine.dialect.name == "sqlite":
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        else:
            assert engine.dialect.driver == "psycopg"  # a plain postgresql:// URL means psycopg 3
    engine.dispose()


def _migrate(url: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    engine = make_engine(url)
    try:
        migrate(engine)
        out.put(schema_is_current(engine))
    except Exception as exc:  # reported to the test, which fails with it
        out.put(repr(exc))
    finally:
        engine.dispose()


def test_servers_starting_at_once_migrate_once(store_url: str) -> None:
    """Several API servers starting together against a fresh store: one migrates, the others wait for it."""
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
    processes = [context.Process(target=_migrate, args=(store_url, results)) for _ in range(3)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    assert outcomes == [True, True, True]


def test_idempotency_key(store: Store) -> None:
    first, created = store.create_job(REQUEST, max_attempts=3, idempotency_key="k1")
    again, created_again = store.create_job(dict(REQUEST), max_attempts=3, idempotency_key="k1")
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        store.create_job({**REQUEST, "sparsity": 0.6}, max_attempts=3, idempotency_key="k1")
    other, created_other = store.create_job(REQUEST, max_attempts=3, idempotency_key="k2")
    assert created_other and other.id != first.id


def test_same_key_from_many_threads_makes_one_job(store: Store) -> None:
    ids: list[str] = []
    barrier = threading.Barrier(6)

    def submit() -> None:
        barrier.wait()
        ids.append(store.create_job(REQUEST, max_attempts=3, idempotency_key="race")[0].id)

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 6 and len(set(ids)) == 1
    assert store.counts() == {"queued": 1}


def test_queue_cap(store: Store) -> None:
    for _ in range(2):
        store.create_job(REQUEST, max_attempts=3, queue_cap=2)
    with pytest.raises(QueueFull):
        store.create_job(REQUEST, max_attempts=3, queue_cap=2)


def _claim_all(url: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = Store(url)
    claimed = []
    while (job := store.claim_next(capacity=1000, lease_seconds=30)) is not None:
        claimed.append(job.id)
    out.put(claimed)


def test_each_job_is_claimed_once_across_processes(store: Store, tmp_path: Path) -> None:
    ids = {store.create_job(REQUEST, max_attempts=3)[0].id for _ in range(40)}
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
    url = store.engine.url.render_as_string(hide_password=False)
    workers = [context.Process(target=_claim_all, args=(url, results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    claimed = [job_id for _ in workers for job_id in results.get(timeout=120)]
    for worker in workers:
        worker.join(timeout=30)
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    assert store.counts() == {"running": 40}


def test_capacity_and_order(store: Store) -> None:
    first = store.create_job(REQUEST, max_attempts=3)[0]
    second = store.create_job(REQUEST, max_attempts=3)[0]
    claimed = store.claim_next(capacity=1, lease_seconds=30)
    assert claimed is not None and claimed.id == first.id and claimed.attempt == 1
    assert store.claim_next(capacity=1, lease_seconds=30) is None
    assert store.get_job(second.id).status == "queued"


def test_a_lost_attempt_loses_ownership(store: Store) -> None:
    job = store.create_job(REQUEST, max_attempts=2)[0]
    store.claim_next(capacity=1, lease_seconds=30)
    assert store.heartbeat(job.id, 1, 30).owned
    assert store.add_event(job.id, 1, "progress", phase="pruning", done=1, total=4)
    assert store.recover_lost(job.id, 1, "test") == "queued"
    # The first attempt's worker can no longer write anything.
    assert not store.heartbeat(job.id, 1, 30).owned
    assert not store.add_event(job.id, 1, "log", message="late")
    assert store.finish(job.id, 1, "succeeded", manifest={}) is None
    second = store.claim_next(capacity=1, lease_seconds=30)
    assert second is not None and second.attempt == 2 and second.progress_done is None
    assert store.recover_lost(job.id, 1, "stale report") is None  # already handled
    assert store.recover_lost(job.id, 2, "test") == "failed"
    failed = store.get_job(job.id)
    assert failed.error_code == "worker_lost" and failed.finished_at is not None


def test_cancel(store: Store) -> None:
    queued = store.create_job(REQUEST, max_attempts=3)[0]
    assert store.request_cancel(queued.id).status == "cancelled"
    assert store.request_cancel(queued.id).status == "cancelled"  # idempotent
    running = store.create_job(REQUEST, max_attempts=3)[0]
    store.claim_next(capacity=1, lease_seconds=30)
    assert store.request_cancel(running.id).status == "cancelling"
    assert store.heartbeat(running.id, 1, 30).cancel_requested
    with pytest.raises(NotTerminal):
        store.delete_job(running.id)
    # A worker that finishes anyway does not override the cancel.
    assert store.finish(running.id, 1, "succeeded", manifest={}) == "cancelled"
    assert store.delete_job(running.id) is not None and store.get_job(running.id) is None


def test_event_ids_are_gap_free_under_concurrent_writers(store: Store) -> None:
    job = store.create_job(REQUEST, max_attempts=3)[0]
    store.claim_next(capacity=1, lease_seconds=30)

    def write(n: int) -> None:
        for i in range(15):
            assert store.add_event(job.id, 1, "log", message=f"{n}-{i}")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seqs = [event.seq for event in store.events(job.id, limit=1000)]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) == 2 + 60
    assert [e.seq for e in store.events(job.id, after=50, limit=5)] == [51, 52, 53, 54, 55]


def test_list_jobs_pages_newest_first(store: Store) -> None:
    ids = [store.create_job(REQUEST, max_attempts=3)[0].id for _ in range(5)]
    page = store.list_jobs(limit=2)
    assert [j.id for j in page] == ids[::-1][:2]
    rest = store.list_jobs(before_id=page[-1].id, limit=10)
    assert [j.id for j in rest] == ids[::-1][2:]
    store.request_cancel(ids[0])
    assert [j.id for j in store.list_jobs(status="cancelled")] == [ids[0]]


def test_progress_and_eta_from_the_phase_pace(store: Store) -> None:
    from datetime import timedelta

    from shears.server.models import utcnow
    from shears.server.schemas import job_out

    job = store.create_job(REQUEST, max_attempts=3)[0]
    store.claim_next(capacity=1, lease_seconds=30)
    assert store.add_event(job.id, 1, "phase", phase="pruning")
    assert store.add_event(job.id, 1, "progress", phase="pruning", done=2, total=6)
    row = store.get_job(job.id)
    row.phase_started_at = utcnow() - timedelta(seconds=10)
    out = job_out(row)
    assert out.phase == "pruning" and out.progress is not None
    assert (out.progress.done, out.progress.total, out.progress.fraction) == (2, 6, round(2 / 6, 4))
    assert out.progress.eta_seconds is not None and 19 <= out.progress.eta_seconds <= 21  # 4 blocks at 5 s
    assert store.add_event(job.id, 1, "phase", phase="evaluating")
    assert job_out(store.get_job(job.id)).progress is None


def test_concurrent_recovery_of_one_attempt_acts_once(store: Store) -> None:
    """Two servers noticing the same lost worker at once: one re-queues, the other finds nothing to do."""
    job = store.create_job(REQUEST, max_attempts=3)[0]
    store.claim_next(capacity=1, lease_seconds=30)
    outcomes: list[str | None] = []
    barrier = threading.Barrier(4)

    def recover() -> None:
        barrier.wait()
        outcomes.append(store.recover_lost(job.id, 1, "test"))

    threads = [threading.Thread(target=recover) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes, key=str) == [None, None, None, "queued"]
    states = [e.data["status"] for e in store.events(job.id) if e.kind == "state"]
    assert states == ["queued", "running", "queued"]
