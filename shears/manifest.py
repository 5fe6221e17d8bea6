"""Checksums and the manifest.json that records what a job did."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
_PART = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,95}"  # fits a ustar header with the job-id prefix
# A name a manifest may list: plain relative parts, one folder level at most (checked before any
# download path is built from one).
SAFE_NAME = re.compile(rf"^{_PART}(/{_PART})?$")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_entries(folder: Path) -> list[dict[str, Any]]:
    """Every file under `folder` but the manifest, sorted, with size and sha256."""
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name == MANIFEST:
            continue
        entries.append({"name": name, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return entries


def versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    from shears import __version__

    return {
        "shears": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write and fsync, so a manifest on disk is always whole."""
    with path.open("w") as handle:
        handle.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def verify_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Names of files whose size or checksum differs from the manifest (missing ones included)."""
    bad = []
    for entry in manifest["files"]:
        path = folder / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            bad.append(entry["name"])
    return bad


def refresh_files(folder: Path, **updates: Any) -> dict[str, Any] | None:
    """Re-list a folder's files (and apply `updates`) in an existing manifest, after a later step
    such as `shears pack` or `shears bench` added files. None when the folder has no manifest."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    manifest.update(updates)
    manifest["files"] = file_entries(folder)
    tmp = path.with_name(f".{MANIFEST}.tmp")
    write_json(tmp, manifest)
    os.replace(tmp, path)
    return manifest
