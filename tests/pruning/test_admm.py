"""The ADMM solver on random problems: exact patterns, lower error than SparseGPT, a converging fit."""

from __future__ import annotations

import itertools

import pytest
import torch

from shears.pattern import Pattern
from shears.pruning.masks import satisfies_pattern
from shears.pruning.solvers import layer_error, sparsegpt_prune
from shears.pruning.solvers.admm import admm_prune, prepare_admm, project, sparsity_ramp
from tests.pruning.test_solvers import activations, bits, expected_zeros, stats

ROWS, COLS = 48, 128
CASES = [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5), ("4:8", 0.5), ("1:4", 0.75)]


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor]:
    hessian, _ = stats(activations(4 * COLS, COLS, seed=11))
    weight = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(12)) * 0.02
    return weight, hessian


@pytest.mark.parametrize(("pattern", "sparsity"), CASES)
def test_exact_sparsity_and_pattern(problem, pattern: str, sparsity: float) -> None:
    weight, hessian = problem
    before = (weight.clone(), hessian.clone())
    parsed = Pattern.parse(pattern)
    out = admm_prune(weight, hessian, sparsity, parsed, iterations=8)
    assert out.shape == weight.shape and out.dtype == weight.dtype and out.is_contiguous()
    assert int((out == 0).sum()) == expected_zeros(weight.shape, parsed, sparsity)
    assert satisfies_pattern(out, parsed)
    assert not bool(torch.signbit(out[out == 0]).any())
    assert torch.equal(bits(before[0]), bits(weight)) and torch.equal(bits(before[1]), bits(hessian))
    again = admm_prune(weight, hessian, sparsity, parsed, iterations=8)
    assert torch.equal(bits(out), bits(again))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_layer_error_below_sparsegpt_on_the_same_hessian(problem, pattern: str) -> None:
    weight, hessian = problem
    parsed = Pattern.parse(pattern)
    paper = layer_error(weight, sparsegpt_prune(weight, hessian, 0.5, parsed), hessian)
    refit = layer_error(weight, sparsegpt_prune(weight, hessian, 0.5, parsed, refine_iterations=10), hessian)
    admm = layer_error(weight, admm_prune(weight, hessian, 0.5, parsed), hessian)
    assert admm < 0.8 * paper, (admm, paper)
    assert admm < refit, (admm, refit)


def test_objective_never_rises_during_the_fit(problem) -> None:
    weight, hessian = problem
    for pattern in ("unstructured", "2:4"):
        trace: list[float] = []
        admm_prune(
            weight, hessian, 0.5, Pattern.parse(pattern), iterations=10, refine_iterations=15, trace=trace
        )
        assert len(trace) == 16
        assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(trace)), trace
        assert trace[-1] < trace[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruned_weights_are_exact_zeros_in_each_dtype(problem, dtype: torch.dtype) -> None:
    weight, hessian = problem
    low = weight.to(dtype)
    for pattern in ("unstructured", "2:4"):
        parsed = Pattern.parse(pattern)
        out = admm_prune(low, hessian, 0.5, parsed, iterations=6)
        assert out.dtype == dtype
        assert int((out == 0).sum()) == expected_zeros(weight.shape, parsed, 0.5)
        zero_bits = bits(out)[out == 0]
        assert bool((zero_bits == 0).all())  # +0.0, not -0.0 nor a denormal that rounds to zero later


def test_shared_factorisation_gives_the_same_result(problem) -> None:
    weight, hessian = problem
    prepared = prepare_admm(hessian, 0.01, 1.0)
    shared = admm_prune(weight, hessian, 0.5, Pattern(), prepared=prepared, iterations=6)
    alone = admm_prune(weight, hessian, 0.5, Pattern(), iterations=6)
    assert torch.equal(bits(shared), bits(alone))
    expected = torch.linalg.inv(
        (hessian + prepared.damping * torch.eye(COLS)) / (prepared.scale[:, None] * prepared.scale[None, :])
        + 1.0 * torch.eye(COLS)
    )
    torch.testing.assert_close(prepared.inverse, expected, rtol=1e-3, atol=1e-3)


def test_ramp_and_projection() -> None:
    assert sparsity_ramp(0, 10, 0.5) == 0.0
    assert sparsity_ramp(10, 10, 0.5) == sparsity_ramp(30, 10, 0.5) == 0.5
    assert sparsity_ramp(5, 10, 0.5) == pytest.approx(0.5 * (1 - 0.5**3))
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(0))
    nm = Pattern.parse("2:4")
    full = project(scores, nm, 48)
    assert satisfies_pattern(torch.where(full, 0.0, 1.0), nm) and int(full.sum()) == 48
    part = project(scores, nm, 20)
    assert int(part.sum()) == 20 and bool((part <= full).all())  # a subset of the N:M candidates
    flat = project(scores, Pattern(), 30)
    assert int(flat.sum()) == 30 and scores[flat].max() <= scores[~flat].min()


