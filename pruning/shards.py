"""Write sharded safetensors one tensor at a time, so a pruned block goes to disk as soon as it is done.

safetensors' own writer needs every tensor of a file in memory at once. The names, dtypes and
shapes of the output are known before pruning starts (the same as the input's), so the headers can
be written up front and tensor bytes appended as blocks finish: memory stays at one block.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

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
    """Appends tensors to planned shards in plan order; each file is fsynced when it is complete."""

    def __init__(self, folder: Path, shards: list[Shard]) -> None:
        self.folder = folder
        self.shards = shards
        self._queue = [(shard, spec) for shard in shards for spec in shard.tensors]
        self._position = 0
        self._handle: BinaryIO | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, spec = self._queue[self._position]
        if name != spec.name:
            raise RuntimeError(f"tensor {name!r} written out of plan order (expected {spec.name!r})")
        if tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"tensor {name!r} has shape {tuple(tensor.shape)}, planned {spec.shape}")
        if self._handle is None:
            self._handle = open(self.folder / shard.file, "wb")  # noqa: SIM115 - spans many calls
            self._handle.write(_header(shard))
        flat = tensor.detach().to("cpu", spec.dtype).contiguous().reshape(-1)
        # In slices, so that normalising a large tensor (an embedding) never doubles its memory.
        for piece in flat.split(_WRITE_ELEMENTS):
            if piece.is_floating_point():
                piece = piece + 0.0  # -0.0 -> +0.0: same value, and one byte pattern for a zero
            self._handle.write(memoryview(piece.view(torch.uint8).numpy()))
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

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
