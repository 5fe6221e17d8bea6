"""Packed formats: exact round trips (property tests), PyTorch's 2:4 metadata layout, pattern checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shears.kernels.errors import PackedFormatError
from shears.kernels.formats import (
    PackedNM,
    index_bits,
    nm_indices,
    pack_bitmask,
    pack_nm,
    satisfies_nm,
    unpack_bitmask,
    unpack_nm,
)
from shears.kernels.registry import pack, unpack, validate

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
PATTERNS = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 3), (4, 8), (1, 8), (3, 8), (5, 7), (8, 16), (1, 16), (2, 5)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


@st.composite
def nm_weights(draw: st.DrawFn) -> tuple[torch.Tensor, int, int]:
    """A weight obeying n:m with some short groups, all-zero groups and rows, and -0.0 in pruned slots."""
    n, m = draw(st.sampled_from(PATTERNS))
    rows, groups = draw(st.integers(1, 9)), draw(st.integers(1, 12))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, groups, m, generator=g)
    keep_count = torch.randint(0, n + 1, (rows, groups, 1), generator=g)  # 0..n non-zeros per group
    rank = torch.rand(rows, groups, m, generator=g).argsort(-1).argsort(-1)
    keep = rank < keep_count
    negative_zero = torch.full((), -0.0)
    weight = torch.where(keep, values, negative_zero if draw(st.booleans()) else torch.zeros(()))
    if draw(st.booleans()):
        weight[0] = -0.0
    return weight.reshape(rows, groups * m).to(dtype), n, m


@settings(max_examples=150, deadline=None)
@given(nm_weights())
def test_nm_round_trip_is_exact(case: tuple[torch.Tensor, int, int]) -> None:
    weight, n, m = case
    packed = pack_nm(weight, n, m, "w")
    validate(packed, "w")
    rows, cols = weight.shape
    assert packed.values.shape == (rows, cols // m * n) and packed.values.dtype == weight.dtype
    per_word = 16 // index_bits(m)
    assert (
        packed.metadata.shape == (rows, -(-(cols // m * n) // per_word))
        and packed.metadata.dtype == torch.int16
    )
    # -0.0 normalises to +0.0, every other bit survives.
    assert same_bits(unpack_nm(packed), weight + 0.0)
    assert not torch.signbit(packed.values[packed.values == 0]).any()
    again = pack_nm(unpack_nm(packed), n, m)
    assert same_bits(again.values, packed.values) and torch.equal(again.metadata, packed.metadata)
    kept = nm_indices(packed)
    assert bool((kept[..., 1:] > kept[..., :-1]).all()) and bool((kept < m).all())


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 70),
    density=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_bitmask_round_trip_is_exact(
    rows: int, cols: int, density: float, dtype: torch.dtype, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows, cols, generator=g) < density
    weight = torch.where(keep, torch.randn(rows, cols, generator=g), torch.full((), -0.0)).to(dtype)
    packed = pack_bitmask(weight, "w")
    validate(packed, "w")
    assert packed.bitmask.shape == (rows, -(-cols // 8)) and packed.bitmask.dtype == torch.uint8
    assert packed.values.numel() == int((weight != 0).sum()) == int(packed.row_offsets[-1])
    assert packed.row_offsets.dtype == torch.int64 and packed.row_offsets.shape == (rows + 1,)
    assert same_bits(unpack_bitmask(packed), weight + 0.0)
    again = pack_bitmask(unpack_bitmask(packed))
    assert all(
        torch.equal(a, b) for a, b in zip(again.tensors().values(), packed.tensors().values(), strict=True)
    )


def test_bitmask_bit_order_is_least_significant_first() -> None:
    weight = torch.zeros(1, 10)
    weight[0, 0], weight[0, 3], weight[0, 9] = 1.0, 2.0, 3.0
    packed = pack_bitmask(weight)
    assert packed.bitmask.tolist() == [[0b1001, 0b10]]
    assert packed.values.tolist() == [1.0, 2.0, 3.0] and packed.row_offsets.tolist() == [0, 3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_24_metadata_matches_pytorch_unreordered_layout(dtype: torch.dtype) -> None:
    """Values and metadata equal PyTorch's own 2:4 compression before its CUTLASS reordering."""
    from torch.sparse._semi_structured_conversions import (
        _calculate_meta_reordering_scatter_offsets,
        sparse_semi_structured_from_dense_cutlass,
    )

    g = torch.Generator().manual_seed(1)
    rows, cols = 64, 128
    weight = torch.randn(rows, cols, generator=g)
    # Every kind of group: 2, 1 or 0 non-zeros at every position.
    keep = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1).argsort(-1) < torch.randint(
        0, 3, (rows, cols // 4, 1), generator=g
    )
    weight = torch.where(keep.view(rows, cols), weight, torch.zeros(())).to(dtype)
    sparse, meta_reordered = sparse_semi_structured_from_dense_cutlass(weight)
    scatter = _calculate_meta_reordering_scatter_offsets(rows, cols // 16, torch.int16, "cpu")
    meta = meta_reordered.view(-1)[scatter].view(rows, cols // 16)
    packed = pack_nm(weight, 2, 4)
    assert packed.metadata.shape == (rows, cols // 16)
    assert torch.equal(packed.metadata, meta)
    assert torch.equal(packed.values, sparse)


def test_24_nibble_layout_by_hand() -> None:
    # group 0 keeps columns 1, 3 (nibble 0b1101), group 1 keeps 0, 2 (0b1000), groups 2-3 all zero.
    weight = torch.zeros(1, 16)
    weight[0, 1], weight[0, 3], weight[0, 4], weight[0, 6] = 1.0, 2.0, 3.0, 4.0
    packed = pack_nm(weight, 2, 4)
    word = int(packed.metadata[0, 0]) & 0xFFFF
    assert word & 0xF == 0b1101 and (word >> 4) & 0xF == 0b1000
    assert packed.values[0, :4].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_pattern_violation_names_tensor_row_and_columns() -> None:
    weight = torch.ones(3, 8)
    weight[:, 1::2] = 0
    weight[2, 4:8] = 1.0  # three non-zeros in row 2, columns 4..7
    with pytest.raises(PackedFormatError, match=r"layer\.w: row 2, columns 4\.\.7 hold 4 non-zeros; 2:4"):
        pack_nm(weight, 2, 4, "layer.w")
    assert not satisfies_nm(weight, 2, 4) and satisfies_nm(weight, 4, 8) is False
    assert satisfies_nm(weight[:2], 2, 4)


@pytest.mark.parametrize(
    ("shape", "n", "m", "message"),
    [((4, 6), 2, 4, "not a multiple of M = 4"), ((4, 32), 2, 32, "M <= 16"), ((4,), 2, 4, "only 2-D")],
)
def test_unpackable_shapes_are_refused(shape: tuple[int, ...], n: int, m: int, message: str) -> None:
    with pytest.raises(PackedFormatError, match=message):
        pack_nm(torch.zeros(shape), n, m)


def test_pack_picks_layout_from_pattern() -> None:
    weight = torch.zeros(4, 32)
    assert isinstance(pack(weight, 2, 4), PackedNM)
    assert pack(weight, 0, 0).layout == "bitmask"
    assert pack(weight, 16, 32).layout == "bitmask"  # groups wider than 16 have no N:M metadata
    assert same_bits(unpack(pack(weight, 16, 32)), weight)
    with pytest.raises(PackedFormatError, match="floating point"):
        pack(torch.zeros(4, 8, dtype=torch.int32), 2, 4)
