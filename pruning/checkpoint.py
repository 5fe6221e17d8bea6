"""Read tensors from a folder's safetensors shards by name, one block's worth at a time."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from pruning.errors import ModelUnavailable

INDEX = "model.safetensors.index.json"


class Checkpoint:
    """The tensor names, shapes and dtypes of a safetensors checkpoint, and lazy access to them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / INDEX
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            shards = sorted(p.name for p in folder.glob("*.safetensors") if not p.name.startswith("sparse"))
            if not shards:
                raise ModelUnavailable(f"{folder}: no safetensors weights")
            weight_map = {}
            for shard in shards:
                with safe_open(folder / shard, framework="pt") as handle:
                    weight_map.update(dict.fromkeys(handle.keys(), shard))
        self.file_of = weight_map
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for shard in sorted(set(weight_map.values())):
            with safe_open(folder / shard, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    piece = handle.get_slice(name)
                    self.shapes[name] = tuple(piece.get_shape())
                    self.dtypes[name] = _DTYPES[piece.get_dtype()]

    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    def load(self, names: Iterable[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.file_of:
                raise ModelUnavailable(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
            by_file.setdefault(self.file_of[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for shard, shard_names in by_file.items():
            with safe_open(self.folder / shard, framework="pt", device=str(device)) as handle:
                for name in shard_names:
                    tensors[name] = handle.get_tensor(name)
        return tensors

    def dominant_dtype(self) -> torch.dtype:
        """The dtype holding most parameters: what 'auto' means for output weights."""
        totals: dict[torch.dtype, int] = {}
        for name, shape in self.shapes.items():
            if self.dtypes[name].is_floating_point:
                totals[self.dtypes[name]] = totals.get(self.dtypes[name], 0) + _numel(shape)
        return max(totals, key=lambda d: totals[d]) if totals else torch.float32


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
