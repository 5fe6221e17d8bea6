"""A deterministic safetensors writer: same tensors and metadata, same bytes.

safetensors.torch.save_file stores `__metadata__` from a Rust HashMap, so with more than one metadata
key its header order (and the file's hash) changes from run to run. This writer emits the header with
sorted keys and the tensors in name order (the format allows any order as long as the data has no
holes), padded to 8 bytes as the reference implementation does. Files read back with safe_open.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


_MAX_HEADER = 100 * 2**20  # the safetensors reference refuses larger headers too


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, header JSON) of a safetensors file; ValueError if it is not one."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 2 <= length <= min(_MAX_HEADER, size - 8):
            raise ValueError("bad header length")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return 8 + length, header


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPES:
        raise TypeError(f"dtype {dtype} has no safetensors name here")
    return _DTYPES[dtype]


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def save_deterministic(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` to `path` (little-endian, as safetensors requires), fsynced."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {key: str(metadata[key]) for key in sorted(metadata)}
    offset = 0
    names = sorted(tensors)
    for name in names:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": dtype_name(tensor.dtype),
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for name in names:
            handle.write(tensor_bytes(tensors[name]))
        handle.flush()
        os.fsync(handle.fileno())
