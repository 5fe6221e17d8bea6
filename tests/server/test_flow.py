"""The full flow against a real server: submit (CLI and API), events, status, downloads, checksums,
the downloaded folder loaded in transformers with the requested sparsity, delete."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest
import torch

from shears.client.client import ChecksumError, ShearsAPIError, ShearsClient
from shears.client.demo import check_sparsity
from shears.kernels.sparse_file import read_packed
from tests.server.conftest import job_request


def _raw_get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status, response.getheader("content-type", "")
    finally:
        connection.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_full_flow(start_server, model_root: Path, tmp_path: Path) -> None:
    server = start_server()
    client = ShearsClient(server.url)
    request = job_request(model_root / "tiny", formats=["dense", "packed"])
    request_file = tmp_path / "request.json"
    request_file.write_text(json.dumps(request))

    # Submit through the CLI and follow it to the end, as a user would.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "shears.client",
            "submit",
            "--url",
            server.url,
            "--request",
            str(request_file),
            "--wait",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    job_id = summary["id"]
    assert summary["status"] == "succeeded" and summary["attempt"] == 1
    assert "[succeeded]" in done.stderr and "pruning" in done.stderr

    status = subprocess.run(
        [sys.executable, "-m", "shears.client", "status", "--url", server.url, job_id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "succeeded"
    lines = subprocess.run(
        [sys.executable, "-m", "shears.client", "events", "--url", server.url, job_id, "--follow"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.splitlines()
    assert json.loads(lines[-1])["data"]["status"] == "succeeded"

    job = client.job(job_id)
    assert job["request"]["model"] == str(model_root / "tiny")
    assert job["result"]["perplexity"]["pruned"] > 0 and job["finished_at"] >= job["started_at"]
    assert job["error"] is None

    # Events: ids increase without gaps; phases in engine order; SSE replays the same ids.
    events = client.events(job_id)["events"]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    phases = [e["phase"] for e in events if e["kind"] == "phase"]
    assert phases[:3] == ["loading", "calibrating", "pruning"] and "verifying" in phases
    assert events[-1]["kind"] == "state" and events[-1]["data"]["status"] == "succeeded"
    streamed = list(client.stream_events(job_id, after=3))
    assert [e["id"] for e in streamed] == [e["id"] for e in events[3:]]

    # Artifacts: listing, downloads with checksums, the folder loads with 2:4 sparsity.
    listing = client.artifacts(job_id)
    names = [f["name"] for f in listing["files"]]
    assert "model.safetensors" in names and "manifest.json" in names and "config.json" in names
    assert "packed/sparse.safetensors" in names  # one folder level: listed, downloaded, in the tar
    dest = tmp_path / "download"
    files = client.download(job_id, dest)
    for entry in files:
        assert _sha((dest / entry["name"]).read_bytes()) == entry["sha256"]
    layers = check_sparsity(dest, listing["manifest"])
    assert sorted(read_packed(dest)) == sorted(f"{name}.weight" for name in listing["manifest"]["layers"])
    assert layers and all(abs(mean - 0.5) < 1e-6 for _, mean, _, _ in layers.values())

    weights = next(f for f in listing["files"] if f["name"] == "model.safetensors")
    url = f"{server.url}/v1/jobs/{job_id}/artifacts/model.safetensors"
    whole = httpx.get(url)
    assert whole.status_code == 200 and _sha(whole.content) == weights["sha256"]
    assert whole.headers["etag"] == f'"{weights["sha256"]}"' and whole.headers["accept-ranges"] == "bytes"
    part = httpx.get(url, headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == whole.content[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{weights['size']}"
    tail = httpx.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == whole.content[-10:]
    stale = httpx.get(url, headers={"Range": "bytes=0-9", "If-Range": '"not-the-etag"'})
    assert stale.status_code == 200 and len(stale.content) == weights["size"]
    assert httpx.get(url, headers={"If-None-Match": whole.headers["etag"]}).status_code == 304
    assert httpx.get(url, headers={"Range": f"bytes={weights['size'] + 10}-"}).status_code == 416

    # A resumed download: a truncated .part file is completed with a Range request.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "model.safetensors.part").write_bytes(whole.content[:5000])
    client.download_file(job_id, weights, resumed)
    assert (resumed / "model.safetensors").read_bytes() == whole.content
    # A corrupt .part file fails the checksum (and is removed); the next try starts over and succeeds.
    (resumed / "model.safetensors").unlink()
    (resumed / "model.safetensors.part").write_bytes(b"x" * 5000)
    with pytest.raises(ChecksumError):
        client.download_file(job_id, weights, resumed)
    assert _sha(client.download_file(job_id, weights, resumed).read_bytes()) == weights["sha256"]

    # The tar holds every file with the listed checksums.
    archive = httpx.get(f"{server.url}/v1/jobs/{job_id}/artifacts.tar")
    assert archive.status_code == 200 and int(archive.headers["content-length"]) == len(archive.content)
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert {f"{job_id}/{f['name']}": f["sha256"] for f in listing["files"]} == {
        name: _sha(data) for name, data in members.items()
    }

    # Artifact names are looked up in the manifest, never joined into a path (sent raw: httpx would
    # normalise the dot segments away before they reach the server).
    for name in (
        "../../shears.db",
        "..%2F..%2Fshears.db",
        "%2e%2e/%2e%2e/shears.db",
        "/etc/passwd",
        "model.safetensors/..",
        "worker-1.log",
        "../worker-1.log",
        "../../../../../../etc/passwd",
        "attempt-1/out/config.json",
        "./config.json",
        "config.json%00.txt",
    ):
        status, content_type = _raw_get(server.port, f"/v1/jobs/{job_id}/artifacts/{name}")
        assert status == 404 and content_type == "application/problem+json", name

    # The CLI downloads too (and keeps files that are already complete).
    cli = subprocess.run(
        [sys.executable, "-m", "shears.client", "download", "--url", server.url, job_id, str(dest)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr

    # Hashes are taken once per job (the engine's for the weights, the worker's for manifest.json,
    # stored with the job): a file damaged on the server afterwards still lists its original hash,
    # and the client's end-to-end check refuses it.
    stored = next((server.data_dir / "jobs" / job_id).glob("attempt-*/out/model.safetensors"))
    original = stored.read_bytes()
    stored.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    assert client.artifacts(job_id)["files"] == listing["files"]
    with pytest.raises(ChecksumError):
        client.download_file(job_id, weights, tmp_path / "damaged")
    assert not (tmp_path / "damaged" / "model.safetensors").exists()
    stored.write_bytes(original)

    # Metrics count it; delete removes the job, its events and its files.
    metrics = client.metrics()
    assert 'shears_jobs{status="succeeded"} 1.0' in metrics
    assert 'shears_job_duration_seconds_count{status="succeeded"} 1.0' in metrics
    job_dir = server.data_dir / "jobs" / job_id
    assert job_dir.is_dir() and not list(job_dir.glob("attempt-*/.out.partial-*"))
    client.delete(job_id)
    assert httpx.get(f"{server.url}/v1/jobs/{job_id}").status_code == 404
    assert not job_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU to fail")
def test_failed_job_says_whose_fault(start_server, model_root: Path) -> None:
    server = start_server()
    client = ShearsClient(server.url)
    job = client.submit({**job_request(model_root / "tiny"), "device": "cuda"})  # no GPU on this machine
    final = client.wait(job["id"], timeout=120, poll=0.2)
    assert final["status"] == "failed" and final["attempt"] == 1
    assert final["error"]["code"] == "invalid_request" and "cuda" in final["error"]["message"]
    last = client.events(job["id"])["events"][-1]
    assert last["data"] == {"status": "failed", "code": "invalid_request"}
    with pytest.raises(ShearsAPIError) as not_ready:
        client.artifacts(job["id"])
    assert not_ready.value.status == 409
    assert not list((server.data_dir / "jobs" / job["id"]).glob("attempt-*"))
    assert 'shears_jobs{status="failed"} 1.0' in client.metrics()


def test_structured_job_over_http(start_server, model_root: Path, tmp_path: Path) -> None:
    """`method: none` with a structure: a smaller folder, sizes in the job's result; an impossible
    structure is refused at submission with nothing queued."""
    server = start_server()
    client = ShearsClient(server.url)
    body = {
        **job_request(model_root / "tiny"),
        "method": "none",
        "structure": {"layers": 0.5, "speed": False},
    }
    del body["sparsity"], body["pattern"]
    final = client.wait(client.submit(body)["id"], timeout=300, poll=0.2)
    assert final["status"] == "succeeded", final["error"]
    structure = final["result"]["structure"]
    assert structure["parameters"]["after"] < structure["parameters"]["before"]
    assert len(structure["plan"]["removed_blocks"]) == 1
    dest = tmp_path / "download"
    client.download(final["id"], dest)
    config = json.loads((dest / "config.json").read_text())
    assert config["num_hidden_layers"] == 1

    jobs = len(client.jobs()["jobs"])
    with pytest.raises(ShearsAPIError) as refused:  # read from the folder's config at submission
        client.submit({**body, "structure": {"mlp": 0.95}})
    assert (refused.value.status, refused.value.code) == (422, "invalid_request")
    assert "below one granule" in refused.value.detail
    assert len(client.jobs()["jobs"]) == jobs
