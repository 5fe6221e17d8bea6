"""A Python client for the Shears API (used by the `shears` CLI, the demo and the tests).

client = ShearsClient("http://127.0.0.1:8000")
job = client.submit({"model": "smollm2-135m", "method": "wanda", "sparsity": 0.5, "pattern": "2:4"})
for event in client.stream_events(job["id"]):
    print(event["kind"], event["message"])
client.download(job["id"], Path("out"))      # resumable, checksum-verified
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from shears.manifest import SAFE_NAME, sha256_file

TERMINAL = ("succeeded", "failed", "cancelled")
_CHUNK = 1 << 20


class ShearsAPIError(Exception):
    """An error response: `status`, the problem's `code` and `detail`, and the whole `problem`."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.code = str(problem.get("code", "http_error"))
        self.detail = str(problem.get("detail", ""))
        super().__init__(f"{status} {self.code}: {self.detail}")


class ChecksumError(Exception):
    pass


class ShearsClient:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ShearsClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _error(response)
        return response

    # -- system --------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/healthz").json()

    def ready(self) -> dict[str, Any]:
        return self.request("GET", "/readyz").json()

    def version(self) -> dict[str, Any]:
        return self.request("GET", "/version").json()

    def metrics(self) -> str:
        return self.request("GET", "/metrics").text

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, request: dict[str, Any] | Any, *, idempotency_key: str | None = None) -> dict[str, Any]:
        body = request if isinstance(request, dict) else request.model_dump(mode="json")
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/v1/jobs", json=body, headers=headers).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}").json()

    def jobs(
        self, *, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> dict[str, Any]:
        params = {
            k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None
        }
        return self.request("GET", "/v1/jobs", params=params).json()

    def iter_jobs(self, *, status: str | None = None, page_size: int = 50) -> Iterator[dict[str, Any]]:
        cursor = None
        while True:
            page = self.jobs(status=status, limit=page_size, cursor=cursor)
            yield from page["jobs"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def delete(self, job_id: str) -> None:
        self.request("DELETE", f"/v1/jobs/{job_id}")

    def wait(self, job_id: str, *, timeout: float | None = None, poll: float = 1.0) -> dict[str, Any]:
        """Poll until the job is finished; returns the job."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    # -- events --------------------------------------------------------------------------------

    def events(self, job_id: str, *, after: int = 0, limit: int = 500) -> dict[str, Any]:
        return self.request(
            "GET", f"/v1/jobs/{job_id}/events", params={"after": after, "limit": limit}
        ).json()

    def stream_events(self, job_id: str, *, after: int = 0, reconnects: int = 10) -> Iterator[dict[str, Any]]:
        """Every event after `after` as it happens, until the job ends; reconnects with Last-Event-ID."""
        last = after
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last:
                headers["Last-Event-ID"] = str(last)
            try:
                with self.http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers=headers,
                    timeout=httpx.Timeout(self.http.timeout.connect, read=60.0),
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise _error(response)
                    for name, event_id, data in _sse(response.iter_lines()):
                        failures = 0
                        if name == "end":
                            return
                        if event_id is not None:
                            last = event_id
                        yield json.loads(data)
            except (httpx.TransportError, httpx.RemoteProtocolError):
                failures += 1
                if failures > reconnects:
                    raise
                time.sleep(min(5.0, 0.5 * failures))

    # -- artifacts -----------------------------------------------------------------------------

    def artifacts(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/artifacts").json()

    def download(
        self,
        job_id: str,
        dest: Path,
        *,
        progress: Callable[[int], None] | None = None,
        on_total: Callable[[int], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Download every artifact into `dest`, resuming `.part` files with HTTP Range, each checked
        against its sha256; files already complete are kept. Returns the file list."""
        listing = self.artifacts(job_id)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        if on_total is not None:
            on_total(sum(f["size"] for f in listing["files"]))
        for entry in listing["files"]:
            self.download_file(job_id, entry, dest, progress=progress)
        return listing["files"]

    def download_file(
        self, job_id: str, entry: dict[str, Any], dest: Path, *, progress: Callable[[int], None] | None = None
    ) -> Path:
        name = entry["name"]
        if not SAFE_NAME.fullmatch(name) or ".." in name:
            raise ChecksumError(f"the server listed an unsafe file name {name!r}")
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        complete = target.is_file() and target.stat().st_size == entry["size"]
        if complete and sha256_file(target) == entry["sha256"]:
            if progress:
                progress(entry["size"])
            return target
        partial = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        offset = 0
        if partial.is_file() and partial.stat().st_size <= entry["size"]:
            offset = partial.stat().st_size
            with open(partial, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
        headers = {"If-Range": f'"{entry["sha256"]}"', "Range": f"bytes={offset}-"} if offset else {}
        if offset and offset == entry["size"]:
            headers = {}
            offset, digest = 0, hashlib.sha256()
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}", headers=headers) as response:
            if response.status_code >= 400:
                response.read()
                raise _error(response)
            mode = "ab" if response.status_code == 206 else "wb"
            if mode == "wb":
                digest = hashlib.sha256()
            elif progress:
                progress(offset)
            with open(partial, mode) as out:
                for chunk in response.iter_bytes(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    if progress:
                        progress(len(chunk))
        if digest.hexdigest() != entry["sha256"] or partial.stat().st_size != entry["size"]:
            partial.unlink(missing_ok=True)
            raise ChecksumError(f"{name}: downloaded bytes do not match the manifest's sha256; try again")
        partial.replace(target)
        return target

    # -- uploads -------------------------------------------------------------------------------

    def upload_calibration(self, path: Path) -> dict[str, Any]:
        path = Path(path)
        with open(path, "rb") as handle:
            response = self.request(
                "POST",
                "/v1/calibration",
                params={"filename": path.name},
                content=handle,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(path.stat().st_size),
                },
            )
        return response.json()


def _error(response: httpx.Response) -> ShearsAPIError:
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            raise ValueError
    except ValueError:
        problem = {"code": "http_error", "detail": response.text[:500]}
    return ShearsAPIError(response.status_code, problem)


def _sse(lines: Iterator[str]) -> Iterator[tuple[str, int | None, str]]:
    """(event name, id, data) of each Server-Sent Event."""
    name, event_id, data = "message", None, []
    for line in lines:
        if not line:
            if data:
                yield name, event_id, "\n".join(data)
            name, event_id, data = "message", None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
        elif field == "id" and value.isdigit():
            event_id = int(value)
