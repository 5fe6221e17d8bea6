"""/v1/jobs/{id}/artifacts: the manifest, single files (HTTP Range, ETag = sha256) and a tar of all.

Files are served from <data_dir>/jobs, or, with --artifacts URL, streamed from that storage, with the
same Range, If-Range, If-None-Match, ETag and HEAD behaviour either way (server.ranges). Downloads in
flight are counted (server.downloads), so deleting the job does not cut them."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi import Path as PathParam
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from shears.server import artifacts, ranges
from shears.server.api.jobs import JobId, find_job
from shears.server.deps import SettingsDep, StoreDep
from shears.server.downloads import DownloadResponse, Downloads
from shears.server.models import SUCCEEDED, Job
from shears.server.problems import Problem, quoted
from shears.server.schemas import ArtifactFile, ArtifactList
from shears.server.settings import Settings
from shears.server.storage import RemoteArtifacts
from shears.server.store import Store

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])


def _folder(
    settings: Settings, store: Store, job_id: str, storage: RemoteArtifacts | None = None
) -> tuple[Job, Path]:
    job = find_job(store, job_id)
    if job.status != SUCCEEDED or not job.artifact_dir or job.manifest is None:
        raise Problem(409, "not_ready", f"job {job.id} is {job.status}; artifacts exist once it succeeded")
    folder = settings.jobs_dir / job.id / job.artifact_dir
    there = storage.exists(job.id, job.artifact_dir) if storage is not None else folder.is_dir()
    if not there:
        raise Problem(410, "gone", f"the artifacts of job {job.id} are no longer on the server")
    return job, folder


def _storage(request: Request) -> RemoteArtifacts | None:
    return request.app.state.storage


def _listing(job: Job, folder: Path, storage: RemoteArtifacts | None) -> list[dict[str, Any]]:
    """The files as stored with the job; only a job stored before manifest_file existed has its
    manifest.json hashed here."""
    assert job.manifest is not None and job.artifact_dir is not None
    manifest_file = job.manifest_file
    if manifest_file is None:
        if storage is not None:
            manifest_file = storage.manifest_entry(job.id, job.artifact_dir)
        else:
            manifest_file = artifacts.manifest_entry(folder)
    return artifacts.listing(job.manifest, manifest_file)


@router.get(
    "/{job_id}/artifacts", response_model=ArtifactList, summary="The job's files with sizes and sha256"
)
def list_artifacts(job_id: JobId, request: Request, settings: SettingsDep, store: StoreDep) -> ArtifactList:
    storage = _storage(request)
    job, folder = _folder(settings, store, job_id, storage)
    assert job.manifest is not None
    base = f"/v1/jobs/{job.id}/artifacts"
    files = [ArtifactFile(url=f"{base}/{f['name']}", **f) for f in _listing(job, folder, storage)]
    return ArtifactList(files=files, archive=f"/v1/jobs/{job.id}/artifacts.tar", manifest=job.manifest)


def _downloads(request: Request) -> Downloads:
    return request.app.state.downloads


_TAR = "/{job_id}/artifacts.tar"
_FILE = "/{job_id}/artifacts/{name:path}"


@router.get(
    _TAR,
    summary="All files as one uncompressed tar (streamed)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}}},
)
async def archive(job_id: JobId, request: Request, settings: SettingsDep, store: StoreDep) -> Response:
    storage = _storage(request)
    job, folder = await run_in_threadpool(_folder, settings, store, job_id, storage)
    assert job.manifest is not None and job.artifact_dir is not None
    files = await run_in_threadpool(_listing, job, folder, storage)
    headers = {
        "Content-Length": str(artifacts.tar_size(files)),
        "Content-Disposition": f'attachment; filename="{job.id}.tar"',
    }
    if request.method == "HEAD":
        return Response(media_type="application/x-tar", headers=headers)
    if storage is not None:
        artifact_dir = job.artifact_dir
        stream = artifacts.tar_stream(
            folder, files, job.id, read=lambda name: storage.read(job.id, artifact_dir, name)
        )
    else:
        stream = artifacts.tar_stream(folder, files, job.id)
    return DownloadResponse(
        _downloads(request), job.id, stream, media_type="application/x-tar", headers=headers
    )


@router.get(
    _FILE,
    summary="One file; supports Range, If-Range and If-None-Match",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "a byte range"},
        304: {"description": "If-None-Match matched the ETag"},
    },
)
async def download(
    job_id: JobId,
    name: Annotated[str, PathParam(max_length=300)],
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    if_none_match: Annotated[str | None, Header(max_length=200)] = None,
    range_header: Annotated[str | None, Header(alias="Range", max_length=200)] = None,
    if_range: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    storage = _storage(request)
    job, folder = await run_in_threadpool(_folder, settings, store, job_id, storage)
    assert job.manifest is not None and job.artifact_dir is not None
    files = await run_in_threadpool(_listing, job, folder, storage)
    entry = next((f for f in files if f["name"] == name), None)
    if entry is None:
        raise Problem(
            404, "not_found", f"job {job.id} has no artifact {quoted(name)}; see /v1/jobs/{job.id}/artifacts"
        )
    if storage is not None:
        artifact_dir = job.artifact_dir

        def read(start: int, length: int | None) -> Iterator[bytes]:
            return storage.read(job.id, artifact_dir, entry["name"], start, length)
    else:
        read = ranges.read_file(folder / entry["name"])  # the name comes from the manifest, not the URL
    return ranges.ranged_response(
        read,
        size=entry["size"],
        etag=f'"{entry["sha256"]}"',
        filename=Path(entry["name"]).name,
        range_header=range_header,
        if_range=if_range,
        if_none_match=if_none_match,
        head=request.method == "HEAD",
        stream=partial(DownloadResponse, _downloads(request), job.id),
    )


# HEAD: the same answers without a body (an operation id of its own for each).
router.head(_TAR, summary="The tar's size, without the body", operation_id="archive_head")(archive)
router.head(_FILE, summary="One file's headers, without the body", operation_id="download_head")(download)
