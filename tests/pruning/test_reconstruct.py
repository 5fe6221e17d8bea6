"""Re-fitting kept weights to a fixed mask: the least-squares optimum, the mask kept, never worse."""

from __future__ import annotations

import itertools

import pytest
import torch

from shears.pattern import Pattern
from shears.pruning.masks import satisfies_pattern
from shears.pruning.solvers import layer_error, reconstruct_masked, sparsegpt_prune
from shears.pruning.stats import HessianAccumulator
from tests.pruning.test_solvers import activations


def _problem(rows: int = 12, cols: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = activations(4 * cols, cols, seed=seed)
    acc = HessianAccumulator(cols, "cpu")
    acc.add(x)
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 1))
    return weight, acc.hessian.clone()


def _objective(dense: torch.Tensor, weight: torch.Tensor, damped: torch.Tensor) -> float:
    delta = (weight - dense).double()
    return float(((delta @ damped.double()) * delta).sum())


def _exact(dense: torch.Tensor, pruned: torch.Tensor, damped: torch.Tensor) -> torch.Tensor:
    """Per row: w_kept = A_kk^-1 (A w0)_k, zeros elsewhere (A = H + d I)."""
    out = torch.zeros_like(dense, dtype=torch.float64)
    a = damped.double()
    for row in range(dense.shape[0]):
        kept = pruned[row] != 0
        rhs = (a @ dense[row].double())[kept]
        out[row, kept] = torch.linalg.solve(a[kept][:, kept], rhs)
    return out


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_converges_to_the_least_squares_optimum(pattern: str) -> None:
    dense, hessian = _problem()
    damping = 0.01 * float(hessian.diagonal().mean())
    damped = hessian + damping * torch.eye(hessian.shape[0])
    pruned = sparsegpt_prune(dense, hessian, 0.5, Pattern.parse(pattern))
    refined = reconstruct_masked(dense, pruned, hessian, damping, iterations=200)
    exact = _exact(dense, pruned, damped)
    assert torch.equal(refined == 0, pruned == 0)
    torch.testing.assert_close(refined.double(), exact, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    ("pattern", "sparsity"), [("unstructured", 0.5), ("unstructured", 0.8), ("2:4", 0.5)]
)
def test_refinement_keeps_the_mask_and_lowers_the_error(pattern: str, sparsity: float) -> None:
    dense, hessian = _problem(rows=32, cols=128, seed=5)
    damping = 0.01 * float(hessian.diagonal().mean())
    damped = hessian + damping * torch.eye(hessian.shape[0])
    plain = sparsegpt_prune(dense, hessian, sparsity, Pattern.parse(pattern))
    refined = sparsegpt_prune(dense, hessian, sparsity, Pattern.parse(pattern), refine_iterations=10)
    assert torch.equal(refined == 0, plain == 0)
    assert _objective(dense, refined, damped) < 0.99 * _objective(dense, plain, damped)
    assert layer_error(dense, refined, hessian) < layer_error(dense, plain, hessian)


def test_zero_iterations_is_the_identity_and_runs_repeat_bit_for_bit() -> None:
    dense, hessian = _problem(seed=9)
    pruned = sparsegpt_prune(dense, hessian, 0.5, Pattern())
    assert reconstruct_masked(dense, pruned, hessian, 0.1, iterations=0) is pruned
    first = reconstruct_masked(dense, pruned, hessian, 0.1, iterations=7)
    second = reconstruct_masked(dense, pruned, hessian, 0.1, iterations=7)
    assert torch.equal(first.view(torch.int32), second.view(torch.int32))