def test_argument_errors(problem) -> None:
    weight, hessian = problem
    with pytest.raises(ValueError, match="hessian"):
        admm_prune(weight, hessian[:10, :10], 0.5, Pattern())
    with pytest.raises(ValueError, match="iterations"):
        admm_prune(weight, hessian, 0.5, Pattern(), iterations=0)
    with pytest.raises(ValueError, match="rho"):
        prepare_admm(hessian, 0.01, 0.0)
    broken = hessian.clone()
    broken[3, 3] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        admm_prune(weight, broken, 0.5, Pattern())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_ramp_steps_estimate_their_threshold_on_large_layers(pattern: str) -> None:
    """A ramp step (exact=False) on a layer above 2 x SAMPLE_SIZE scores: about the count asked for,
    deterministic, an N:M mask's subset; the final step (exact) is exact."""
    parsed = Pattern.parse(pattern)
    scores = torch.rand(1024, 1024, generator=torch.Generator().manual_seed(3))
    zeros = 300_000
    approx = project(scores, parsed, zeros, exact=False)
    assert abs(int(approx.sum()) - zeros) < 0.01 * zeros
    assert torch.equal(approx, project(scores, parsed, zeros, exact=False))
    exact = project(scores, parsed, zeros)
    assert int(exact.sum()) == zeros
    if parsed.structured:
        full = project(scores, parsed, scores.numel() // 2)
        assert bool((approx <= full).all())
    assert int(project(scores, parsed, 0, exact=False).sum()) == 0


def test_ramp_step_counts_hold_when_columns_differ_in_scale() -> None:
    """Scores of a 512 x 5632 layer whose every 11th column is 100x smaller (ADMM's scores are scaled
    per input column): a ramp step's count stays within 1% (a strided sample, stride 11, saw only
    those columns and pruned ~9% instead of 50%)."""
    scale = torch.full((5632,), 100.0)
    scale[::11] = 1.0
    scores = torch.rand(512, 5632, generator=torch.Generator().manual_seed(7)) * scale
    zeros = scores.numel() // 2
    assert abs(int(project(scores, Pattern(), zeros, exact=False).sum()) - zeros) < 0.01 * zeros


def _massive_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """A layer whose inputs 3 and 70 carry massive activations (1e3 x the others' scale)."""
    x = activations(4 * COLS, COLS, seed=21)
    x[:, [3, 70]] *= 1e3
    hessian, _ = stats(x)
    weight = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(22)) * 0.02
    return weight, hessian


def test_bf16_product_keeps_the_wide_inputs_in_fp32() -> None:
    _, hessian = _massive_problem()
    exact = prepare_admm(hessian, 0.01, 1.0)
    mixed = prepare_admm(hessian, 0.01, 1.0, matmul_dtype=torch.bfloat16)
    assert mixed.inverse.dtype == torch.bfloat16 and exact.inverse.dtype == torch.float32
    assert mixed.wide is not None and mixed.wide.tolist() == [3, 70]
    assert torch.equal(
        exact.times_inverse(exact.scale[None].expand(4, -1)), exact.scale[None].expand(4, -1) @ exact.inverse
    )
    narrow = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(23))
    narrow[:, [3, 70]] = 0.0
    wide = torch.zeros(ROWS, COLS)
    wide[:, [3, 70]] = torch.randn(ROWS, 2, generator=torch.Generator().manual_seed(24))
    for size in (1.0, 1e3, 1e6):  # the wide inputs' entries grow; the others' error must not
        residual = narrow + size * wide
        reference = residual.double() @ exact.inverse.double()
        split_error = float((mixed.times_inverse(residual).double() - reference).norm())
        plain = (residual.bfloat16() @ exact.inverse.bfloat16()).double()  # all of it in bf16
        plain_error = float((plain - reference).norm())
        narrow_size = float((narrow.double() @ exact.inverse.double()).norm())
        assert split_error < 0.01 * narrow_size, (size, split_error, narrow_size)
        if size >= 1e6:  # all of it in bf16: the wide inputs' rounding swamps the others
            assert plain_error > narrow_size, (size, plain_error, narrow_size)


