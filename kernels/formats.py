"""Packed sparse weight formats: N:M (values + kept-index metadata) and bitmask (unstructured).

N:M, for a weight [N, K] keeping n of every m consecutive columns (m <= 16, K % m == 0):
- values   [N, K*n/m] in the weight's dtype: the n kept values of each group, in increasing column order;
- metadata int16 [N, ceil(K*n/m / per_word)]: the in-group index of every kept value, `bits` bits each
  (1 for m = 2, 2 for m <= 4, 4 for m <= 16), per_word = 16 / bits indices per int16, the value j of a
  row in word j // per_word at bit (j % per_word) * bits. Unused bits of a row's last word are zero.
  For 2:4 this is exactly the layout NVIDIA hardware and PyTorch use before any CUTLASS/cuSPARSELt
  reordering: one nibble per group of 4 (bits 1:0 the lower kept index, 3:2 the higher), four groups
  per int16 with group 0 in the lowest bits, shape [N, K/16].
- Groups with fewer than n non-zeros still take n slots (kept zeros). For 2:4 the slots are chosen as
  PyTorch chooses them (torch/sparse/_semi_structured_conversions.py), so the metadata is bit-identical
  to PyTorch's un-reordered metadata; otherwise the lowest-index zero columns fill the group.

Bitmask, for any weight [N, K]:
- bitmask     uint8 [N, ceil(K/8)]: bit k % 8 (least significant first) of byte k // 8 set where
  column k of the row is non-zero; padding bits beyond K are zero;
- values      [nnz] in the weight's dtype: the non-zeros in row-major order;
- row_offsets int64 [N + 1]: row r's values are values[row_offsets[r]:row_offsets[r + 1]].

-0.0 is a zero: it is never stored in a bitmask and is stored as +0.0 in an N:M slot (kernels and
vLLM have produced garbage from it), so unpack(pack(w)) == w + 0.0 bit for bit and
pack(unpack(p)) == p exactly.

The layouts are listed, with their kernels, in registry.FORMATS; the generic pack/unpack/validate
are there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from shears.kernels.errors import PackedFormatError

FORMAT_NAME = "shears.sparse"
FORMAT_VERSION = 1
MAX_GROUP = 16
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ROWS_ELEMENTS = 1 << 24  # pack/unpack/validate this many elements at a time to bound temporary memory


def index_bits(m: int) -> int:
    """Bits per stored in-group index: the smallest of 1, 2, 4 that holds m - 1."""
    if not 2 <= m <= MAX_GROUP:
        raise PackedFormatError(f"N:M packing needs 2 <= M <= {MAX_GROUP}; got M = {m}")
    return 1 if m == 2 else 2 if m <= 4 else 4


def indices_per_word(m: int) -> int:
    return 16 // index_bits(m)


def nm_value_columns(k: int, n: int, m: int) -> int:
    return k // m * n


def nm_metadata_columns(k: int, n: int, m: int) -> int:
    per_word = indices_per_word(m)
    return -(-nm_value_columns(k, n, m) // per_word)


@dataclass
class PackedNM:
    """A weight [N, K] that keeps n of every m consecutive columns, packed as values + index metadata."""

    values: torch.Tensor
    metadata: torch.Tensor
    n: int
    m: int
    shape: tuple[int, int]

    layout = "nm"

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        return _nbytes(self.values) + _nbytes(self.metadata)

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def nm(self) -> tuple[int, int]:
        return self.n, self.m

    @property
    def detail(self) -> str:
        """What, beside layout, shape and dtype, decides the fastest kernel: the pattern."""
        return self.pattern

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "meta": self.metadata}

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], n: int, m: int, shape: tuple[int, int]) -> PackedNM:
        return cls(parts["values"], parts["meta"], n, m, shape)

    def with_values(self, values: torch.Tensor) -> PackedNM:
        return PackedNM(values, self.metadata, self.n, self.m, self.shape)

    def to(self, device: torch.device | str) -> PackedNM:
        return PackedNM(self.values.to(device), self.metadata.to(device), self.n, self.m, self.shape)


@dataclass
class PackedBitmask:
    """A weight [N, K] of any sparsity, packed as a 1-bit-per-element mask + row-major non-zeros."""

    bitmask: torch.Tensor
    values: torch.Tensor
    row_offsets: torch.Tensor
    shape: tuple[int, int]

    layout = "bitmask"

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        return _nbytes(self.bitmask) + _nbytes(self.values) + _nbytes(self.row_offsets)

    @property
    def pattern(self) -> str:
        return "unstructured"

    @property
    def nm(self) -> tuple[int, int]:
        return 0, 0

    @property
    def density(self) -> float:
        rows, cols = self.shape
        return self.values.numel() / max(1, rows * cols)

    @property
    def detail(self) -> str:
        """What, beside layout, shape and dtype, decides the fastest kernel: the density, in tenths."""
        return f"density{round(self.density * 10)}"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"bitmask": self.bitmask, "values": self.values, "row_offsets": self.row_offsets}

    @classmethod
    def from_parts(
        cls, parts: dict[str, torch.Tensor], n: int, m: int, shape: tuple[int, int]
    ) -> PackedBitmask:
        return cls(parts["bitmask"], parts["values"], parts["row_offsets"], shape)

    def with_values(self, values: torch.Tensor) -> PackedBitmask:
        return PackedBitmask(self.bitmask, values, self.row_offsets, self.shape)

    def to(self, device: torch.device | str) -> PackedBitmask:
        return PackedBitmask(
            self.bitmask.to(device), self.values.to(device), self.row_offsets.to(device), self.shape
        )


PackedWeight = PackedNM | PackedBitmask


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def dense_nbytes(packed: PackedWeight) -> int:
    rows, cols = packed.shape
    return rows * cols * packed.values.element_size()


def _row_step(cols: int) -> int:
    return max(1, _ROWS_ELEMENTS // max(1, cols))


def _check_dense(dense: torch.Tensor, name: str) -> None:
    if dense.dim() != 2:
        raise PackedFormatError(f"{name}: only 2-D weights are packed; got shape {tuple(dense.shape)}")
    if dense.dtype not in VALUE_DTYPES:
        raise PackedFormatError(f"{name}: dtype {dense.dtype} cannot be packed (floating point only)")
    if dense.numel() == 0:
        raise PackedFormatError(f"{name}: empty weight {tuple(dense.shape)}; nothing to pack")


def _positive_zero(values: torch.Tensor) -> torch.Tensor:
    return torch.where(values == 0, torch.zeros((), dtype=values.dtype, device=values.device), values)


# ---------------------------------------------------------------------------------------------- N:M


def _kept_indices_24(nonzero: torch.Tensor) -> torch.Tensor:
    """PyTorch's choice of the two slots of every group of 4 (its encodings for groups with < 2 non-zeros)."""
    m0, m1, _m2, m3 = nonzero.unbind(-1)
    expr0, expr1, expr2 = m0 & m1, ~m0 & m1, ~m0 & ~m1
    idx0 = expr1.long() | (expr2.long() << 1)
    idx1 = (expr0 | expr2 | m3).long() | ((expr1 | ~m1).long() << 1)
    return torch.stack((idx0, idx1), dim=-1)


