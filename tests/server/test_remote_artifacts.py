"""Artifacts on S3-compatible storage (moto's server on 127.0.0.1, through fsspec/s3fs): the worker
uploads the verified folder, the API lists and streams it with the same Range/ETag behaviour as local
files, checksums match, delete removes the objects; calibration uploads are shared the same way."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest

from shears.client.client import ShearsClient
from shears.server import artifacts
from shears.server.ranges import parse_range
from shears.server.storage import RemoteArtifacts
from tests.server.conftest import job_request


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_parse_range() -> None:
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=-500", 100) == (0, 99)
    assert parse_range("bytes=50-5000", 100) == (50, 99)
    assert parse_range("bytes=0-1,5-6", 100) is None  # several ranges: the whole file
    assert parse_range("items=0-1", 100) is None
    assert parse_range("bytes=9-3", 100) is None  # reversed: invalid, so ignored (RFC 9110 14.1.1)
    for bad in ("bytes=100-", "bytes=-0"):
        with pytest.raises(ValueError):
            parse_range(bad, 100)


def test_storage_upload_ranged_read_and_remove(s3_server, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    payload = bytes(range(256)) * 5000  # 1.28 MB: several read chunks
    (folder / "weights.bin").write_bytes(payload)
    (folder / "sub" / "config.json").write_text("{}")
    manifest = {
        "files": [
            {"name": "weights.bin", "size": len(payload), "sha256": _sha(payload)},
            {"name": "sub/config.json", "size": 2, "sha256": _sha(b"{}")},
        ]
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    storage = RemoteArtifacts(f"s3://{s3_server.bucket}/unit/", s3_server.options)
    storage.upload(folder, "j1", "attempt-1/out", manifest)
    assert storage.exists("j1", "attempt-1/out") and not storage.exists("j1", "attempt-2/out")
    manifest_file = storage.manifest_entry("j1", "attempt-1/out")
    listing = {f["name"]: f for f in artifacts.listing(manifest, manifest_file)}
    assert listing["manifest.json"]["sha256"] == _sha((folder / "manifest.json").read_bytes())
    whole = b"".join(storage.read("j1", "attempt-1/out", "weights.bin"))
    assert _sha(whole) == listing["weights.bin"]["sha256"]
    part = b"".join(storage.read("j1", "attempt-1/out", "weights.bin", 1_000_001, 200_000))
    assert part == payload[1_000_001:1_200_001]
    # A size mismatch (the manifest lies) fails the upload and leaves nothing behind.
    bad = {"files": [{**manifest["files"][0], "size": 1}, manifest["files"][1]]}
    with pytest.raises(Exception, match="manifest says 1"):
        storage.upload(folder, "j1", "attempt-2/out", bad)
    assert not s3_server.fs().exists(f"{s3_server.bucket}/unit/j1/attempt-2")
    # Calibration uploads: stored once, fetched by a worker's host that lacks them.
    upload = tmp_path / "u1.txt"
    upload.write_text("hello")
    storage.store_upload(upload)
    elsewhere = tmp_path / "other-host-uploads"
    storage.fetch_upload("u1.txt", elsewhere)
    assert (elsewhere / "u1.txt").read_text() == "hello"
    storage.remove("j1")
    assert not s3_server.fs().exists(f"{s3_server.bucket}/unit/j1")


def test_flow_with_s3_artifacts(start_server, s3_server, model_root: Path) -> None:
    server = start_server(
        "--artifacts",
        f"s3://{s3_server.bucket}/flow/",
        env={"SHEARS_ARTIFACTS_OPTIONS": json.dumps(s3_server.options)},
    )
    client = ShearsClient(server.url)
    job = client.wait(client.submit(job_request(model_root / "tiny"))["id"], timeout=300, poll=0.3)
    assert job["status"] == "succeeded", job["error"]
    job_id = job["id"]
    fs = s3_server.fs()
    stored = {
        p.split(f"/{job_id}/attempt-1/out/", 1)[1] for p in fs.find(f"{s3_server.bucket}/flow/{job_id}")
    }
    listing = client.artifacts(job_id)
    assert stored == {f["name"] for f in listing["files"]}
    assert not list((server.data_dir / "jobs" / job_id).glob("attempt-*")), "no local copy kept"

    # Same download behaviour as for local files: checksums, ETag, Range, If-Range, 304, 416.
    files = client.download(job_id, server.data_dir / "download")
    for entry in files:
        assert _sha((server.data_dir / "download" / entry["name"]).read_bytes()) == entry["sha256"]
    weights = next(f for f in listing["files"] if f["name"] == "model.safetensors")
    url = f"{server.url}/v1/jobs/{job_id}/artifacts/model.safetensors"
    whole = httpx.get(url)
    assert whole.status_code == 200 and _sha(whole.content) == weights["sha256"]
    assert whole.content == fs.cat_file(f"{s3_server.bucket}/flow/{job_id}/attempt-1/out/model.safetensors")
    assert whole.headers["etag"] == f'"{weights["sha256"]}"' and whole.headers["accept-ranges"] == "bytes"
    assert int(whole.headers["content-length"]) == weights["size"]
    part = httpx.get(url, headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == whole.content[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{weights['size']}"
    tail = httpx.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == whole.content[-10:]
    stale = httpx.get(url, headers={"Range": "bytes=0-9", "If-Range": '"not-the-etag"'})
    assert stale.status_code == 200 and len(stale.content) == weights["size"]
    assert httpx.get(url, headers={"If-None-Match": whole.headers["etag"]}).status_code == 304
    assert httpx.get(url, headers={"Range": f"bytes={weights['size'] + 10}-"}).status_code == 416
    archive = httpx.get(f"{server.url}/v1/jobs/{job_id}/artifacts.tar")
    assert archive.status_code == 200 and int(archive.headers["content-length"]) == len(archive.content)
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        for entry in listing["files"]:
            member = tar.extractfile(f"{job_id}/{entry['name']}")
            assert member is not None and _sha(member.read()) == entry["sha256"]

    client.delete(job_id)
    fs.invalidate_cache()
    assert not fs.exists(f"{s3_server.bucket}/flow/{job_id}")
