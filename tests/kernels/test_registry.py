"""FORMATS lists every packed layout; each record is complete, and a layout it lacks fails loudly."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shears.kernels.configs import KernelConfig, candidate_configs
from shears.kernels.dispatch import Dispatcher, PackedOperand
from shears.kernels.errors import PackedFormatError
from shears.kernels.registry import FORMATS, format_for, format_of, pack, reference_matmul, unpack, validate
from shears.kernels.safetensors_io import save_deterministic
from shears.kernels.sparse_file import read_packed
from shears.kernels.sparse_linear import SparseLinear

# One pattern each record stores, with a weight that follows it.
SAMPLES = {"nm": (2, 4), "bitmask": (0, 0)}


def sample(n: int, m: int, rows: int = 8, cols: int = 64) -> torch.Tensor:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    if m:
        keep = weight.abs().view(rows, cols // m, m).argsort(-1, descending=True).argsort(-1) < n
        return weight * keep.view(rows, cols)
    return weight * (weight.abs() > 0.7)


def test_every_layout_has_a_sample() -> None:
    assert set(SAMPLES) == set(FORMATS)


@pytest.mark.parametrize("layout", list(FORMATS))
def test_record_is_complete(layout: str) -> None:
    record = FORMATS[layout]
    n, m = SAMPLES[layout]
    assert format_for(n, m) is record and record.stores(n, m)
    dense = sample(n, m)
    packed = record.pack(dense, n, m, "w")
    assert packed.layout == layout and isinstance(packed, record.packed) and packed.nm == (n, m)
    assert tuple(packed.tensors()) == record.parts
    again = record.assemble(dict(packed.tensors()), n, m, packed.shape)
    record.validate(again, "w")
    assert torch.equal(record.unpack(again), dense)
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(
        record.reference(x, packed.with_values(packed.values.double())), x @ dense.double().T
    )
    module = record.kernel_module()
    assert callable(module.supports) and callable(module.matmul)
    assert candidate_configs(4096, 4096, 16, record.launches, 132, (n, m) if m else (2, 4))


@dataclass
class Csr:
    """A layout no record lists."""

    values: torch.Tensor
    shape: tuple[int, int] = (2, 2)
    layout = "csr"
    nm = (0, 0)
    detail = "csr"

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device


def test_unknown_layout_fails_loudly(tmp_path: Path) -> None:
    stranger = Csr(torch.ones(2))
    for call in (
        lambda: format_of("csr"),
        lambda: unpack(stranger),  # type: ignore[arg-type]
        lambda: validate(stranger),  # type: ignore[arg-type]
        lambda: reference_matmul(torch.ones(1, 2), stranger),  # type: ignore[arg-type]
        lambda: PackedOperand(stranger),  # type: ignore[arg-type]
        lambda: SparseLinear(stranger),  # type: ignore[arg-type]
    ):
        with pytest.raises(PackedFormatError, match="unknown packed layout 'csr'"):
            call()
    # A sparse file naming a layout this Shears does not know is refused, not read as a bitmask.
    tensors = {"w.weight.values": torch.ones(2), "w.weight.indices": torch.zeros(2, dtype=torch.int64)}
    entry = {"layout": "csr", "n": 0, "m": 0, "shape": [2, 2], "dtype": "float32"}
    metadata = {"format": "shears.sparse", "format_version": "1", "tensors": json.dumps({"w.weight": entry})}
    save_deterministic(tensors, tmp_path / "sparse.safetensors", metadata)
    with pytest.raises(PackedFormatError, match="layout must be one of"):
        read_packed(tmp_path)


def test_dispatcher_runs_each_layout_through_its_record() -> None:
    dispatcher = Dispatcher()
    for layout, (n, m) in SAMPLES.items():
        dense = sample(n, m, cols=256)
        op = PackedOperand(pack(dense, n, m))
        assert op.format is FORMATS[layout]
        x = torch.randn(2, 256, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(dispatcher.matmul(x, op), F.linear(x, dense), rtol=1e-4, atol=1e-4)
        config = KernelConfig(16, 16, FORMATS[layout].launches.interpreter_block_k, split_k=2)
        torch.testing.assert_close(
            FORMATS[layout].kernel_module().matmul(x, op.packed, config, op.kernel_state()),
            F.linear(x, dense),
            rtol=1e-4,
            atol=1e-4,
        )
