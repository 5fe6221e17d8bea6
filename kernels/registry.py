"""`FORMATS`: every packed layout, one record each (gpt-fast's one handler per quantization format).

A record says how its layout packs, unpacks and validates a weight, which tensors it stores
("<weight>.<part>" in sparse*.safetensors), its pure-torch reference matmul (the ground truth),
the Triton module that multiplies it, and the launches that module is tuned over. Packing, the
sparse files, the dispatcher, SparseLinear, the self-check and the benchmark read this table; a
layout it does not list is a PackedFormatError wherever it is met, never read as another.

Adding a layout: its Packed class and pack/unpack/validate (formats.py), its reference matmul
(reference.py), its Triton module and launch table (configs.py), and a record here (+ tests).

A kernel module provides `supports(packed, dtype) -> bool` and
`matmul(x, packed, config, state=None) -> y`, and may provide `prepare(packed) -> state`: what it
derives from a weight once (kept by dispatch.PackedOperand). It is imported on first use: the
packing code runs where triton is not installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from shears.kernels.configs import BITMASK_LAUNCHES, NM_LAUNCHES, Launches
from shears.kernels.errors import PackedFormatError
from shears.kernels.formats import (
    MAX_GROUP,
    PackedBitmask,
    PackedNM,
    PackedWeight,
    pack_bitmask,
    pack_nm,
    unpack_bitmask,
    unpack_nm,
    validate_bitmask,
    validate_nm,
)
from shears.kernels.reference import bitmask_matmul_reference, nm_matmul_reference


@dataclass(frozen=True)
class Format:
    layout: str  # its name in the sparse files' metadata
    packed: type[PackedNM] | type[PackedBitmask]  # the in-memory form: .tensors(), .from_parts(...)
    parts: tuple[str, ...]  # the tensors it stores, in order
    stores: Callable[[int, int], bool]  # whether it packs pattern n:m (0, 0: unstructured)
    pack: Callable[[torch.Tensor, int, int, str], PackedWeight]  # (dense, n, m, name)
    unpack: Callable[[PackedWeight], torch.Tensor]
    validate: Callable[[PackedWeight, str], None]  # PackedFormatError unless well formed
    reference: Callable[[torch.Tensor, PackedWeight], torch.Tensor]  # y = x @ W^T, fp32 accumulation
    kernel: str  # module of shears.kernels
    launches: Launches

    def kernel_module(self) -> ModuleType:
        return importlib.import_module(f"shears.kernels.{self.kernel}")

    def assemble(
        self, parts: dict[str, torch.Tensor], n: int, m: int, shape: tuple[int, int]
    ) -> PackedWeight:
        """The packed weight from its stored tensors (not validated)."""
        return self.packed.from_parts(parts, n, m, shape)


FORMATS: dict[str, Format] = {
    record.layout: record
    for record in (  # in order of preference: a pattern packs in the first layout that stores it
        Format(
            "nm",
            PackedNM,
            ("values", "meta"),
            stores=lambda n, m: 0 < n < m <= MAX_GROUP,
            pack=pack_nm,
            unpack=unpack_nm,  # type: ignore[arg-type]
            validate=validate_nm,  # type: ignore[arg-type]
            reference=nm_matmul_reference,  # type: ignore[arg-type]
            kernel="triton_nm",
            launches=NM_LAUNCHES,
        ),
        Format(
            "bitmask",
            PackedBitmask,
            ("bitmask", "values", "row_offsets"),
            stores=lambda n, m: True,  # any pattern: unstructured, or groups too wide for N:M metadata
            pack=lambda dense, n, m, name: pack_bitmask(dense, name),
            unpack=unpack_bitmask,  # type: ignore[arg-type]
            validate=validate_bitmask,  # type: ignore[arg-type]
            reference=bitmask_matmul_reference,  # type: ignore[arg-type]
            kernel="triton_bitmask",
            launches=BITMASK_LAUNCHES,
        ),
    )
}


def format_of(layout: str | PackedWeight) -> Format:
    """The record of a layout name or a packed weight; PackedFormatError for a layout not listed."""
    name = layout if isinstance(layout, str) else getattr(layout, "layout", None)
    record = FORMATS.get(name)  # type: ignore[arg-type]
    if record is None:
        raise PackedFormatError(f"unknown packed layout {name!r}; this Shears knows {', '.join(FORMATS)}")
    return record


def format_for(n: int, m: int) -> Format:
    """The layout pattern n:m packs in (n = m = 0: unstructured)."""
    return next(record for record in FORMATS.values() if record.stores(n, m))


def layout_for(n: int, m: int) -> str:
    return format_for(n, m).layout


def pack(dense: torch.Tensor, n: int, m: int, name: str = "tensor") -> PackedWeight:
    """Pack `dense` in the layout its pattern calls for (n = m = 0: unstructured)."""
    return format_for(n, m).pack(dense, n, m, name)


def unpack(packed: PackedWeight) -> torch.Tensor:
    return format_of(packed).unpack(packed)


def validate(packed: PackedWeight, name: str = "tensor") -> None:
    format_of(packed).validate(packed, name)


def reference_matmul(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T in pure torch, W decoded independently of `unpack`."""
    return format_of(packed).reference(x, packed)