def _kept_indices(nonzero: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The n slots of every group: its non-zeros, then its lowest zero columns, in increasing order."""
    if (n, m) == (2, 4):
        return _kept_indices_24(nonzero)
    position = torch.arange(m, device=nonzero.device)
    rank = torch.where(nonzero, position, position + m)
    return (rank.sort(dim=-1).values[..., :n] % m).sort(dim=-1).values


@functools.cache
def _kept_table(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept slots [2^m, n], non-zero count [2^m]) for every non-zero pattern of a group, by its bit code."""
    codes = torch.arange(1 << m)
    nonzero = ((codes[:, None] >> torch.arange(m)) & 1).bool()
    return _kept_indices(nonzero, n, m), nonzero.sum(-1)


def satisfies_nm(dense: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of m consecutive columns of a 2-D `dense` has at most n non-zeros."""
    if dense.dim() != 2 or not 0 < n < m or dense.shape[1] % m:
        return False
    rows, cols = dense.shape
    step = _row_step(cols)
    for start in range(0, rows, step):
        block = dense[start : start + step]
        if bool(((block != 0).reshape(block.shape[0], cols // m, m).sum(-1) > n).any()):
            return False
    return True


def pack_nm(dense: torch.Tensor, n: int, m: int, name: str = "tensor") -> PackedNM:
    """Pack a 2-D weight that has at most n non-zeros in every group of m consecutive columns."""
    _check_dense(dense, name)
    if not 0 < n < m:
        raise PackedFormatError(f"{name}: N:M packing needs 0 < N < M; got {n}:{m}")
    bits, per_word = index_bits(m), indices_per_word(m)
    rows, cols = dense.shape
    if cols % m:
        raise PackedFormatError(f"{name}: {cols} input columns are not a multiple of M = {m} ({n}:{m})")
    groups, per_row = cols // m, nm_value_columns(cols, n, m)
    words = nm_metadata_columns(cols, n, m)
    values = torch.empty(rows, per_row, dtype=dense.dtype, device=dense.device)
    metadata = torch.empty(rows, words, dtype=torch.int16, device=dense.device)
    shifts = torch.arange(per_word, device=dense.device, dtype=torch.int32) * bits
    step = _row_step(cols)
    for start in range(0, rows, step):
        block = dense[start : start + step].reshape(-1, groups, m)
        count = block.shape[0]
        # Each group's non-zero pattern as an m-bit code, then table lookups: far faster than per-group logic.
        code = ((block != 0).to(torch.int32) << torch.arange(m, device=dense.device, dtype=torch.int32)).sum(
            -1, dtype=torch.int32
        )
        table, table_counts = (t.to(dense.device) for t in _kept_table(n, m))
        counts = table_counts[code]
        if int(counts.max()) > n:
            row, group = (int(i) for i in (counts > n).nonzero()[0])
            raise PackedFormatError(
                f"{name}: row {start + row}, columns {group * m}..{group * m + m - 1} hold "
                f"{int(counts[row, group])} non-zeros; {n}:{m} keeps at most {n} of every {m}"
            )
        kept = table[code]
        values[start : start + step] = _positive_zero(block.gather(-1, kept)).reshape(-1, per_row)
        flat = torch.zeros(count, words * per_word, dtype=torch.int32, device=dense.device)
        flat[:, :per_row] = kept.reshape(count, per_row).to(torch.int32)
        word = (flat.view(count, words, per_word) << shifts).sum(-1, dtype=torch.int32)
        metadata[start : start + step] = _to_int16(word)
    return PackedNM(values, metadata, n, m, (rows, cols))


def _to_int16(word: torch.Tensor) -> torch.Tensor:
    """16-bit patterns held in int32 (0..65535) as int16, two's complement."""
    return torch.where(word >= 1 << 15, word - (1 << 16), word).to(torch.int16)


def nm_indices(packed: PackedNM, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The kept in-group indices of rows start:stop, int64 [rows, K/m, n] (decoded from the metadata)."""
    bits, per_word = index_bits(packed.m), indices_per_word(packed.m)
    per_row = nm_value_columns(packed.shape[1], packed.n, packed.m)
    words = packed.metadata[start:stop].to(torch.int32) & 0xFFFF
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * bits
    flat = ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1)
    return flat[:, :per_row].reshape(words.shape[0], -1, packed.n).long()


def unpack_nm(packed: PackedNM) -> torch.Tensor:
    rows, cols = packed.shape
    dense = torch.zeros(rows, cols // packed.m, packed.m, dtype=packed.dtype, device=packed.device)
    step = _row_step(cols)
    for start in range(0, rows, step):
        part = packed.values[start : start + step].reshape(-1, cols // packed.m, packed.n)
        dense[start : start + step].scatter_(-1, nm_indices(packed, start, start + step), part)
    return dense.view(rows, cols)


def validate_nm(packed: PackedNM, name: str = "tensor") -> None:
    """Raise PackedFormatError unless `packed` is a well-formed N:M tensor (shapes, dtypes, indices)."""
    n, m = packed.n, packed.m
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m <= MAX_GROUP):
        raise PackedFormatError(f"{name}: pattern {n}:{m} is not a packable N:M (0 < N < M <= {MAX_GROUP})")
    rows, cols = _check_shape(packed.shape, name)
    if cols % m:
        raise PackedFormatError(f"{name}: {cols} columns are not a multiple of M = {m}")
    _expect(packed.values, name, "values", (rows, nm_value_columns(cols, n, m)), VALUE_DTYPES)
    _expect(packed.metadata, name, "meta", (rows, nm_metadata_columns(cols, n, m)), (torch.int16,))
    bits, per_word = index_bits(m), indices_per_word(m)
    per_row = nm_value_columns(cols, n, m)
    used = per_row - (nm_metadata_columns(cols, n, m) - 1) * per_word  # slots used in a row's last word
    if rows and used < per_word:
        last = packed.metadata[:, -1].to(torch.int32) & 0xFFFF
        if bool((last >> (used * bits)).any()):
            row = int((last >> (used * bits)).nonzero()[0])
            raise PackedFormatError(f"{name}.meta: row {row} sets padding bits beyond its {per_row} indices")
    step = _row_step(cols)
    for start in range(0, rows, step):
        idx = nm_indices(packed, start, start + step)
        bad = idx >= m
        if n > 1:
            bad[..., 1:] |= idx[..., 1:] <= idx[..., :-1]
        if bool(bad.any()):
            row, group, _ = (int(i) for i in bad.nonzero()[0])
            raise PackedFormatError(
                f"{name}.meta: row {start + row}, group {group}: kept indices {idx[row, group].tolist()} are "
                f"not strictly increasing indices below M = {m}"
            )


# ------------------------------------------------------------------------------------------ bitmask

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.int32)


def pack_bitmask(dense: torch.Tensor, name: str = "tensor") -> PackedBitmask:
    _check_dense(dense, name)
    rows, cols = dense.shape
    nonzero = dense != 0
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.int32, device=dense.device)
    padded[:, :cols] = nonzero.to(torch.int32)
    bitmask = (padded.view(rows, -1, 8) * _BIT_WEIGHTS.to(dense.device)).sum(-1).to(torch.uint8)
    counts = nonzero.sum(1)
    row_offsets = torch.zeros(rows + 1, dtype=torch.int64, device=dense.device)
    torch.cumsum(counts, 0, out=row_offsets[1:])
    return PackedBitmask(bitmask, dense[nonzero].contiguous(), row_offsets, (rows, cols))


def bitmask_bits(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """The mask as bool [N, cols]."""
    shifts = torch.arange(8, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :cols].bool()


def unpack_bitmask(packed: PackedBitmask) -> torch.Tensor:
    rows, cols = packed.shape
    dense = torch.zeros(rows * cols, dtype=packed.dtype, device=packed.device)
    dense[bitmask_bits(packed.bitmask, cols).reshape(-1)] = packed.values
    return dense.view(rows, cols)


def row_popcounts(bitmask: torch.Tensor) -> torch.Tensor:
    return _POPCOUNT.to(bitmask.device)[bitmask.long()].sum(1)


def validate_bitmask(packed: PackedBitmask, name: str = "tensor") -> None:
    rows, cols = _check_shape(packed.shape, name)
    _expect(packed.bitmask, name, "bitmask", (rows, -(-cols // 8)), (torch.uint8,))
    _expect(packed.row_offsets, name, "row_offsets", (rows + 1,), (torch.int64,))
    if packed.values.dim() != 1 or packed.values.dtype not in VALUE_DTYPES:
        raise PackedFormatError(
            f"{name}.values: expected a 1-D floating point tensor; got {packed.values.dtype} "
            f"{tuple(packed.values.shape)}"
        )
    if cols % 8 and rows:
        padding = packed.bitmask[:, -1].to(torch.int32) >> (cols % 8)
        if bool(padding.any()):
            raise PackedFormatError(
                f"{name}.bitmask: row {int(padding.nonzero()[0])} sets bits beyond column {cols}"
            )
    offsets = packed.row_offsets
    if int(offsets[0]) != 0 or int(offsets[-1]) != packed.values.numel():
        raise PackedFormatError(
            f"{name}.row_offsets: must run from 0 to the {packed.values.numel()} stored values; "
            f"got {int(offsets[0])}..{int(offsets[-1])}"
        )
    wrong = (offsets[1:] - offsets[:-1]) != row_popcounts(packed.bitmask)
    if bool(wrong.any()):
        row = int(wrong.nonzero()[0])
        raise PackedFormatError(
            f"{name}.row_offsets: row {row} has {int(offsets[row + 1] - offsets[row])} values but its "
            f"bitmask sets {int(row_popcounts(packed.bitmask[row : row + 1])[0])} bits"
        )


# ------------------------------------------------------------------------------------------- common


def _check_shape(shape: tuple[int, int], name: str) -> tuple[int, int]:
    if len(shape) != 2 or any(not isinstance(d, int) or d < 0 for d in shape):
        raise PackedFormatError(f"{name}: dense shape must be two non-negative integers; got {shape!r}")
    return shape[0], shape[1]


def _expect(
    t: torch.Tensor, name: str, part: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]
) -> None:
    if tuple(t.shape) != shape:
        raise PackedFormatError(f"{name}.{part}: expected shape {shape}; got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise PackedFormatError(
            f"{name}.{part}: expected dtype {' or '.join(map(str, dtypes))}; got {t.dtype}"
        )
