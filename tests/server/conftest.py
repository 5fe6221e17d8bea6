"""Real `shears serve` processes on 127.0.0.1 with real SQLite files, and small models to prune."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import transformers

from shears.client.client import ShearsClient
from shears.client.launch import ServerProcess
from shears.server.store import Store
from tests.tiny import make_tokenizer

# Short leases and heartbeats so lost workers are noticed in seconds, not the default 30 s.
FAST_SETTINGS = [
    "--lease-seconds",
    "8",
    "--heartbeat-seconds",
    "0.5",
    "--cancel-grace-seconds",
    "5",
    "--min-free-disk-bytes",
    "0",
    "--log-level",
    "warning",
]


@pytest.fixture(scope="session")
def model_root(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder the test servers allow local models from: the tiny model and a slower 'medium' one."""
    root = tmp_path_factory.mktemp("allowed-models")
    shutil.copytree(tiny_llama, root / "tiny")  # a copy: a symlink out of the folder would be refused
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "medium")
    make_tokenizer(root / "medium")
    return root


def job_request(
    model: Path | str, *, pattern: str = "2:4", samples: int = 4, seqlen: int = 64, **extra: Any
) -> dict[str, Any]:
    """A job that takes about a second of pruning on the tiny model (several on the medium one)."""
    sparsity = 0.5 if pattern == "2:4" else extra.pop("sparsity", 0.5)
    return {
        "model": str(model),
        "method": "sparsegpt",
        "sparsity": sparsity,
        "pattern": pattern,
        "calibration": {"source": "builtin", "samples": samples, "seqlen": seqlen},
        "evaluation": {"enabled": True, "seqlen": 64, "max_tokens": 256},
        **extra,
    }


def kill_workers(data_dir: Path) -> None:
    """Workers outlive a SIGKILLed server by design; tests must not leave them running."""
    data = str(data_dir.resolve())
    for process in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline = process.info["cmdline"] or []
            environ = process.info["environ"] or {}
            if "worker" in cmdline and environ.get("SHEARS_DATA_DIR") == data:
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


@pytest.fixture
def start_server(tmp_path: Path, model_root: Path) -> Iterator[Callable[..., ServerProcess]]:
    """start_server(*flags, data_dir=None, env=None) -> a started ServerProcess, stopped at teardown."""
    started: list[ServerProcess] = []

    def start(
        *flags: str,
        data_dir: Path | None = None,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> ServerProcess:
        server = ServerProcess(
            data_dir or tmp_path / "data",
            host=host,
            port=port,
            args=[*FAST_SETTINGS, "--model-dir", str(model_root), *flags],
            env={"SHEARS_TOKEN": "", **(env or {})},
        )
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
        kill_workers(server.data_dir)


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout} s")


def wait_for_event(
    client: ShearsClient, job_id: str, match: Callable[[dict[str, Any]], bool], timeout: float = 90.0
) -> dict[str, Any]:
    """Poll the JSON events until one matches; returns it."""
    after = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page = client.events(job_id, after=after)
        for event in page["events"]:
            if match(event):
                return event
        after = page["next_cursor"]
        if page["status"] in ("succeeded", "failed", "cancelled") and not page["events"]:
            raise AssertionError(f"job {job_id} ended ({page['status']}) before the event")
        time.sleep(0.05)
    raise TimeoutError(f"no matching event for job {job_id} within {timeout} s")


def first_block_done(event: dict[str, Any]) -> bool:
    return event["kind"] == "progress" and event["phase"] == "pruning" and event["done"] == 1


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Iterator[ServerProcess]:
    """A server that accepts jobs but starts none (--max-concurrent-jobs 0): for the HTTP layer alone."""
    server = ServerProcess(
        tmp_path_factory.mktemp("idle"),
        args=[
            *FAST_SETTINGS,
            "--model-dir",
            str(model_root),
            "--max-concurrent-jobs",
            "0",
            "--queue-cap",
            "1000",
            "--upload-max-bytes",
            "4096",
        ],
        env={"SHEARS_TOKEN": ""},
    )
    server.start()
    yield server
    server.stop()


def medium_job(model_root: Path) -> dict[str, Any]:
    """Six wider blocks (a few seconds of pruning): time to cancel or kill the job in the middle."""
    return job_request(model_root / "medium", samples=32, seqlen=128)


def store_of(server: ServerProcess) -> Store:
    return Store(f"sqlite:///{server.data_dir.resolve() / 'shears.db'}")


def worker_pid(server: ServerProcess, job_id: str) -> int:
    store = store_of(server)
    try:
        return wait_for(lambda: store.get_job(job_id).worker_pid, timeout=60)
    finally:
        store.close()


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 for the whole session; `new_database()` per test."""
    from tests.server.services import PostgresCluster

    cluster = PostgresCluster()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The job store's URL: a SQLite file, or a fresh database in the session's PostgreSQL cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shears.db'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """moto's S3-compatible server on 127.0.0.1 with one bucket, for the fsspec artifact storage."""
    from tests.server.services import MotoS3

    server = MotoS3(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_head() -> Iterator[Any]:
    """A local Ray head on 127.0.0.1 (2 CPUs, no GPU) for the Ray executor's tests."""
    from tests.server.services import RayHead

    head = RayHead()
    yield head
    head.stop()
