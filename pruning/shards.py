"""Write sharded safetensors one tensor at a time, so a pruned block goes to disk as soon as it is done.

safetensors' own writer needs every tensor of a file in memory at once. The names, dtypes and
shapes of the output are known before pruning starts (the same as the input's), so the headers can
be written up front and tensor bytes appended as blocks finish: memory stays at one block.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from shears.pruning.checkpoint import INDEX, SAFETENSORS_DTYPE

_WRITE_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Shard:
    file: str
    tensors: list[TensorSpec] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[TensorSpec], max_bytes: int, stem: str = "model") -> list[Shard]:
    """Split tensors, in write order, into shards of at most max_bytes (a larger tensor gets its own)."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in tensors:
        if groups[-1] and size + spec.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        return [Shard(f"{stem}.safetensors", groups[0])]
    total = len(groups)
    return [Shard(f"{stem}-{i + 1:05d}-of-{total:05d}.safetensors", g) for i, g in enumerate(groups)]


def _prefix_digest(path: Path, size: int) -> Any:
    """sha256 of the first `size` bytes of a file; ValueError if the file is shorter or missing."""
    digest, left = hashlib.sha256(), size
    try:
        with open(path, "rb") as handle:
            while left > 0:
                chunk = handle.read(min(left, 1 << 22))
                if not chunk:
                    break
                digest.update(chunk)
                left -= len(chunk)
    except FileNotFoundError as exc:
        raise ValueError(f"{path.name} is missing") from exc
    if left:
        raise ValueError(f"{path.name} is shorter than the snapshot recorded")
    return digest


def _header(shard: Shard) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard.tensors:
        entries[spec.name] = {
            "dtype": SAFETENSORS_DTYPE[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Appends tensors to planned shards in plan order; each file is fsynced when it is complete.

    With `hashing`, it keeps each file's size and running sha256, so `snapshot()` can say what is on
    disk so far and `restore()` can continue after it (resuming a job, pruning/resume.py)."""

    def __init__(
        self, folder: Path, shards: list[Shard], *, hashing: bool = False, exact: bool = False
    ) -> None:
        """`exact`: the bytes as given (weights are written with -0.0 as +0.0; saved activations
        must come back bit for bit)."""
        self.folder = folder
        self.exact = exact
        self.shards = shards
        self._queue = [(shard, spec) for shard in shards for spec in shard.tensors]
        self._position = 0
        self._handle: BinaryIO | None = None
        self.hashing = hashing
        self._digests: dict[str, Any] = {}  # file -> running sha256 of the bytes written
        self._sizes: dict[str, int] = {}

    def _emit(self, shard: Shard, data: bytes | memoryview) -> None:
        assert self._handle is not None
        self._handle.write(data)
        if self.hashing:
            self._digests[shard.file].update(data)
            self._sizes[shard.file] += len(data)

    def write(self, name: str, tensor: torch.Tensor, *, exact: bool = False) -> None:
        """Append `tensor`; floats get -0.0 written as +0.0 unless the writer or this call is `exact`
        (a tensor copied from the source as it is, bit for bit)."""
        shard, spec = self._queue[self._position]
        if name != spec.name:
            raise RuntimeError(f"tensor {name!r} written out of plan order (expected {spec.name!r})")
        if tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"tensor {name!r} has shape {tuple(tensor.shape)}, planned {spec.shape}")
        if self._handle is None:
            self._handle = open(self.folder / shard.file, "wb")  # noqa: SIM115 - spans many calls
            self._digests[shard.file], self._sizes[shard.file] = hashlib.sha256(), 0
            self._emit(shard, _header(shard))
        flat = tensor.detach().to("cpu", spec.dtype).contiguous().reshape(-1)
        # In slices, so that normalising a large tensor (an embedding) never doubles its memory.
        for piece in flat.split(_WRITE_ELEMENTS):
            if piece.is_floating_point() and not (self.exact or exact):
                piece = piece + 0.0  # -0.0 -> +0.0: same value, and one byte pattern for a zero
            self._emit(shard, memoryview(piece.view(torch.uint8).numpy()))
        self._position += 1
        if self._position == len(self._queue) or self._queue[self._position][0] is not shard:
            self._close()

    def _close(self) -> None:
        assert self._handle is not None
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._handle = None

    def finish(self) -> list[str]:
        """Check that every planned tensor was written; write the index when there are several shards."""
        if self._position != len(self._queue):
            raise RuntimeError(f"only {self._position} of {len(self._queue)} planned tensors were written")
        files = [shard.file for shard in self.shards]
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {spec.name: shard.file for shard in self.shards for spec in shard.tensors},
            }
            (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            files.append(INDEX)
        return files

    def snapshot(self) -> dict[str, Any]:
        """What is on disk so far, made durable: tensors written, and each file's size and sha256."""
        assert self.hashing, "snapshot() needs a ShardWriter made with hashing=True"
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
        files = {
            name: {"size": self._sizes[name], "sha256": d.hexdigest()} for name, d in self._digests.items()
        }
        return {"position": self._position, "files": files}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue after a snapshot: its files are checked (size and sha256 of the recorded bytes),
        cut back to the recorded size, and the next tensor is appended after them. Raises ValueError,
        changing nothing, when the snapshot does not fit this plan or the files on disk."""
        assert self.hashing and self._position == 0 and self._handle is None
        position, files = state["position"], state["files"]
        if not isinstance(position, int) or not 0 < position <= len(self._queue):
            raise ValueError(f"snapshot position {position!r} is outside the plan")
        written: dict[str, int] = {}  # file -> bytes the plan puts there after `position` tensors
        for shard, spec in self._queue[:position]:
            written[shard.file] = written.get(shard.file, len(_header(shard))) + spec.nbytes
        if list(files) != list(written) or any(files[n]["size"] != size for n, size in written.items()):
            raise ValueError("the snapshot's files do not match the shard plan")
        digests = {}
        for name, entry in files.items():
            digests[name] = _prefix_digest(self.folder / name, entry["size"])
            if digests[name].hexdigest() != entry["sha256"]:
                raise ValueError(f"{name} does not hold the bytes the snapshot recorded")
        for name, entry in files.items():
            os.truncate(self.folder / name, entry["size"])
        self._digests, self._sizes = digests, {name: entry["size"] for name, entry in files.items()}
        self._position = position
        last, _ = self._queue[position - 1]
        if position < len(self._queue) and self._queue[position][0] is last:  # the last file is not full
            self._handle = open(self.folder / last.file, "r+b")  # noqa: SIM115 - spans many calls
            self._handle.seek(files[last.file]["size"])

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