def test_bf16_inverse_is_fp32_inverse_to_bf16_precision_and_its_wide_rows_exact() -> None:
    """bf16 F: a Gram of L^-1 rounded to bf16 (entries within a few 2^-9 of the diagonal's scale of
    the fp32 F), exactly symmetric; the wide inputs' rows come from fp32 columns (fp32-close)."""
    _, hessian = _massive_problem()
    exact = prepare_admm(hessian, 0.01, 1.0)
    mixed = prepare_admm(hessian, 0.01, 1.0, matmul_dtype=torch.bfloat16)
    assert torch.equal(mixed.scale, exact.scale) and mixed.damping == exact.damping
    assert torch.equal(mixed.inverse, mixed.inverse.T)
    diagonal = exact.inverse.diagonal()
    scale = (diagonal[:, None] * diagonal[None, :]).sqrt()
    error = (mixed.inverse.float() - exact.inverse).abs() / scale
    assert float(error.max()) < 8 * 2**-9
    assert float(error.max()) > 0  # the Gram did run in bf16
    assert mixed.wide_rows is not None and mixed.wide_rows.dtype == torch.float32
    torch.testing.assert_close(mixed.wide_rows, exact.inverse[[3, 70]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_bf16_iterations_stay_exact_in_pattern_and_close_in_error(pattern: str) -> None:
    weight, hessian = _massive_problem()
    parsed = Pattern.parse(pattern)
    exact = admm_prune(weight, hessian, 0.5, parsed, iterations=8)
    mixed = admm_prune(
        weight,
        hessian,
        0.5,
        parsed,
        iterations=8,
        prepared=prepare_admm(hessian, 0.01, 1.0, matmul_dtype=torch.bfloat16),
    )
    assert int((mixed == 0).sum()) == expected_zeros(weight.shape, parsed, 0.5)
    assert satisfies_pattern(mixed, parsed)
    paper = layer_error(weight, sparsegpt_prune(weight, hessian, 0.5, parsed), hessian)
    assert layer_error(weight, mixed, hessian) < min(1.05 * layer_error(weight, exact, hessian), paper)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_a_shrunk_hessian_keeps_the_pattern_and_the_fit_descending(problem, pattern: str) -> None:
    """`shrink`: ADMM's F and the re-fit both read (1 - s) H + s diag(H) + d I; the exact pattern, a
    non-increasing objective under that matrix, and 0 is the plain solver, bit for bit."""
    weight, hessian = problem
    parsed = Pattern.parse(pattern)
    trace: list[float] = []
    out = admm_prune(
        weight, hessian, 0.5, parsed, iterations=8, refine_iterations=10, trace=trace, shrink=0.5
    )
    assert int((out == 0).sum()) == expected_zeros(weight.shape, parsed, 0.5) and satisfies_pattern(
        out, parsed
    )
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(trace)), trace
    prepared = prepare_admm(hessian, 0.01, 1.0, shrink=0.5)
    shrunk = 0.5 * hessian + torch.diag(0.5 * hessian.diagonal() + prepared.damping)
    expected = torch.linalg.inv(
        shrunk / (prepared.scale[:, None] * prepared.scale[None, :]) + torch.eye(COLS)
    )
    torch.testing.assert_close(prepared.inverse, expected, rtol=1e-3, atol=1e-3)
    plain = admm_prune(weight, hessian, 0.5, parsed, iterations=8, shrink=0.0)
    assert torch.equal(bits(plain), bits(admm_prune(weight, hessian, 0.5, parsed, iterations=8)))
    assert not torch.equal(
        bits(plain), bits(admm_prune(weight, hessian, 0.5, parsed, iterations=8, shrink=0.5))
    )