def test_half_precision_weights_come_back_in_their_dtype() -> None:
    dense, hessian = _problem(seed=11)
    dense = dense.to(torch.bfloat16)
    pruned = sparsegpt_prune(dense, hessian, 0.5, Pattern.parse("2:4"), refine_iterations=5)
    assert pruned.dtype == torch.bfloat16
    assert satisfies_pattern(pruned, Pattern.parse("2:4"))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_bf16_steps_keep_the_mask_and_land_near_the_fp32_fit(pattern: str) -> None:
    dense, hessian = _problem(rows=32, cols=128, seed=13)
    damping = 0.01 * float(hessian.diagonal().mean())
    pruned = sparsegpt_prune(dense, hessian, 0.5, Pattern.parse(pattern))
    full = reconstruct_masked(dense, pruned, hessian, damping, iterations=10)
    low = reconstruct_masked(dense, pruned, hessian, damping, iterations=10, matmul_dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and torch.equal(low == 0, pruned == 0)
    before, after, exact = (layer_error(dense, w, hessian) for w in (pruned, low, full))
    assert after < 0.9 * before  # the bf16 steps still fit
    assert after < 1.05 * exact  # and lose little against fp32 steps


def test_rows_that_diverge_keep_the_solvers_weights() -> None:
    """A fit that blows up (here: a Hessian with negative curvature on some rows' kept inputs, as
    rounding can make of a badly scaled one) returns those rows as they came in, finite; rows
    that converge are re-fitted as usual."""
    dense, hessian = _problem(rows=8, cols=32, seed=4)
    pruned = sparsegpt_prune(dense, hessian, 0.5, Pattern())
    broken = hessian.clone()
    broken[:16, :16] = -100.0 * torch.eye(16)  # indefinite on the first 16 inputs
    keep = pruned != 0
    keep[4:, :16] = False  # rows 4.. keep no input of the broken part: their problem is definite
    start = torch.where(keep, pruned, 0.0)
    out = reconstruct_masked(dense, start, broken, 1e-3, 10, drop=~keep)
    assert bool(torch.isfinite(out).all())
    assert torch.equal(out[:4], start[:4])  # diverged: kept as they came
    assert not torch.equal(out[4:], start[4:])  # re-fitted


def test_in_place_fits_the_callers_buffer_to_the_same_values() -> None:
    dense, hessian = _problem(rows=8, cols=32, seed=5)
    start = sparsegpt_prune(dense, hessian, 0.5, Pattern())
    copied = reconstruct_masked(dense, start, hessian, 1e-2, 5)
    assert not torch.equal(copied, start)  # the copy was fitted, the start left alone
    buffer = start.clone()
    fitted = reconstruct_masked(dense, buffer, hessian, 1e-2, 5, in_place=True)
    assert fitted.data_ptr() == buffer.data_ptr() and torch.equal(fitted, copied)


@pytest.mark.parametrize("matmul_dtype", [torch.float32, torch.bfloat16])
def test_a_shrunk_hessian_is_the_fit_under_its_shrunk_matrix(matmul_dtype: torch.dtype) -> None:
    """shrink s fits under (1 - s) H + s diag(H) + d I, on both step dtypes: it converges to that
    matrix's optimum, its objective never rises, and the mask and its zeros are kept exactly."""
    dense, hessian = _problem(rows=16, cols=64, seed=21)
    damping, shrink = 0.01 * float(hessian.diagonal().mean()), 0.4
    shrunk = (1 - shrink) * hessian + torch.diag(shrink * hessian.diagonal() + damping)
    pruned = sparsegpt_prune(dense, hessian, 0.5, Pattern.parse("2:4"))
    trace: list[float] = []
    fitted = reconstruct_masked(
        dense, pruned, hessian, damping, 12, trace=trace, matmul_dtype=matmul_dtype, shrink=shrink
    )
    assert torch.equal(fitted == 0, pruned == 0) and satisfies_pattern(fitted, Pattern.parse("2:4"))
    assert all(b <= a * (1 + 1e-4) for a, b in itertools.pairwise(trace))
    exact = _exact(dense, pruned, shrunk)
    start, end, best = (_objective(dense, w, shrunk) for w in (pruned, fitted, exact))
    assert end < start and end - best < (0.05 if matmul_dtype == torch.bfloat16 else 1e-3) * (start - best)
    if matmul_dtype == torch.float32:  # not H's optimum: the shrunk matrix is another problem
        plain = _exact(dense, pruned, hessian + damping * torch.eye(hessian.shape[0]))
        assert (exact - plain).abs().max() > 1e-2


def test_shrinking_towards_the_diagonal_pulls_the_fit_back_to_the_kept_weights() -> None:
    """Under diag(H) alone the kept weights are already optimal, so the larger the shrink the
    smaller the re-fit's move; 0 is the plain fit, bit for bit."""
    dense, hessian = _problem(rows=16, cols=64, seed=22)
    pruned = sparsegpt_prune(dense, hessian, 0.5, Pattern())
    start = torch.where(pruned != 0, dense, 0.0)  # Wanda-like: the kept weights untouched
    moves = [
        float((reconstruct_masked(dense, start, hessian, 1e-2, 10, shrink=s) - start).norm())
        for s in (0.0, 0.5, 0.9, 0.99)
    ]
    assert moves == sorted(moves, reverse=True) and moves[-1] < 0.1 * moves[0]
    plain = reconstruct_masked(dense, start, hessian, 1e-2, 10)
    assert torch.equal(reconstruct_masked(dense, start, hessian, 1e-2, 10, shrink=0.0), plain)
    with pytest.raises(ValueError, match="shrink"):
        reconstruct_masked(dense, start, hessian, 1e-2, 10, shrink=1.0)


@pytest.mark.parametrize("matmul_dtype", [torch.float32, torch.bfloat16])
def test_rows_fitted_in_chunks_match_one_chunk(monkeypatch, matmul_dtype) -> None:
    """Rows are independent: the chunk size (CHUNK_BYTES) changes the speed, not the result, and a
    last partial chunk is fitted like the others (buffers reused across chunks carry nothing over)."""
    from shears.pruning.solvers import reconstruct

    dense, hessian = _problem(rows=37, cols=64, seed=5)
    pruned = sparsegpt_prune(dense, hessian, 0.5, Pattern())
    damping = 0.1 * float(hessian.diagonal().mean())
    fits = {}
    for chunk_bytes in (16 * 64 * 4, 1 << 30):  # 16-row chunks (37 = 16 + 16 + 5), then all rows at once
        monkeypatch.setattr(reconstruct, "CHUNK_BYTES", chunk_bytes)
        fits[chunk_bytes] = reconstruct_masked(
            dense, pruned, hessian, damping, 4, matmul_dtype=matmul_dtype, shrink=0.5
        )
    chunked, whole = fits.values()
    assert torch.equal(chunked == 0, pruned == 0)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert not torch.equal(whole, pruned)  # the fit moved the kept weights
