"""Malformed packed tensors and files are rejected with a PackedFormatError that names what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shears.kernels.errors import PackedFormatError
from shears.kernels.formats import PackedBitmask, PackedNM, pack_bitmask, pack_nm
from shears.kernels.registry import validate
from shears.kernels.sparse_file import PACKED_DIR, SPARSE_FILE, pack_folder, read_packed


def nm_weight() -> torch.Tensor:
    weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    weight[:, 1::2] = 0.0
    return weight


def test_is_a_value_error_and_an_invalid_request() -> None:
    from shears.errors import InvalidRequest

    assert issubclass(PackedFormatError, ValueError) and issubclass(PackedFormatError, InvalidRequest)
    assert PackedFormatError.code == "invalid_request"


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            lambda p: PackedNM(p.values[:, :-1], p.metadata, 2, 4, p.shape),
            r"w\.values: expected shape \(4, 16\)",
        ),
        (lambda p: PackedNM(p.values, p.metadata.to(torch.int32), 2, 4, p.shape), r"w\.meta: expected dtype"),
        (lambda p: PackedNM(p.values, p.metadata[:, :1], 2, 4, p.shape), r"w\.meta: expected shape"),
        (
            lambda p: PackedNM(p.values.to(torch.int16), p.metadata, 2, 4, p.shape),
            r"w\.values: expected dtype",
        ),
        (lambda p: PackedNM(p.values, p.metadata, 2, 4, (4, 30)), "not a multiple of M"),
        (lambda p: PackedNM(p.values, p.metadata, 4, 4, p.shape), "not a packable N:M"),
    ],
)
def test_nm_shapes_and_dtypes(corrupt, message: str) -> None:
    with pytest.raises(PackedFormatError, match=message):
        validate(corrupt(pack_nm(nm_weight(), 2, 4)), "w")


def test_nm_repeated_kept_index() -> None:
    packed = pack_nm(nm_weight(), 2, 4)
    meta = packed.metadata.clone()
    meta[2, 1] = 0  # every group of word 1 in row 2 now keeps index 0 twice
    with pytest.raises(PackedFormatError, match=r"w\.meta: row 2, group 4: kept indices \[0, 0\]"):
        validate(PackedNM(packed.values, meta, 2, 4, packed.shape), "w")


def test_nm_index_out_of_range() -> None:
    weight = torch.zeros(2, 12)
    packed = pack_nm(weight, 1, 3)  # 2-bit indices, 3 is out of range for M = 3
    meta = packed.metadata.clone()
    meta[1, 0] = 0b11
    with pytest.raises(PackedFormatError, match=r"row 1, group 0: kept indices \[3\].*below M = 3"):
        validate(PackedNM(packed.values, meta, 1, 3, packed.shape), "w")


def test_nm_padding_bits() -> None:
    packed = pack_nm(torch.zeros(2, 8), 2, 4)  # 4 indices of 2 bits: the upper half of each word is padding
    meta = packed.metadata.clone()
    meta[0, 0] = meta[0, 0] | (1 << 12)
    with pytest.raises(PackedFormatError, match=r"w\.meta: row 0 sets padding bits"):
        validate(PackedNM(packed.values, meta, 2, 4, packed.shape), "w")


def test_bitmask_inconsistencies() -> None:
    weight = torch.randn(3, 13, generator=torch.Generator().manual_seed(2))
    weight[weight.abs() < 0.7] = 0
    packed = pack_bitmask(weight)
    offsets = packed.row_offsets.clone()
    offsets[1] += 1
    with pytest.raises(PackedFormatError, match=r"w\.row_offsets: row 0 has"):
        validate(PackedBitmask(packed.bitmask, packed.values, offsets, packed.shape), "w")
    bitmask = packed.bitmask.clone()
    bitmask[2, 1] |= 0x80  # column 15 of a 13-column row
    with pytest.raises(PackedFormatError, match=r"w\.bitmask: row 2 sets bits beyond column 13"):
        validate(PackedBitmask(bitmask, packed.values, packed.row_offsets, packed.shape), "w")
    with pytest.raises(PackedFormatError, match=r"w\.row_offsets: must run from 0 to the"):
        validate(PackedBitmask(packed.bitmask, packed.values[:-1], packed.row_offsets, packed.shape), "w")
    with pytest.raises(PackedFormatError, match=r"w\.bitmask: expected shape \(3, 2\)"):
        validate(PackedBitmask(packed.bitmask[:, :1], packed.values, packed.row_offsets, packed.shape), "w")


@pytest.fixture
def packed_folder(tmp_path: Path) -> Path:
    save_file(
        {"layers.0.w.weight": nm_weight(), "layers.0.v.weight": nm_weight()},
        str(tmp_path / "model.safetensors"),
    )
    pack_folder(tmp_path, (2, 4), ["layers.0.w.weight", "layers.0.v.weight"])
    return tmp_path


def rewrite(folder: Path, edit) -> None:
    """Rewrite packed/sparse.safetensors after `edit(tensors, metadata)`."""
    path = folder / PACKED_DIR / SPARSE_FILE
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    edit(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def test_round_trip_reads(packed_folder: Path) -> None:
    assert sorted(read_packed(packed_folder)) == ["layers.0.v.weight", "layers.0.w.weight"]


def test_unknown_format_version(packed_folder: Path) -> None:
    rewrite(packed_folder, lambda t, m: m.update(format_version="7"))
    with pytest.raises(
        PackedFormatError, match=r"sparse format version '7' is unknown; this Shears reads version 1"
    ):
        read_packed(packed_folder)


def test_not_a_shears_file(packed_folder: Path) -> None:
    rewrite(packed_folder, lambda t, m: m.update(format="pt"))
    with pytest.raises(PackedFormatError, match="not a Shears sparse file"):
        read_packed(packed_folder)


def test_missing_part(packed_folder: Path) -> None:
    rewrite(packed_folder, lambda t, m: t.pop("layers.0.w.weight.meta"))
    with pytest.raises(
        PackedFormatError, match=r"layers\.0\.w\.weight: sparse\.safetensors lacks its 'meta' tensor"
    ):
        read_packed(packed_folder)


def test_undeclared_tensor(packed_folder: Path) -> None:
    rewrite(packed_folder, lambda t, m: t.update({"stray": torch.zeros(2)}))
    with pytest.raises(PackedFormatError, match=r"\['stray'\] belong to no declared packed weight"):
        read_packed(packed_folder)


def test_out_of_range_metadata_in_file(packed_folder: Path) -> None:
    def edit(tensors: dict, metadata: dict) -> None:
        tensors["layers.0.v.weight.meta"][3, 0] = 0  # repeated index in row 3

    rewrite(packed_folder, edit)
    with pytest.raises(PackedFormatError, match=r"layers\.0\.v\.weight\.meta: row 3, group 0"):
        read_packed(packed_folder)


def test_wrong_declared_shape(packed_folder: Path) -> None:
    def edit(tensors: dict, metadata: dict) -> None:
        entries = json.loads(metadata["tensors"])
        entries["layers.0.w.weight"]["shape"] = [4, 64]
        metadata["tensors"] = json.dumps(entries)

    rewrite(packed_folder, edit)
    with pytest.raises(PackedFormatError, match=r"layers\.0\.w\.weight\.values: expected shape \(4, 32\)"):
        read_packed(packed_folder)


def test_truncated_file(packed_folder: Path) -> None:
    path = packed_folder / PACKED_DIR / SPARSE_FILE
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(PackedFormatError, match="not a readable safetensors file"):
        read_packed(packed_folder)


def test_index_naming_a_missing_shard(packed_folder: Path) -> None:
    index = {"metadata": {}, "weight_map": {"layers.0.w.weight.values": "sparse-00001-of-00002.safetensors"}}
    (packed_folder / PACKED_DIR / "sparse.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PackedFormatError, match=r"listed in sparse\.safetensors\.index\.json but missing"):
        read_packed(packed_folder)


def test_pack_folder_refuses_missing_or_unfit_tensors(tmp_path: Path) -> None:
    save_file({"layers.0.w.weight": torch.ones(4, 8)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(PackedFormatError, match=r"layers\.1\.w\.weight: not found"):
        pack_folder(tmp_path, (2, 4), ["layers.1.w.weight"])
    with pytest.raises(
        PackedFormatError, match=r"layers\.0\.w\.weight: row 0, columns 0\.\.3 hold 4 non-zeros"
    ):
        pack_folder(tmp_path, (2, 4), ["layers.0.w.weight"])
    assert not (tmp_path / SPARSE_FILE).exists() and not (tmp_path / PACKED_DIR).exists()
