"""/v1/calibration: upload a calibration text file; jobs name it as `upload:<id>`.

The body is the file itself (`curl --data-binary @c4.txt -H 'Content-Type: text/plain'
'.../v1/calibration?filename=c4.txt'`) or a multipart form with one `file` part (`curl -F file=@c4.txt`).
Either way it is written to a temporary name, size-capped while it streams, checked, fsynced and
renamed to `<uploads>/<id><suffix>`, the name the engine reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Annotated, BinaryIO

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from shears.calibration.sources import SUFFIXES, UPLOAD_ID
from shears.server.deps import SettingsDep, StoreDep
from shears.server.disk import free_bytes
from shears.server.models import Upload
from shears.server.problems import Problem, quoted
from shears.server.schemas import UploadOut, upload_out
from shears.server.settings import Settings
from shears.server.storage import RemoteArtifacts
from shears.server.store import Store, new_id

router = APIRouter(prefix="/v1/calibration", tags=["calibration"])
_MULTIPART_OVERHEAD = 64 << 10
_BODY = {
    "required": True,
    "content": {
        "text/plain": {"schema": {"type": "string"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}},
            }
        },
    },
}


def _suffix(filename: str) -> str:
    suffix = Path(filename).suffix.lower() or ".txt"
    if suffix not in SUFFIXES:
        raise Problem(
            415,
            "unsupported_media_type",
            f"calibration files must end in one of {', '.join(SUFFIXES)}; got {filename!r}",
        )
    return suffix


def _check_content(path: Path, suffix: str) -> None:
    """Cheap checks that the file is what its name says, so a bad upload fails here, not in a job."""
    size = path.stat().st_size
    if size == 0:
        raise Problem(422, "invalid_upload", "the uploaded file is empty")
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
        if suffix in (".txt", ".jsonl"):
            try:
                data = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise Problem(422, "invalid_upload", f"the file is not UTF-8 text ({exc})") from exc
            if suffix == ".jsonl":
                for number, line in enumerate(data.splitlines(), 1):
                    if line.strip() and not isinstance(_json_or_none(line), dict):
                        raise Problem(422, "invalid_upload", f"line {number} is not a JSON object")
        elif suffix == ".parquet":
            handle.seek(max(0, size - 4))
            if head[:4] != b"PAR1" or handle.read(4) != b"PAR1":
                raise Problem(422, "invalid_upload", "the file is not Parquet (no PAR1 magic)")
        elif suffix == ".safetensors":
            length = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else size
            if length + 8 > size or not isinstance(_json_or_none(head[8 : 8 + length]), dict):
                raise Problem(422, "invalid_upload", "the file is not a safetensors file")


def _copy_capped(source: BinaryIO, out: BinaryIO, cap: int, digest: hashlib._Hash) -> int:
    size = 0
    while chunk := source.read(1 << 20):
        size += len(chunk)
        if size > cap:
            raise Problem(413, "payload_too_large", f"uploads are capped at {cap} bytes")
        digest.update(chunk)
        out.write(chunk)
    return size


def _json_or_none(text: str | bytes) -> object:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None


@router.post(
    "",
    status_code=201,
    response_model=UploadOut,
    openapi_extra={"requestBody": _BODY},
    summary="Upload a calibration file (size-capped); use the returned `source` in a job",
)
async def upload(
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    filename: Annotated[str, Query(min_length=1, max_length=200)] = "upload.txt",
) -> UploadOut:
    cap = settings.upload_max_bytes
    declared = request.headers.get("content-length")
    content_type = request.headers.get("content-type", "")
    multipart = content_type.startswith("multipart/form-data")
    if declared is not None and (
        not declared.isdigit() or int(declared) > cap + (_MULTIPART_OVERHEAD if multipart else 0)
    ):
        raise Problem(413, "payload_too_large", f"uploads are capped at {cap} bytes")
    if multipart and declared is None:
        raise Problem(411, "length_required", "multipart uploads need a Content-Length; or send the raw body")
    await run_in_threadpool(_check_room, settings, store, int(declared or 0))
    upload_id = new_id("u")
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    temporary = settings.uploads_dir / f".{upload_id}.partial"
    digest, size = hashlib.sha256(), 0
    try:
        with open(temporary, "wb") as out:
            if multipart:
                form = await request.form(max_files=1, max_fields=2)
                part = form.get("file")
                if part is None or isinstance(part, str):
                    raise Problem(
                        422, "invalid_upload", "the multipart form needs one file part named 'file'"
                    )
                filename = part.filename or filename
                size = await run_in_threadpool(_copy_capped, part.file, out, cap, digest)
            else:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > cap:
                        raise Problem(413, "payload_too_large", f"uploads are capped at {cap} bytes")
                    digest.update(chunk)
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        suffix = _suffix(filename)
        await run_in_threadpool(_check_content, temporary, suffix)
        await run_in_threadpool(_check_quota, settings, store, size)  # a chunked body declared no size
        stored = settings.uploads_dir / f"{upload_id}{suffix}"
        os.replace(temporary, stored)
    finally:
        temporary.unlink(missing_ok=True)
    storage = request.app.state.storage
    try:
        if storage is not None:  # workers on other hosts fetch it from there
            await run_in_threadpool(storage.store_upload, stored)
        record = await run_in_threadpool(
            store.add_upload, upload_id, Path(filename).name[:255], size, digest.hexdigest()
        )
    except BaseException:  # no file without its record (a full disk can refuse the record)
        await run_in_threadpool(_remove_files, settings, storage, upload_id)
        raise
    return upload_out(record)


def _check_room(settings: Settings, store: Store, incoming: int) -> None:
    """The free-disk minimum and the uploads quota hold with `incoming` more bytes stored."""
    free = free_bytes(settings.uploads_dir)
    if free - incoming < settings.min_free_disk_bytes:
        raise Problem(
            507,
            "insufficient_storage",
            f"the server's disk has {free} bytes free and keeps {settings.min_free_disk_bytes} free; "
            f"an upload of {incoming} bytes does not fit",
        )
    _check_quota(settings, store, incoming)


def _check_quota(settings: Settings, store: Store, incoming: int) -> None:
    used = store.upload_bytes()
    if used + incoming > settings.upload_quota_bytes:
        raise Problem(
            507,
            "quota_exceeded",
            f"uploads hold {used} bytes of their {settings.upload_quota_bytes}-byte quota; this one needs "
            f"{incoming} more (DELETE /v1/calibration/<id> frees uploads no job needs any more)",
        )


def _remove_files(settings: Settings, storage: RemoteArtifacts | None, upload_id: str) -> None:
    for path in settings.uploads_dir.glob(f"{upload_id}.*"):
        path.unlink(missing_ok=True)
        if storage is not None:
            storage.remove_upload(path.name)


def _find_upload(store: Store, upload_id: str) -> Upload:
    record = store.get_upload(upload_id) if UPLOAD_ID.fullmatch(upload_id) else None
    if record is None:
        raise Problem(404, "not_found", f"no upload {quoted(upload_id)}")
    return record


@router.get("/{upload_id}", response_model=UploadOut, summary="An uploaded calibration file's record")
def get_upload(upload_id: str, store: StoreDep) -> UploadOut:
    return upload_out(_find_upload(store, upload_id))


@router.delete(
    "/{upload_id}",
    status_code=204,
    summary="Delete an upload no queued or running job reads (frees its quota and disk space)",
)
def delete_upload(upload_id: str, request: Request, settings: SettingsDep, store: StoreDep) -> Response:
    record = _find_upload(store, upload_id)
    using = store.jobs_using_upload(record.id)
    if using:
        raise Problem(
            409,
            "conflict",
            f"upload {record.id} is read by {len(using)} queued or running job(s) ({', '.join(using[:5])}); "
            "cancel them or let them finish first",
        )
    # The file first: on a full disk its space is what lets the store record the deletion.
    _remove_files(settings, request.app.state.storage, record.id)
    store.delete_upload(record.id)
    return Response(status_code=204)
