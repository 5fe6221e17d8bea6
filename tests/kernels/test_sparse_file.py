"""pack_folder / unpack_folder on real Hugging Face folders: exact, deterministic, sharded, small."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shears.kernels.formats import PackedBitmask, PackedNM
from shears.kernels.safetensors_io import save_deterministic
from shears.kernels.sparse_file import (
    PACKED_DIR,
    SPARSE_FILE,
    SPARSE_INDEX,
    pack_folder,
    read_entries,
    read_packed,
    sparse_files,
    unpack_folder,
)


def tensor_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every dense tensor's bytes (with dtype and shape) in the folder's model files."""
    hashes = {}
    for path in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                t = handle.get_tensor(key)
                digest = hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                hashes[key] = f"{t.dtype}{tuple(t.shape)}{digest.hexdigest()}"
    return hashes


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fixture", ["pruned_24", "pruned_unstructured"])
def test_pack_unpack_round_trip_is_bit_exact(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source, names = request.getfixturevalue(fixture)
    folder = tmp_path / "packed"
    shutil.copytree(source, folder)
    pattern = (2, 4) if fixture == "pruned_24" else (0, 0)
    assert pack_folder(folder, pattern, names) == [f"{PACKED_DIR}/{SPARSE_FILE}"]
    packed = read_packed(folder)
    assert sorted(packed) == sorted(names) and len(names) == 14  # 7 linears x 2 blocks
    kind = PackedNM if pattern == (2, 4) else PackedBitmask
    assert all(isinstance(p, kind) for p in packed.values())
    report = unpack_folder(folder, tmp_path / "restored")
    assert report["differs_from_dense"] == [] and sorted(report["restored"]) == sorted(names)
    assert tensor_hashes(tmp_path / "restored") == tensor_hashes(source)
    assert sha(tmp_path / "restored" / "model.safetensors") == sha(source / "model.safetensors")  # whole file
    restored_files = {p.name for p in (tmp_path / "restored").iterdir()}
    assert "config.json" in restored_files and not restored_files & {SPARSE_FILE, PACKED_DIR}


def test_packing_is_deterministic(pruned_24: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, names = pruned_24
    digests = []
    for copy in ("a", "b"):
        folder = tmp_path / copy
        shutil.copytree(source, folder)
        pack_folder(folder, (2, 4), list(reversed(names)) if copy == "b" else names)
        digests.append(sha(folder / PACKED_DIR / SPARSE_FILE))
    assert digests[0] == digests[1]


def test_sharded_pack_replaces_single_file(pruned_24: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, names = pruned_24
    folder = tmp_path / "sharded"
    shutil.copytree(source, folder)
    pack_folder(folder, (2, 4), names)
    single = read_packed(folder)
    files = pack_folder(folder, (2, 4), names, max_shard_bytes=20_000)
    place = folder / PACKED_DIR
    shards = [f.removeprefix(f"{PACKED_DIR}/") for f in files if not f.endswith(SPARSE_INDEX)]
    assert len(shards) > 2 and files[-1] == f"{PACKED_DIR}/{SPARSE_INDEX}"
    assert shards[0] == f"sparse-00001-of-{len(shards):05d}.safetensors"
    assert not (place / SPARSE_FILE).exists()  # the stale single file is gone
    assert [p.name for p in sparse_files(folder)] == shards
    index = json.loads((place / SPARSE_INDEX).read_text())
    assert index["metadata"]["format"] == "shears.sparse" and len(index["weight_map"]) == 2 * len(names)
    sharded = read_packed(folder)
    assert sorted(sharded) == sorted(single)
    for name in single:
        assert all(
            torch.equal(a, b)
            for a, b in zip(single[name].tensors().values(), sharded[name].tensors().values(), strict=True)
        )
    assert not [p for p in place.iterdir() if p.name.endswith(".tmp")]
    # and back to one file: the shards and their index are removed
    assert pack_folder(folder, (2, 4), names) == [f"{PACKED_DIR}/{SPARSE_FILE}"]
    assert sorted(p.name for p in place.iterdir()) == [SPARSE_FILE]


def test_bf16_24_packed_bytes_at_most_057_of_dense(
    pruned_24_bf16: tuple[Path, list[str]], tmp_path: Path
) -> None:
    source, names = pruned_24_bf16
    folder = tmp_path / "bf16"
    shutil.copytree(source, folder)
    pack_folder(folder, (2, 4), names)
    entries = read_entries(folder)
    dense = packed = 0
    for entry in entries.values():
        assert entry["dtype"] == "bfloat16" and entry["layout"] == "nm" and (entry["n"], entry["m"]) == (2, 4)
        rows, cols = entry["shape"]
        dense += rows * cols * 2
        packed += entry["nbytes"]
        assert entry["nbytes"] == rows * cols // 2 * 2 + rows * cols // 16 * 2  # values + int16 metadata
    assert packed / dense == pytest.approx(0.5625)
    raw = (folder / PACKED_DIR / SPARSE_FILE).read_bytes()
    header = 8 + int.from_bytes(
        raw[:8], "little"
    )  # names and metadata: a fixed cost, large only next to tiny layers
    assert len(raw) - header == packed <= 0.57 * dense


def test_unpack_reports_dense_copies_that_differ(tmp_path: Path) -> None:
    """A -0.0 in a pruned slot packs as +0.0: unpack restores +0.0 and names the tensor."""
    weight = torch.tensor([[1.0, -0.0, 2.0, 0.0], [0.0, 3.0, -0.0, 4.0]])
    save_deterministic({"layers.0.w.weight": weight, "other": torch.ones(2)}, tmp_path / "model.safetensors")
    pack_folder(tmp_path, (2, 4), ["layers.0.w.weight"])
    report = unpack_folder(tmp_path, tmp_path / "out")
    assert report["differs_from_dense"] == ["layers.0.w.weight"]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as handle:
        restored = handle.get_tensor("layers.0.w.weight")
        assert torch.equal(handle.get_tensor("other"), torch.ones(2))
    assert torch.equal(restored, weight) and not torch.signbit(restored[restored == 0]).any()


def test_unpack_restores_tensors_missing_from_dense_files(tmp_path: Path) -> None:
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    save_deterministic({"layers.0.w.weight": weight, "other": torch.ones(2)}, tmp_path / "model.safetensors")
    pack_folder(tmp_path, (2, 4), ["layers.0.w.weight"])
    save_deterministic({"other": torch.ones(2)}, tmp_path / "model.safetensors")  # the dense copy dropped
    report = unpack_folder(tmp_path, tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "layers.0.w.weight": "model-restored.safetensors",
        "other": "model.safetensors",
    }
    assert "model-restored.safetensors" in report["files"]
    with safe_open(str(tmp_path / "out" / "model-restored.safetensors"), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("layers.0.w.weight"), weight)


def _to_old_layout(folder: Path) -> list[str]:
    """Move packed/ files to the top of the folder, as Shears wrote them before packed/ existed."""
    moved = []
    for path in sorted((folder / PACKED_DIR).iterdir()):
        path.rename(folder / path.name)
        moved.append(path.name)
    (folder / PACKED_DIR).rmdir()
    return moved


def test_packed_files_stay_out_of_the_weight_glob(pruned_24: tuple[Path, list[str]], tmp_path: Path) -> None:
    """A loader taking every top-level *.safetensors (vLLM without an index) finds the model only."""
    source, names = pruned_24
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    before = sorted(p.name for p in folder.glob("*.safetensors"))
    pack_folder(folder, (2, 4), names, max_shard_bytes=20_000)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == before == ["model.safetensors"]
    assert all(p.parent.name == PACKED_DIR for p in sparse_files(folder))


def test_old_layout_is_read_unpacked_and_moved_by_a_new_pack(
    pruned_24: tuple[Path, list[str]], tmp_path: Path
) -> None:
    source, names = pruned_24
    folder = tmp_path / "old"
    shutil.copytree(source, folder)
    pack_folder(folder, (2, 4), names, max_shard_bytes=20_000)
    current = read_packed(folder)
    moved = _to_old_layout(folder)
    assert SPARSE_INDEX in moved and len(moved) > 2
    assert [p.parent for p in sparse_files(folder)] == [folder] * (len(moved) - 1)
    old = read_packed(folder)
    assert sorted(old) == sorted(current) and all(
        torch.equal(old[n].values, current[n].values) for n in current
    )
    report = unpack_folder(folder, tmp_path / "restored")
    assert not {p.name for p in (tmp_path / "restored").iterdir()} & set(moved)
    assert (
        tensor_hashes(tmp_path / "restored") == tensor_hashes(source) and report["differs_from_dense"] == []
    )
    # packing again lays the folder out anew: nothing packed is left at the top
    assert pack_folder(folder, (2, 4), names) == [f"{PACKED_DIR}/{SPARSE_FILE}"]
    assert not [p.name for p in folder.iterdir() if p.name.startswith("sparse")]
    assert sorted(read_packed(folder)) == sorted(names)
