"""Triton kernels vs the torch references, on the CPU under TRITON_INTERPRET=1 (see conftest.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shears.kernels import triton_common
from shears.kernels.configs import KernelConfig, candidate_configs, interpreting, m_bucket, split_tiles
from shears.kernels.dispatch import Dispatcher, PackedOperand, triton_status
from shears.kernels.formats import pack_bitmask, pack_nm
from shears.kernels.reference import bitmask_matmul_reference, nm_matmul_reference
from shears.kernels.registry import FORMATS, reference_matmul, unpack
from shears.kernels.selfcheck import CASES, check_kernel, run_checks, sparse_weight, tolerance
from shears.kernels.triton_bitmask import bitmask_matmul, chunk_offsets
from shears.kernels.triton_nm import nm_matmul


def test_interpreter_is_on() -> None:
    assert triton_status() is None, triton_status()
    assert interpreting(), "tests/kernels/conftest.py must set TRITON_INTERPRET=1 before triton kernels load"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_selfcheck_case(case) -> None:
    _, layout, n, m_or_density, rows, cols, m_rows, dtype, config = case
    g = torch.Generator().manual_seed(7)
    packed = sparse_weight(layout, n, m_or_density, rows, cols, dtype, g)
    x = torch.randn(m_rows, cols, generator=g).to(dtype)
    outcome = check_kernel(packed, x, config)
    assert outcome["ok"], outcome


@pytest.mark.parametrize(
    ("rows", "cols", "m_rows", "n", "m", "config"),
    [
        (1, 4, 1, 2, 4, KernelConfig(1, 16, 64, 1)),  # one row, one group, one partial tile
        (7, 68, 3, 2, 4, KernelConfig(16, 16, 64, 4)),  # split 4 over 2 tiles launches 2 splits
        (18, 256, 40, 2, 4, KernelConfig(32, 16, 64, 3)),  # M spans two blocks of 32
        (9, 64, 1, 1, 2, KernelConfig(1, 8, 64, 2)),
        (5, 48, 2, 8, 16, KernelConfig(16, 16, 64, 1)),
        (12, 96, 4, 1, 16, KernelConfig(16, 16, 64, 2)),
    ],
)
def test_nm_odd_shapes_fp32(rows: int, cols: int, m_rows: int, n: int, m: int, config: KernelConfig) -> None:
    g = torch.Generator().manual_seed(rows * 31 + cols)
    packed = sparse_weight("nm", n, m, rows, cols, torch.float32, g)
    x = torch.randn(m_rows, cols, generator=g)
    got = nm_matmul(x, packed, config)
    torch.testing.assert_close(got, nm_matmul_reference(x, packed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("density", [0.0, 0.5, 0.1])
def test_bitmask_dtypes_and_densities(dtype: torch.dtype, density: float) -> None:
    g = torch.Generator().manual_seed(3)
    packed = sparse_weight("bitmask", 0, density, 19, 200, dtype, g)
    x = torch.randn(2, 200, generator=g).to(dtype)
    for config in (KernelConfig(1, 8, 128, 2), KernelConfig(16, 16, 128, 1)):
        got = bitmask_matmul(x, packed, config)
        want = bitmask_matmul_reference(x.float(), packed).to(dtype)
        scale = float(want.float().abs().max()) or 1.0
        assert got.dtype == dtype
        assert float((got.float() - want.float()).abs().max()) <= tolerance(dtype) * scale


def test_all_zero_weight_gives_zeros() -> None:
    packed = pack_nm(torch.zeros(20, 64, dtype=torch.bfloat16), 2, 4)
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert torch.equal(
        nm_matmul(x, packed, KernelConfig(16, 16, 64, 2)), torch.zeros(3, 20, dtype=torch.bfloat16)
    )
    empty = pack_bitmask(torch.zeros(20, 128))
    x = torch.randn(3, 128)
    assert torch.equal(bitmask_matmul(x, empty, KernelConfig(1, 16, 128, 2)), torch.zeros(3, 20))


def test_split_k_is_deterministic_and_leaves_counters_zero() -> None:
    g = torch.Generator().manual_seed(5)
    packed = sparse_weight("nm", 2, 4, 32, 512, torch.float32, g)
    x = torch.randn(1, 512, generator=g)
    config = KernelConfig(1, 16, 64, 8)
    assert split_tiles(512, 64, 8) == (8, 1)
    first, second = nm_matmul(x, packed, config), nm_matmul(x, packed, config)
    assert torch.equal(first, second)
    assert int(triton_common._COUNTERS[torch.device("cpu")].abs().sum()) == 0


def test_chunk_offsets_point_at_each_chunks_first_value() -> None:
    weight = torch.zeros(2, 300)
    weight[0, [0, 5, 130, 299]] = 1.0
    weight[1, [128, 256]] = 1.0
    offsets = chunk_offsets(pack_bitmask(weight))
    assert offsets.tolist() == [[0, 2, 3], [4, 4, 5]] and offsets.dtype == torch.int32


def test_kernels_reject_mismatched_input() -> None:
    packed = pack_nm(torch.zeros(4, 64), 2, 4)
    with pytest.raises(ValueError, match="no Triton kernel"):
        nm_matmul(torch.zeros(1, 64, dtype=torch.float16), packed, KernelConfig(1, 16, 64))
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        nm_matmul(torch.zeros(1, 32), packed, KernelConfig(1, 16, 64))
    with pytest.raises(ValueError, match="multiple of 128"):
        bitmask_matmul(torch.zeros(1, 64), pack_bitmask(torch.zeros(4, 64)), KernelConfig(1, 16, 64))


def test_references_agree_with_dense_matmul() -> None:
    g = torch.Generator().manual_seed(9)
    for packed in (
        sparse_weight("nm", 3, 8, 6, 40, torch.float64, g),
        sparse_weight("bitmask", 0, 0.3, 6, 40, torch.float64, g),
    ):
        x = torch.randn(5, 40, generator=g, dtype=torch.float64)
        torch.testing.assert_close(reference_matmul(x, packed), F.linear(x, unpack(packed)))


def test_dispatcher_on_cpu() -> None:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 64, generator=g)
    supported = PackedOperand(sparse_weight("nm", 2, 4, 16, 64, torch.float32, g))
    dispatcher = Dispatcher()
    y = dispatcher.matmul(x, supported)
    assert dispatcher.choose(x, supported).backend == "triton"  # the interpreter runs the kernel on the CPU
    torch.testing.assert_close(y, reference_matmul(x, supported.packed), rtol=1e-5, atol=1e-5)
    odd = PackedOperand(sparse_weight("nm", 3, 8, 16, 64, torch.float32, g))  # no kernel for 3:8
    assert dispatcher.choose(x, odd).backend == "dense"
    lean = Dispatcher(allow_dense=False)
    assert lean.choose(x, odd).backend == "reference"
    torch.testing.assert_close(lean.matmul(x, odd), dispatcher.matmul(x, odd), rtol=1e-5, atol=1e-5)
    assert len(dispatcher.report()) == 2


def test_candidate_configs_fit_their_shapes() -> None:
    assert [m_bucket(m) for m in (1, 2, 5, 16, 17, 300, 10_000)] == [1, 4, 16, 16, 64, 1024, 4096]
    for layout, record in FORMATS.items():
        for m in (1, 4, 16, 64, 512, 2048):
            for pattern in [(2, 4), (1, 4), (4, 8), (1, 16)] if layout == "nm" else [(0, 0)]:
                configs = candidate_configs(4096, 14336, m, record.launches, 132, pattern)
                assert configs and len(set(configs)) == len(configs)
                assert all(c.gemv == (c.block_m == 1) for c in configs)
                assert all(m == 1 or not c.gemv for c in configs)  # the GEMV kernel re-reads W per row
                assert all(record.launches.fits(c, pattern) for c in configs)
                assert all(
                    c.split_k == 1 or c.split_k * m <= 14336 // 64 for c in configs
                )  # partial sums stay small
    nm, bitmask = FORMATS["nm"].launches, FORMATS["bitmask"].launches
    assert not nm.fits(KernelConfig(16, 16, 32, 1), (1, 16)) and nm.fits(KernelConfig(16, 16, 64), (1, 16))
    assert not bitmask.fits(KernelConfig(16, 16, 64), (0, 0))


def test_run_checks_all_pass() -> None:
    results = run_checks("cpu")
    assert len(results) == len(CASES) and all(r["ok"] for r in results), results


def test_dispatcher_refuses_a_backend_that_disagrees_with_the_reference() -> None:
    from shears.kernels.dispatch import Choice

    g = torch.Generator().manual_seed(12)
    op = PackedOperand(sparse_weight("nm", 2, 4, 16, 64, torch.bfloat16, g))
    x = torch.randn(2, 64, generator=g).to(torch.bfloat16)
    dispatcher, errors = Dispatcher(), {}
    assert dispatcher._agrees(Choice("triton", KernelConfig(16, 16, 64, 2)), x, op, errors) and not errors
    op._derived["dense"] = torch.zeros(16, 64, dtype=torch.bfloat16)  # a corrupted derived copy
    assert not dispatcher._agrees(Choice("dense"), x, op, errors)
    assert errors["dense"].startswith("relative error 1 against the reference")
