"""Hostile and clumsy input (issue 14), each case against a real server: a clear 4xx, and nothing breaks.

Numbers in the test names are the issue's items."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shears.client.launch import ServerProcess
from tests.server.conftest import FAST_SETTINGS, job_request

TOKEN = "hostile-test-token"


def _problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["code"] == code and body["detail"]
    return body


@pytest.fixture(scope="module")
def http(idle_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=idle_server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tmp_path_factory.mktemp("token"),
        args=[*FAST_SETTINGS, "--model-dir", str(model_root), "--max-concurrent-jobs", "0"],
        env={"SHEARS_TOKEN": TOKEN},
    )
    server.start()
    yield server
    server.stop()


def _raw_json(http: httpx.Client, text: str, path: str = "/v1/jobs") -> httpx.Response:
    """POST JSON text as given (json.dumps escapes a lone surrogate as \\ud800; httpx would refuse it)."""
    return http.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


def _lists_fine(http: httpx.Client) -> None:
    listing = http.get("/v1/jobs", params={"limit": 200})
    assert listing.status_code == 200, listing.text
    for job in listing.json()["jobs"]:
        assert http.get(f"/v1/jobs/{job['id']}").status_code == 200


@pytest.mark.parametrize(
    "change",
    [
        {"calibration": {"text_column": "\ud800"}},
        {"ignore": ["lm_head", "\udfff"]},
        {"evaluation": {"enabled": False, "source": "\ud800"}},
        {"calibration": {"source": "hf:wikitext:\ud800"}},
        {"overrides": {"\ud800": 0.3}},
        {"revision": "main\ud800"},
    ],
)
def test_1_lone_surrogates_are_refused_and_nothing_is_stored(
    http: httpx.Client, model_root: Path, change: dict[str, Any]
) -> None:
    before = len(http.get("/v1/jobs", params={"limit": 200}).json()["jobs"])
    body = {**job_request(model_root / "tiny", pattern="unstructured"), **change}
    problem = _problem(_raw_json(http, json.dumps(body)), 422, "validation_error")
    assert "surrogate" in problem["detail"]
    _lists_fine(http)
    assert len(http.get("/v1/jobs", params={"limit": 200}).json()["jobs"]) == before


@pytest.mark.parametrize("model", ["x" * 300, "org/" + "y" * 300, "{root}/" + "z" * 300, "{root}/a\u0000b"])
def test_2_over_long_path_parts_are_a_422(http: httpx.Client, model_root: Path, model: str) -> None:
    model = model.format(root=model_root)
    problem = _problem(http.post("/v1/jobs", json=job_request(model)), 422, "invalid_request")
    assert len(problem["detail"]) < 1000


def test_3_a_500_closes_the_connection_cleanly(http: httpx.Client, idle_server: ServerProcess) -> None:
    """A damaged store row is a genuine internal error; the client is told the connection goes."""
    job = http.post("/v1/jobs", json=job_request("smollm2-135m")).json()
    database = sqlite3.connect(idle_server.data_dir / "shears.db")
    original = database.execute("SELECT request FROM jobs WHERE id = ?", (job["id"],)).fetchone()[0]
    try:
        with database:
            database.execute("UPDATE jobs SET request = '{damaged' WHERE id = ?", (job["id"],))
        with httpx.Client(base_url=idle_server.url, timeout=30) as client:
            broken = client.get(f"/v1/jobs/{job['id']}")
            body = _problem(broken, 500, "internal")
            assert body["detail"] == "internal server error"  # no internals leak
            assert broken.headers["connection"] == "close"
            assert client.get("/healthz").status_code == 200  # the next request, a new connection
    finally:
        with database:
            database.execute("UPDATE jobs SET request = ? WHERE id = ?", (original, job["id"]))
        database.close()
    assert http.get(f"/v1/jobs/{job['id']}").status_code == 200


def test_legacy_rows_stored_before_the_limits_still_list(
    http: httpx.Client, idle_server: ServerProcess
) -> None:
    """A store filled before these limits (the issue's 20 MB ignore lists, 1e30 seeds) must not break
    listings after the upgrade."""
    job = http.post("/v1/jobs", json=job_request("smollm2-135m")).json()
    legacy = {**job["request"], "ignore": ["x"] * 300}
    legacy["calibration"] = {**legacy["calibration"], "seed": 10**30}
    database = sqlite3.connect(idle_server.data_dir / "shears.db")
    with database:
        database.execute("UPDATE jobs SET request = ? WHERE id = ?", (json.dumps(legacy), job["id"]))
    database.close()
    shown = http.get(f"/v1/jobs/{job['id']}")
    assert shown.status_code == 200 and len(shown.json()["request"]["ignore"]) == 300
    _lists_fine(http)
    assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202


def _answer_before_body(server: ServerProcess, head: str, timeout: float = 10.0) -> str:
    """Send a request's head and a sliver of its declared body; the status line the server answers
    with before the body arrives (a server reading the whole body first answers nothing)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"{")
        data = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode("latin-1")


