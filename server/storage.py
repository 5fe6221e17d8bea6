"""Artifact storage named by an fsspec URL (s3://bucket/prefix/, gs://..., a shared folder), for servers
whose workers run on other hosts. Without one (the default) artifacts stay in <data_dir>/jobs and this
module is not used; fsspec and its backends (s3fs for s3://) are imported only when one is configured.

Layout under the URL: <job_id>/<artifact_dir>/<name> (artifact_dir = "attempt-N/out", as on local disk,
so a lost attempt's partial upload never mixes with the next attempt's), and uploads/<upload_id><suffix>
for calibration uploads, so workers on any host can fetch them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from shears.manifest import MANIFEST
from shears.server.artifacts import ArtifactError

_CHUNK = 1 << 20


def read_span(handle: BinaryIO, start: int, length: int | None) -> Iterator[bytes]:
    """Bytes [start, start+length) of an open file (to its end when length is None), in chunks."""
    handle.seek(start)
    left = length
    while left is None or left > 0:
        chunk = handle.read(_CHUNK if left is None else min(_CHUNK, left))
        if not chunk:
            return
        if left is not None:
            left -= len(chunk)
        yield chunk


class RemoteArtifacts:
    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        try:
            import fsspec
        except ImportError as exc:  # pragma: no cover - fsspec is a dependency of the s3 extra
            raise RuntimeError("artifact URLs need fsspec: pip install 'shears[s3]'") from exc
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **(options or {}))
        self.root = root.rstrip("/")

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # -- the worker's side ------------------------------------------------------------------------

    def upload(self, folder: Path, job_id: str, artifact_dir: str, manifest: dict[str, Any]) -> None:
        """Copy a verified output folder; then check every object's size against the manifest."""
        target = self._path(job_id, artifact_dir)
        try:
            for root, _dirs, files in os.walk(folder):
                for name in files:
                    local = Path(root) / name
                    self.fs.put_file(str(local), f"{target}/{local.relative_to(folder).as_posix()}")
            expected = {e["name"]: e["size"] for e in manifest["files"]}
            expected[MANIFEST] = (folder / MANIFEST).stat().st_size
            for name, size in expected.items():
                found = self.fs.info(f"{target}/{name}")["size"]
                if found != size:
                    raise ArtifactError(f"uploaded {name} has {found} bytes, the manifest says {size}")
        except BaseException:
            self.remove(job_id, artifact_dir)
            raise

    def fetch_upload(self, upload_name: str, uploads_dir: Path) -> None:
        """Copy an uploaded calibration file into this host's uploads folder, if it is not there yet."""
        local = uploads_dir / upload_name
        if not local.exists():
            uploads_dir.mkdir(parents=True, exist_ok=True)
            partial = uploads_dir / f".{upload_name}.fetch"
            self.fs.get_file(self._path("uploads", upload_name), str(partial))
            partial.rename(local)

    # -- the API's side --------------------------------------------------------------------------

    def store_upload(self, local: Path) -> None:
        self.fs.put_file(str(local), self._path("uploads", local.name))

    def remove_upload(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path("uploads", name))

    def exists(self, job_id: str, artifact_dir: str) -> bool:
        self.fs.invalidate_cache()  # another server may have deleted the job since this one listed it
        return bool(self.fs.exists(self._path(job_id, artifact_dir, MANIFEST)))

    def manifest_entry(self, job_id: str, artifact_dir: str) -> dict[str, Any]:
        """The stored manifest.json's listing entry, hashed from the stored copy (jobs that finished
        before the store kept this entry)."""
        data = self.fs.cat_file(self._path(job_id, artifact_dir, MANIFEST))
        json.loads(data)  # a damaged manifest copy fails here, not in a client
        return {"name": MANIFEST, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def read(
        self, job_id: str, artifact_dir: str, name: str, start: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        """Stream bytes [start, start+length) of a stored file (ranged reads, nothing staged on disk)."""
        with self.fs.open(self._path(job_id, artifact_dir, name), "rb", block_size=8 * _CHUNK) as handle:
            yield from read_span(handle, start, length)

    def remove(self, job_id: str, artifact_dir: str | None = None) -> None:
        path = self._path(job_id, artifact_dir) if artifact_dir else self._path(job_id)
        self.fs.invalidate_cache()
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
