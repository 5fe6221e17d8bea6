"""A full disk, for real (issue 14, item 11): the server runs in a mount namespace of its own whose data
folder is a 6 MiB tmpfs, with a 256 KiB tmpfs for job output. Uploads that fill it, a store that
cannot write, a job that runs out of space: each a clear answer, nothing left behind, nothing stuck."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shears.client.client import ShearsClient
from shears.client.launch import ServerProcess
from tests.server.conftest import FAST_SETTINGS

MOUNT = (
    'mount -t tmpfs -o size=6m shears "$1" && mkdir "$1/jobs" && mount -t tmpfs -o size=256k shears "$1/jobs"'
)


def _can_mount(tmp: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=1m probe "$1"', "sh", str(tmp)],
        capture_output=True,
    )
    return probe.returncode == 0


class TmpfsServer(ServerProcess):
    """`shears serve` in its own mount namespace, its data folder a small tmpfs. (The log file is
    opened before the mount, so it stays on the real disk and readable from here.)"""

    def command(self) -> list[str]:
        script = f'{MOUNT} && shift && exec "$@"'
        return ["unshare", "-m", "sh", "-c", script, "sh", str(self.data_dir.resolve()), *super().command()]


@pytest.fixture(scope="module")
def full_server(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Iterator[ServerProcess]:
    if not _can_mount(tmp_path_factory.mktemp("probe")):
        pytest.skip("needs `unshare -m` and tmpfs mounts (a mount namespace) to make a small disk")
    server = TmpfsServer(
        tmp_path_factory.mktemp("tmpfs"),
        args=[*FAST_SETTINGS, "--model-dir", str(model_root), "--upload-max-bytes", str(16 << 20)],
        env={"SHEARS_TOKEN": ""},
    )
    server.start()
    yield server
    server.stop()


def _problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code
    return response.json()


def _upload(http: httpx.Client, size: int) -> httpx.Response:
    return http.post("/v1/calibration", params={"filename": "fill.txt"}, content=b"a" * size)


def test_11_a_job_that_fills_the_disk_fails_as_out_of_disk(
    full_server: ServerProcess, model_root: Path
) -> None:
    client = ShearsClient(full_server.url)
    job = client.submit(
        {
            "model": str(model_root / "tiny"),  # ~0.6 MB of weights into 256 KiB
            "method": "magnitude",
            "sparsity": 0.5,
            "evaluation": {"enabled": False},
        }
    )
    final = client.wait(job["id"], timeout=180, poll=0.2)
    assert final["status"] == "failed" and final["attempt"] == 1
    assert final["error"]["code"] == "out_of_disk"
    assert "disk" in final["error"]["message"] and "partial output was removed" in final["error"]["message"]


def test_11_uploads_and_submits_on_a_full_disk(full_server: ServerProcess, model_root: Path) -> None:
    http = httpx.Client(base_url=full_server.url, timeout=60)
    # A chunked upload (no size declared) that fills the disk as it streams: 507, its file removed.
    chunked = http.post("/v1/calibration", content=iter([b"b" * (1 << 20)] * 8))
    _problem(chunked, 507, "insufficient_storage")
    assert http.get("/readyz").status_code == 200  # the space came back

    # Fill the disk with uploads, halving the size on each refusal, down to a page.
    kept: list[tuple[str, int]] = []
    size = 4 << 20
    while size >= 4096:
        answer = _upload(http, size)
        if answer.status_code == 201:
            kept.append((answer.json()["id"], size))
        else:
            _problem(answer, 507, "insufficient_storage")
            size //= 2
    assert kept

    # Full: the store cannot record a job; 507, not 500; reads still work; /readyz says why.
    _problem(
        http.post("/v1/jobs", json={"model": "smollm2-135m", "method": "wanda", "sparsity": 0.5}),
        507,
        "insufficient_storage",
    )
    ready = http.get("/readyz")
    assert ready.status_code == 503 and "cannot be written" in ready.json()["checks"]["disk"]
    assert http.get("/v1/jobs").status_code == 200

    # Deleting uploads frees the space; then all is well again.
    for upload_id, _ in sorted(kept, key=lambda item: -item[1])[:2]:
        assert http.delete(f"/v1/calibration/{upload_id}").status_code == 204
        _problem(http.get(f"/v1/calibration/{upload_id}"), 404, "not_found")
    assert http.get("/readyz").status_code == 200
    submitted = http.post(
        "/v1/jobs", json={"model": str(model_root / "tiny"), "method": "magnitude", "sparsity": 0.5}
    )
    assert submitted.status_code == 202, submitted.text
    http.post(f"/v1/jobs/{submitted.json()['id']}/cancel")
    assert "Traceback" not in full_server.log_tail(10_000)