def test_4_token_and_size_checked_before_the_body(token_server: ServerProcess, model_root: Path) -> None:
    url = token_server.url
    huge = (
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n"
    )
    answer = _answer_before_body(token_server, huge + "\r\n")
    assert answer.startswith("HTTP/1.1 401") and "connection: close" in answer.lower()
    answer = _answer_before_body(token_server, huge + f"Authorization: Bearer {TOKEN}\r\n\r\n")
    assert answer.startswith("HTTP/1.1 413") and "application/problem+json" in answer
    # Malformed JSON without a token: the token is what is wrong first.
    _problem(
        httpx.post(f"{url}/v1/jobs", content=b"{", headers={"Content-Type": "application/json"}),
        401,
        "unauthorized",
    )
    # A chunked body (no Content-Length) is cut at the cap as it streams.
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    chunked = httpx.post(f"{url}/v1/jobs", content=iter([b'{"model": "' + b"m" * 40_000] * 3), headers=auth)
    _problem(chunked, 413, "payload_too_large")
    good = httpx.post(f"{url}/v1/jobs", json=job_request(model_root / "tiny"), headers=auth)
    assert good.status_code == 202, good.text


def test_5_stored_requests_are_bounded(http: httpx.Client, model_root: Path) -> None:
    base = job_request(model_root / "tiny", pattern="unstructured")
    _problem(http.post("/v1/jobs", json={**base, "ignore": ["x" * 1000] * 100}), 413, "payload_too_large")
    _problem(http.post("/v1/jobs", json={**base, "ignore": ["lm_head"] * 257}), 422, "validation_error")
    _problem(http.post("/v1/jobs", json={**base, "ignore": ["x" * 513]}), 422, "validation_error")
    overrides = {f"layers\\.{i}\\.": 0.3 for i in range(257)}
    _problem(http.post("/v1/jobs", json={**base, "overrides": overrides}), 422, "validation_error")
    for field, value in (("source", "hf:" + "d" * 1100), ("text_column", "c" * 300)):
        body = {**base, "calibration": {field: value}}
        _problem(http.post("/v1/jobs", json=body), 422, "validation_error")
    # The largest request that passes still stores as a few tens of KB at most.
    biggest = {**base, "ignore": [f"layer{i:03d}" + "q" * 240 for i in range(256)]}
    accepted = http.post("/v1/jobs", json=biggest)
    assert accepted.status_code == 202, accepted.text
    assert len(json.dumps(accepted.json()["request"])) < 64 << 10


