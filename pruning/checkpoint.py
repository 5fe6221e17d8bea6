"""Read tensors from a folder's safetensors shards by name, one block's worth at a time.

Tensors are read with plain file reads into fresh tensors, not through a memory map: a mapped
shard's touched pages count in the process's resident size for as long as it stays mapped, and
a block-by-block job should hold one block, not the pages of every tensor it has read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from shears.errors import ModelUnavailable
from shears.kernels.safetensors_io import read_header

INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class _Entry:
    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the shard
    nbytes: int


def _read_entries(path: Path) -> dict[str, _Entry]:
    """The tensors of one safetensors file, their offsets checked against the file."""
    try:
        base, header = read_header(path)
    except ValueError as exc:
        raise ModelUnavailable(f"{path}: not a safetensors file ({exc})") from exc
    header.pop("__metadata__", None)
    size = path.stat().st_size
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelUnavailable(f"{path}: tensor {name!r} has a malformed header entry ({exc!r})") from exc
        nbytes = _numel(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or end - begin != nbytes or begin < 0 or base + end > size:
            raise ModelUnavailable(
                f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) has data offsets "
                f"[{begin}, {end}] that do not fit its size or the file; the file is corrupt or truncated"
            )
        entries[name] = _Entry(path.name, dtype, shape, base + begin, nbytes)
    return entries


def weight_files(folder: Path) -> list[str]:
    """The safetensors files transformers would load from a folder without an index.

    `model.safetensors` when present; else every other *.safetensors except our packed sparse*
    files and Mistral's `consolidated*.safetensors` (the same weights in Mistral's own names, which
    transformers never loads: reading both would double every tensor).
    """
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    files = sorted(
        p.name for p in folder.glob("*.safetensors") if not p.name.startswith(("sparse", "consolidated"))
    )
    if not files:
        if any(folder.glob("consolidated*.safetensors")):
            raise ModelUnavailable(
                f"{folder}: only Mistral's consolidated.safetensors, which transformers does not load; "
                "convert the checkpoint to the Hugging Face format (model.safetensors)"
            )
        raise ModelUnavailable(f"{folder}: no safetensors weights")
    return files


class Checkpoint:
    """The tensor names, shapes and dtypes of a safetensors checkpoint, and lazy access to them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / INDEX
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        else:
            shards = weight_files(folder)
        entries: dict[str, _Entry] = {}
        for shard in shards:
            entries.update(_read_entries(folder / shard))
        if index.is_file():
            missing = sorted(set(weight_map) - set(entries))
            if missing:
                raise ModelUnavailable(f"{folder}: the index lists tensors no shard holds: {missing[:5]}")
            entries = {name: entries[name] for name in weight_map}
        self._entries = entries
        self.file_of = {name: e.shard for name, e in entries.items()}
        self.shapes: dict[str, tuple[int, ...]] = {name: e.shape for name, e in entries.items()}
        self.dtypes: dict[str, torch.dtype] = {name: e.dtype for name, e in entries.items()}

    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    def load(self, names: Iterable[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        wanted = list(names)
        for name in wanted:
            if name not in self._entries:
                raise ModelUnavailable(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        tensors: dict[str, torch.Tensor] = {}
        for shard in dict.fromkeys(self._entries[name].shard for name in wanted):
            path = self.folder / shard
            with path.open("rb", buffering=0) as handle:
                for name in wanted:
                    if self._entries[name].shard == shard:
                        tensors[name] = _read(handle, self._entries[name], path).to(device)
        return {name: tensors[name] for name in wanted}

    def dominant_dtype(self) -> torch.dtype:
        """The dtype holding most parameters: what 'auto' means for output weights."""
        totals: dict[torch.dtype, int] = {}
        for name, shape in self.shapes.items():
            if self.dtypes[name].is_floating_point:
                totals[self.dtypes[name]] = totals.get(self.dtypes[name], 0) + _numel(shape)
        return max(totals, key=lambda d: totals[d]) if totals else torch.float32


class TensorSource:
    """Tensors already in memory, read like a Checkpoint: what a KeyMap converts cut tensors from."""

    def __init__(self, tensors: dict[str, torch.Tensor], folder: Path) -> None:
        self.folder = folder  # named in errors
        self._tensors = tensors
        self.shapes: dict[str, tuple[int, ...]] = {n: tuple(t.shape) for n, t in tensors.items()}
        self.dtypes: dict[str, torch.dtype] = {n: t.dtype for n, t in tensors.items()}

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def load(self, names: Iterable[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {name: self._tensors[name].to(device) for name in names}


def _read(handle: BinaryIO, entry: _Entry, path: Path) -> torch.Tensor:
    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    if entry.nbytes:
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < entry.nbytes:  # preadv may return short counts on some filesystems
            got = os.preadv(handle.fileno(), [view[done:]], entry.start + done)
            if got <= 0:
                raise ModelUnavailable(f"{path}: truncated at byte {entry.start + done}")
            done += got
    return tensor


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_DTYPE: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}
