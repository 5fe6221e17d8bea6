"""A job's output folder: checked against its manifest before the job succeeds, served by manifest name.

Download paths are never joined from a URL: a requested name is looked up in the manifest, and the
manifest's names were checked here (plain relative names, one folder level at most) when the worker
checked the folder.

Each file is hashed once per job: the engine hashes the weights as it writes the manifest, the worker
hashes manifest.json (which cannot list its own hash) and the store keeps that entry. Clients verify
every download against these hashes, so a file damaged later is caught where it lands.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shears.errors import ShearsError
from shears.manifest import MANIFEST, SAFE_NAME, sha256_file

_CHUNK = 1 << 20


class ArtifactError(ShearsError):
    code = "internal"


def _entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    files = manifest.get("files")
    if not isinstance(files, list):
        raise ArtifactError("the manifest has no 'files' list")
    return files


def verify_folder(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Every manifest file is present with its size, and nothing else is in the folder; returns the
    listing entry of manifest.json itself (hashed here, once).

    The weights are not hashed again: the engine hashed them seconds ago, from these bytes."""
    expected: dict[str, dict[str, Any]] = {}
    for entry in _entries(manifest):
        name = entry.get("name")
        if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name or name == MANIFEST:
            raise ArtifactError(f"manifest file name {name!r} is not a plain relative name")
        expected[name] = entry
    found = set()
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink():
                raise ArtifactError(f"artifact {path.relative_to(folder)} is a symbolic link")
        found.update(str((Path(root) / name).relative_to(folder)) for name in files)
    extra = found - set(expected) - {MANIFEST}
    missing = set(expected) - found
    if extra or missing or MANIFEST not in found:
        raise ArtifactError(
            f"output folder does not match its manifest: extra {sorted(extra)}, "
            f"missing {sorted(missing | ({MANIFEST} - found))}"
        )
    for name, entry in expected.items():
        if (folder / name).stat().st_size != entry.get("size"):
            raise ArtifactError(f"artifact {name} does not match its size in the manifest")
    return manifest_entry(folder)


def manifest_entry(folder: Path) -> dict[str, Any]:
    """manifest.json's own listing entry (name, size, sha256)."""
    path = folder / MANIFEST
    return {"name": MANIFEST, "size": path.stat().st_size, "sha256": sha256_file(path)}


def listing(manifest: dict[str, Any], manifest_file: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's files plus manifest.json itself (`manifest_file`, its entry stored with the job)."""
    files = [{"name": e["name"], "size": e["size"], "sha256": e["sha256"]} for e in _entries(manifest)]
    return [*files, {key: manifest_file[key] for key in ("name", "size", "sha256")}]


def tar_size(files: list[dict[str, Any]]) -> int:
    """Bytes of the uncompressed tar `tar_stream` writes (ustar headers, 512-byte blocks, end marker)."""
    return sum(512 + -(-f["size"] // 512) * 512 for f in files) + 1024


def _read_local(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            yield chunk


def tar_stream(
    folder: Path,
    files: list[dict[str, Any]],
    prefix: str,
    read: Callable[[str], Iterator[bytes]] | None = None,
) -> Iterator[bytes]:
    """An uncompressed tar of the files, streamed (weights do not compress; no temporary copy).
    `read(name)` streams a file from elsewhere (remote storage) instead of `folder`."""
    for entry in files:
        path = folder / entry["name"]
        info = tarfile.TarInfo(f"{prefix}/{entry['name']}")
        info.size, info.mode = entry["size"], 0o644
        info.mtime = int(path.stat().st_mtime) if read is None else 0
        yield info.tobuf(format=tarfile.USTAR_FORMAT)
        yield from (read(entry["name"]) if read is not None else _read_local(path))
        if entry["size"] % 512:
            yield b"\0" * (512 - entry["size"] % 512)
    yield b"\0" * 1024
