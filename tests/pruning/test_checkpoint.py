"""The checkpoint reader (plain reads, no memory map) against files written by safetensors itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shears.errors import ModelUnavailable
from shears.pruning.checkpoint import Checkpoint


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 7, generator=g),
        "b.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(2, 9, generator=g).to(torch.float16),
        "ids": torch.arange(11, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def test_reads_every_dtype_bit_for_bit(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    checkpoint = Checkpoint(tmp_path)
    assert set(checkpoint.names) == set(tensors)
    loaded = checkpoint.load(list(tensors))
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name].view(-1).view(torch.uint8), tensor.view(-1).view(torch.uint8)), name
        assert checkpoint.shapes[name] == tuple(tensor.shape) and checkpoint.dtypes[name] == tensor.dtype


def test_sharded_with_index_keeps_request_order(tmp_path: Path) -> None:
    tensors = _tensors()
    first = {k: tensors[k] for k in ("a.weight", "ids")}
    second = {k: v for k, v in tensors.items() if k not in first}
    save_file(first, tmp_path / "model-00001-of-00002.safetensors")
    save_file(second, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in second}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    checkpoint = Checkpoint(tmp_path)
    order = ["c.weight", "a.weight", "flags", "ids"]
    loaded = checkpoint.load(order)
    assert list(loaded) == order
    assert all(torch.equal(loaded[n], tensors[n]) for n in order)
    assert checkpoint.file_of["ids"] == "model-00001-of-00002.safetensors"


def test_missing_tensor_is_a_clear_error(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ModelUnavailable, match="'b' is missing"):
        Checkpoint(tmp_path).load(["b"])


def test_index_naming_an_absent_tensor_is_refused(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    weight_map = {"a": "model.safetensors", "ghost": "model.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelUnavailable, match="ghost"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[: len(raw) - 8], "do not fit"),  # truncated data
        (lambda raw: (10**9).to_bytes(8, "little") + raw[8:], "bad header length"),
        (lambda raw: raw[:8] + b"x" + raw[9:], "not JSON"),
        (lambda raw: b"\x01\x00", "bad header length"),
    ],
)
def test_corrupt_files_are_rejected(tmp_path: Path, damage: object, message: str) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4, 4)}, path)
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(ModelUnavailable, match=message):
        Checkpoint(tmp_path)
