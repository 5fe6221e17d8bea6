"""Real backing services on 127.0.0.1 for the scale-out tests: a throwaway PostgreSQL cluster, an
S3-compatible server (moto) and a Ray head. Each skips its tests only when its software is missing."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from shears.client.launch import free_port


def _as_postgres(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; Debian's package creates the `postgres` user.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


class PostgresCluster:
    """initdb into a temporary folder, `pg_ctl start` on a free loopback port; trust auth, no fsync."""

    def __init__(self) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            pytest.skip("the psycopg driver is not installed (pip install 'psycopg[binary]')")
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="shears-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        subprocess.run(
            _as_postgres(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "shears",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=400"
        )
        subprocess.run(
            _as_postgres(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-o",
                    options,
                    "-l",
                    str(self.root / "log"),
                    "-w",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )
        self._count = 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://shears@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        import psycopg

        self._count += 1
        name = f"t{os.getpid()}_{self._count}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(
            _as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(self.root, ignore_errors=True)


class MotoS3:
    """moto's S3-compatible server in its own process on a free loopback port, with one bucket."""

    bucket = "shears-test"

    def __init__(self, log_dir: Path) -> None:
        try:
            import moto.server  # noqa: F401
            import s3fs  # noqa: F401
        except ImportError:
            pytest.skip("moto[server] and s3fs are not installed (pip install -e '.[dev]')")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log_dir / "moto.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from moto.server import main; main()",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(self.url, timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.2)
        self.options = {
            "endpoint_url": self.url,
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
        }
        # A plain PUT creates the bucket (moto does not check signatures; s3fs' mkdir sends a location
        # constraint that moto refuses for us-east-1).
        try:
            httpx.put(f"{self.url}/{self.bucket}", timeout=10).raise_for_status()
        except Exception:
            self.stop()
            raise

    def fs(self) -> Any:  # s3fs.S3FileSystem, imported lazily
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class RayHead:
    """`ray start --head` bound to 127.0.0.1 with 2 CPUs, its own ports and temp folder; `ray stop`."""

    def __init__(self) -> None:
        try:
            import ray.job_submission  # noqa: F401
        except ImportError:
            pytest.skip("Ray's job client is not installed (pip install -e '.[dev]' or 'shears[ray]')")
        self.ray = Path(sys.executable).with_name("ray")
        if not self.ray.exists():
            found = shutil.which("ray")
            if found is None:
                pytest.skip("the `ray` command is not installed")
            self.ray = Path(found)
        # Short: Ray's unix sockets live under it (paths are limited to ~107 bytes).
        self.temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.port = free_port()
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        started = subprocess.run(
            [
                str(self.ray),
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={self.port}",
                "--num-cpus=2",
                "--num-gpus=0",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                "--object-store-memory=100000000",
                f"--temp-dir={self.temp}",
                "--disable-usage-stats",
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if started.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{started.stdout}\n{started.stderr}")
        deadline = time.monotonic() + 120
        while True:  # the job API answers a little after `ray start` returns
            try:
                if httpx.get(f"{self.address}/api/version", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("Ray's job API did not answer within 120 s")
            time.sleep(0.5)

    def client(self) -> Any:  # ray.job_submission.JobSubmissionClient, imported lazily
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)

    def stop(self) -> None:
        subprocess.run([str(self.ray), "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        shutil.rmtree(self.temp, ignore_errors=True)
