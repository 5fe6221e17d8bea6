"""The bearer token: required on a non-loopback bind (the server refuses to start without one), then
enforced on /v1 and /metrics; /healthz stays open for health checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from shears.client.client import ShearsAPIError, ShearsClient
from shears.client.launch import free_port
from tests.server.conftest import job_request


@pytest.mark.parametrize("how", ["flag", "env"])
def test_non_loopback_bind_without_token_refuses_to_start(tmp_path: Path, how: str) -> None:
    command = [
        sys.executable,
        "-m",
        "shears.server",
        "serve",
        "--port",
        str(free_port()),
        "--data-dir",
        str(tmp_path),
    ]
    env = {**os.environ, "SHEARS_TOKEN": ""}
    if how == "flag":
        command += ["--host", "0.0.0.0"]
    else:
        env["SHEARS_HOST"] = "0.0.0.0"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "bearer token is required" in done.stderr


def test_token_enforced(start_server, model_root: Path) -> None:
    server = start_server("--max-concurrent-jobs", "0", host="0.0.0.0", env={"SHEARS_TOKEN": "s3cret-token"})
    url = f"http://127.0.0.1:{server.port}"
    assert httpx.get(f"{url}/healthz").status_code == 200
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic czNjcmV0LXRva2Vu"},
        {"Authorization": "Bearer s3cret-token-and-more"},
        {"Authorization": "s3cret-token"},
    ):
        for path in ("/v1/jobs", "/metrics", "/v1/jobs/anything/events"):
            response = httpx.get(f"{url}{path}", headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json()["code"] == "unauthorized"
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert httpx.post(f"{url}/v1/jobs", json=job_request(model_root / "tiny")).status_code == 401
    with pytest.raises(ShearsAPIError) as denied:
        ShearsClient(url, token="nope").jobs()
    assert denied.value.status == 401
    client = ShearsClient(url, token="s3cret-token")
    job = client.submit(job_request(model_root / "tiny"))
    assert client.job(job["id"])["status"] == "queued"
    assert "shears_queue_depth 1.0" in client.metrics()
