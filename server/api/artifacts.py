"""/v1/jobs/{id}/artifacts: the manifest, single files (HTTP Range, ETag = sha256) and a tar of all."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from server import artifacts
from server.api.jobs import JobId, find_job
from server.deps import SettingsDep, StoreDep
from server.models import SUCCEEDED, Job
from server.problems import Problem
from server.schemas import ArtifactFile, ArtifactList
from server.settings import Settings
from server.store import Store

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])


def _folder(settings: Settings, store: Store, job_id: str) -> tuple[Job, Path]:
    job = find_job(store, job_id)
    if job.status != SUCCEEDED or not job.artifact_dir or job.manifest is None:
        raise Problem(409, "not_ready", f"job {job.id} is {job.status}; artifacts exist once it succeeded")
    folder = settings.jobs_dir / job.id / job.artifact_dir
    if not folder.is_dir():
        raise Problem(410, "gone", f"the artifacts of job {job.id} are no longer on the server")
    return job, folder


@router.get(
    "/{job_id}/artifacts", response_model=ArtifactList, summary="The job's files with sizes and sha256"
)
def list_artifacts(job_id: JobId, settings: SettingsDep, store: StoreDep) -> ArtifactList:
    job, folder = _folder(settings, store, job_id)
    assert job.manifest is not None
    base = f"/v1/jobs/{job.id}/artifacts"
    files = [ArtifactFile(url=f"{base}/{f['name']}", **f) for f in artifacts.listing(folder, job.manifest)]
    return ArtifactList(files=files, archive=f"/v1/jobs/{job.id}/artifacts.tar", manifest=job.manifest)


@router.get(
    "/{job_id}/artifacts.tar",
    summary="All files as one uncompressed tar (streamed)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}}},
)
async def archive(job_id: JobId, settings: SettingsDep, store: StoreDep) -> StreamingResponse:
    job, folder = await run_in_threadpool(_folder, settings, store, job_id)
    assert job.manifest is not None
    files = await run_in_threadpool(artifacts.listing, folder, job.manifest)
    headers = {
        "Content-Length": str(artifacts.tar_size(files)),
        "Content-Disposition": f'attachment; filename="{job.id}.tar"',
    }
    return StreamingResponse(
        artifacts.tar_stream(folder, files, job.id), media_type="application/x-tar", headers=headers
    )


@router.get(
    "/{job_id}/artifacts/{name:path}",
    summary="One file; supports Range and If-None-Match",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "a byte range"}},
)
async def download(
    job_id: JobId,
    name: Annotated[str, PathParam(max_length=300)],
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    if_none_match: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    job, folder = await run_in_threadpool(_folder, settings, store, job_id)
    assert job.manifest is not None
    found = await run_in_threadpool(artifacts.lookup, folder, job.manifest, name)
    if found is None:
        raise Problem(
            404, "not_found", f"job {job.id} has no artifact {name!r}; see /v1/jobs/{job.id}/artifacts"
        )
    path, entry = found
    etag = f'"{entry["sha256"]}"'
    if if_none_match and etag in [tag.strip() for tag in if_none_match.split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=Path(entry["name"]).name,
        headers={"ETag": etag, "Cache-Control": "private, max-age=0, must-revalidate"},
    )
