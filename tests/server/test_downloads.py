"""Downloads of a finished job (issue 14): Range/ETag edges and HEAD, a DELETE during a tar download,
the finished job's phase, and a job whose ignore list would backtrack for hours in Python's `re`.

One job for the module: a wide one-block model pruned by magnitude (57 MB of weights, so a tar
download outlasts the socket buffers), without evaluation."""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import transformers

from shears.client.client import ShearsClient
from shears.client.launch import ServerProcess
from tests.server.conftest import FAST_SETTINGS
from tests.tiny import make_tokenizer

# Python's `re` tries 2^n ways to split an n-character name between the two branches: a layer name
# such as model.layers.3.self_attn.q_proj takes hours. RE2 answers in microseconds.
BACKTRACKING = "(.|.)*X"


def _wide_model(folder: Path) -> Path:
    """One block and a 16k-row vocabulary: 57 MB of weights, little of it to prune."""
    if not (folder / "config.json").exists():
        config = transformers.LlamaConfig(
            vocab_size=16384,
            hidden_size=384,
            intermediate_size=1024,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        make_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def finished(
    tmp_path_factory: pytest.TempPathFactory, model_root: Path
) -> Iterator[tuple[ServerProcess, Any]]:
    model = _wide_model(model_root / "wide")
    server = ServerProcess(
        tmp_path_factory.mktemp("downloads"),
        args=[*FAST_SETTINGS, "--model-dir", str(model_root)],
        env={"SHEARS_TOKEN": ""},
    )
    server.start()
    client = ShearsClient(server.url)
    job = client.submit(
        {
            "model": str(model),
            "method": "magnitude",
            "sparsity": 0.5,
            "ignore": [r"(^|\.)lm_head$", BACKTRACKING],
            "evaluation": {"enabled": False},
        }
    )
    started = time.monotonic()
    final = client.wait(job["id"], timeout=120, poll=0.2)
    final["seconds"] = time.monotonic() - started
    yield server, final
    server.stop()


def _problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code
    return response.json()


def test_7_backtracking_regex_job_runs_to_success(finished: tuple[ServerProcess, Any]) -> None:
    _, job = finished
    assert job["status"] == "succeeded", job["error"]
    assert job["attempt"] == 1 and job["seconds"] < 120
    assert job["request"]["ignore"][-1] == BACKTRACKING


def test_also_finished_job_has_no_phase(finished: tuple[ServerProcess, Any]) -> None:
    server, job = finished
    again = ShearsClient(server.url).job(job["id"])
    assert again["status"] == "succeeded" and again["phase"] is None and again["progress"] is None


def test_12_range_and_etag_edges(finished: tuple[ServerProcess, Any]) -> None:
    server, job = finished
    files = ShearsClient(server.url).artifacts(job["id"])["files"]
    entry = next(f for f in files if f["name"] == "config.json")
    url = f"{server.url}/v1/jobs/{job['id']}/artifacts/config.json"
    whole = httpx.get(url)
    assert whole.status_code == 200 and hashlib.sha256(whole.content).hexdigest() == entry["sha256"]
    etag = whole.headers["etag"]
    # Malformed or reversed ranges are ignored: the whole file, as for remote storage.
    for bad in ("bytes=abc", "bytes=5-2", "bytes=--1", "pages=1-2", "bytes=0-1,4-5"):
        response = httpx.get(url, headers={"Range": bad})
        assert response.status_code == 200 and response.content == whole.content, bad
    # Outside the file: 416 as problem+json with the size.
    for outside in (f"bytes={entry['size']}-", "bytes=-0"):
        response = httpx.get(url, headers={"Range": outside})
        _problem(response, 416, "range_not_satisfiable")
        assert response.headers["content-range"] == f"bytes */{entry['size']}"
    # If-None-Match: the strong tag, a weak one, a list, `*`.
    for tag in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        response = httpx.get(url, headers={"If-None-Match": tag})
        assert response.status_code == 304 and response.headers["etag"] == etag and not response.content
    assert httpx.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    # HEAD: the GET's status and headers, no body.
    head = httpx.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(entry["size"]) and head.headers["etag"] == etag
    ranged = httpx.head(url, headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.headers["content-length"] == "10"
    tar = httpx.head(f"{server.url}/v1/jobs/{job['id']}/artifacts.tar")
    assert tar.status_code == 200 and int(tar.headers["content-length"]) > sum(f["size"] for f in files)


def test_13_delete_during_a_tar_download(finished: tuple[ServerProcess, Any]) -> None:
    server, job = finished
    client = ShearsClient(server.url)
    files = client.artifacts(job["id"])["files"]
    assert sum(f["size"] for f in files) > 20 << 20  # more than the socket buffers hold
    url = f"{server.url}/v1/jobs/{job['id']}/artifacts.tar"
    received = io.BytesIO()
    with httpx.stream("GET", url, timeout=60) as response:
        assert response.status_code == 200
        chunks = response.iter_bytes()
        received.write(next(chunks))
        assert httpx.delete(f"{server.url}/v1/jobs/{job['id']}").status_code == 204
        assert httpx.get(f"{server.url}/v1/jobs/{job['id']}").status_code == 404
        for chunk in chunks:
            received.write(chunk)
    received.seek(0)
    with tarfile.open(fileobj=received) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]
    assert sorted(members) == sorted(f"{job['id']}/{f['name']}" for f in files)
    for entry in files:
        assert hashlib.sha256(members[f"{job['id']}/{entry['name']}"]).hexdigest() == entry["sha256"]
    # The files went once the download ended.
    job_dir = server.data_dir / "jobs" / job["id"]
    deadline = time.monotonic() + 10
    while job_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not job_dir.exists()
    assert "Traceback" not in server.log_tail(10_000)