def test_6_last_event_id_is_checked(http: httpx.Client, model_root: Path) -> None:
    job = http.post("/v1/jobs", json=job_request(model_root / "tiny")).json()
    path = f"/v1/jobs/{job['id']}/events"
    for bad in (str(2**63), "9" * 20, b"\xb2", "1e3", "-1"):
        response = http.get(path, headers={"Accept": "text/event-stream", "Last-Event-ID": bad})
        _problem(response, 400, "bad_last_event_id")
    with http.stream("GET", path, headers={"Accept": "text/event-stream", "Last-Event-ID": "0"}) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(lines) == "retry: 1000"
        assert any(line == "id: 1" for line, _ in zip(lines, range(6), strict=False))


def test_7_regexes_are_re2(http: httpx.Client, model_root: Path) -> None:
    """Layer regexes are compiled by RE2 (linear time); what needs backtracking is refused with a
    reason. (A job that runs `(.|.)*X` to success is in test_downloads.)"""
    base = job_request(model_root / "tiny", pattern="unstructured")
    for rx in (r"(a)\1", r"(?=q_proj)", r"(?<!mlp)\.down_proj", "a{1001}"):
        problem = _problem(http.post("/v1/jobs", json={**base, "ignore": [rx]}), 422, "validation_error")
        assert "RE2" in problem["detail"]
    assert http.post("/v1/jobs", json={**base, "ignore": ["(.|.)*X"]}).status_code == 202


@pytest.mark.parametrize("seed", ["1e30", str(2**63), "-1", "18446744073709551616"])
def test_8_seed_is_a_64_bit_integer(http: httpx.Client, model_root: Path, seed: str) -> None:
    body = json.dumps(job_request(model_root / "tiny")).replace(
        '"samples": 4', f'"samples": 4, "seed": {seed}'
    )
    _problem(_raw_json(http, body), 422, "validation_error")


@pytest.mark.parametrize(
    ("where", "literal"),
    [("owl", '{"threshold": Infinity}'), ("owl", '{"threshold": 5, "lam": NaN}'), ("sparsity", "-Infinity")],
)
def test_9_numbers_are_finite(http: httpx.Client, model_root: Path, where: str, literal: str) -> None:
    body = job_request(model_root / "tiny", pattern="unstructured")
    body.pop(where, None)
    text = json.dumps(body)[:-1] + f', "{where}": {literal}}}'
    _problem(_raw_json(http, text), 422, "validation_error")


def test_also_404_does_not_echo_a_huge_id(http: httpx.Client) -> None:
    for path in ("/v1/jobs/" + "j" * 10_000, "/v1/calibration/" + "u" * 10_000):
        body = _problem(http.get(path), 404, "not_found")
        assert len(body["detail"]) < 300 and len(body.get("instance", "")) < 300


def test_also_everything_but_health_needs_the_token(token_server: ServerProcess) -> None:
    url = token_server.url
    for path in ("/openapi.json", "/version", "/metrics", "/v1/jobs", "/ui/options"):
        _problem(httpx.get(url + path), 401, "unauthorized")
        assert httpx.get(url + path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
    for path in ("/healthz", "/readyz"):
        assert httpx.get(url + path).status_code == 200
    # Pages are shells that fetch the spec and the data with the token the user types: they show none.
    for path in ("/docs", "/redoc", "/ui", "/ui/compare"):
        page = httpx.get(url + path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), path
        assert "/v1/jobs/{job_id}" not in page.text and "python" not in page.text.lower(), path


def test_also_openapi_documents_every_status(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    statuses = {
        status for path in spec["paths"].values() for op in path.values() for status in op["responses"]
    }
    assert {"400", "401", "404", "411", "413", "415", "416", "422", "429", "507"} <= statuses
    formats = spec["components"]["schemas"]["PruneRequest"]["properties"]["formats"]
    assert formats["minItems"] == 1
    delete = spec["paths"]["/v1/calibration/{upload_id}"]
    assert "delete" in delete
    download = spec["paths"]["/v1/jobs/{job_id}/artifacts/{name}"]
    assert {"get", "head"} <= set(download)
