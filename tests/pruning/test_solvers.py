from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shears.errors import InvalidRequest
from shears.pattern import Pattern
from shears.pruning.masks import satisfies_pattern
from shears.pruning.methods import METHODS
from shears.pruning.solvers import (
    PreparedHessian,
    layer_error,
    magnitude_prune,
    prepare_hessian,
    solve,
    sparsegpt_prune,
    wanda_prune,
)
from shears.pruning.solvers.sparsegpt import inverse_hessian_factor
from shears.pruning.stats import HessianAccumulator, InputNormAccumulator

ROWS, COLS, TOKENS = 64, 256, 1024
CASES = [
    ("unstructured", 0.5),
    ("unstructured", 0.7),
    ("2:4", 0.5),
    ("4:8", 0.5),
    ("1:4", 0.75),
]


def activations(tokens: int, cols: int, seed: int) -> torch.Tensor:
    """LLM-like inputs: correlated features (a low-rank part plus noise) and a few huge outlier features."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 16, generator=gen) @ torch.randn(16, cols, generator=gen)
    x = latent + 0.5 * torch.randn(tokens, cols, generator=gen)
    outliers = torch.randperm(cols, generator=gen)[:4]
    x[:, outliers] *= 30.0
    return x


def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hess, norm = HessianAccumulator(x.shape[1], "cpu"), InputNormAccumulator(x.shape[1], "cpu")
    hess.add(x)
    norm.add(x)
    return hess.hessian.clone(), norm.sq_norm.clone()


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = activations(TOKENS, COLS, seed=0)
    weight = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(1)) * 0.02
    hessian, sq_norm = stats(x)
    return weight, hessian, sq_norm, x


def run(
    method: str, weight: torch.Tensor, hessian: torch.Tensor, sq_norm: torch.Tensor, pattern: str, s: float
):
    """Wanda as published (these tests check its algorithm: kept weights untouched; the default re-fits,
    tests/pruning/test_variants.py); SparseGPT with its default options; magnitude has none."""
    options = METHODS["wanda"].options(variant="paper") if method == "wanda" else None
    statistic = {"hessian": hessian, "norms": sq_norm, "none": None}[METHODS[method].statistic_of(options)]
    parsed = Pattern.parse(pattern)
    return solve(method, weight, sparsity=s, pattern=parsed, statistic=statistic, options=options)


def expected_zeros(shape: tuple[int, int], pattern: Pattern, sparsity: float, method: str = "") -> int:
    numel = shape[0] * shape[1]
    if pattern.structured:
        return numel * (pattern.m - pattern.n) // pattern.m
    if method == "wanda":  # exact in every row, so the layer total is rows x round(sparsity * cols)
        return shape[0] * round(sparsity * shape[1])
    return round(sparsity * numel)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(
        {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype]
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("pattern", "sparsity"), CASES)
def test_exact_pattern_and_sparsity(layer, method: str, pattern: str, sparsity: float) -> None:
    weight, hessian, sq_norm, _ = layer
    inputs = [t.clone() for t in (weight, hessian, sq_norm)]
    out = run(method, weight, hessian, sq_norm, pattern, sparsity)
    parsed = Pattern.parse(pattern)
    assert out.shape == weight.shape and out.dtype == weight.dtype and out.is_contiguous()
    assert int((out == 0).sum()) == expected_zeros(weight.shape, parsed, sparsity, method)
    assert satisfies_pattern(out, parsed)
    assert bool(torch.isfinite(out).all())
    assert not bool(torch.signbit(out[out == 0]).any())
    # The caller's tensors are untouched, the result is a new tensor, and a second run is bit-identical.
    for before, after in zip(inputs, (weight, hessian, sq_norm), strict=True):
        assert torch.equal(bits(before), bits(after))
    assert out.data_ptr() != weight.data_ptr()
    again = run(method, weight, hessian, sq_norm, pattern, sparsity)
    assert torch.equal(bits(out), bits(again))
    if method != "sparsegpt":  # only SparseGPT changes the weights it keeps
        kept = out != 0
        assert torch.equal(out[kept], weight[kept])


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.37])
def test_wanda_is_exact_in_every_row(layer, sparsity: float) -> None:
    weight, _, sq_norm, _ = layer
    out = wanda_prune(weight, sq_norm, sparsity, Pattern())
    assert (out == 0).sum(1).tolist() == [round(sparsity * COLS)] * ROWS
    scores = weight.abs() * sq_norm.sqrt()
    pruned = out == 0
    row_max = torch.where(pruned, scores, -1.0).amax(1)
    row_min = torch.where(pruned, torch.inf, scores).amin(1)
    assert bool((row_max < row_min).all())


def test_magnitude_threshold_is_per_layer(layer) -> None:
    weight = layer[0] * torch.linspace(0.1, 2.0, ROWS)[:, None]  # rows of very different scales
    out = magnitude_prune(weight, 0.5, Pattern())
    pruned = out == 0
    assert weight.abs()[pruned].max() < weight.abs()[~pruned].min()
    assert (pruned.sum(1)[: ROWS // 4] > COLS // 2).all()  # small rows lose more than half


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_in_half_precision_out(layer, method: str, dtype: torch.dtype) -> None:
    weight, hessian, sq_norm, _ = layer
    low = weight.to(dtype)
    for pattern, sparsity in [("unstructured", 0.5), ("2:4", 0.5)]:
        out = run(method, low, hessian, sq_norm, pattern, sparsity)
        assert out.dtype == dtype
        assert int((out == 0).sum()) == expected_zeros(weight.shape, Pattern.parse(pattern), sparsity, method)
        assert not bool(torch.signbit(out[out == 0]).any())


def reference_sparsegpt(weight, hessian, sparsity, pattern: Pattern, blocksize: int, percdamp: float):
    """IST-DASLab/sparsegpt `fasterprune`, transcribed, with this project's exact per-block quota."""
    W, H = weight.clone().float(), hessian.clone().float()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if not pattern.structured:
            tmp = (W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2).flatten()
            quota = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            mask1.view(-1)[torch.argsort(tmp)[:quota]] = True
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if pattern.structured and i % pattern.m == 0:
                tmp = W1[:, i : i + pattern.m] ** 2 / torch.diag(Hinv1)[i : i + pattern.m].reshape(1, -1) ** 2
                lowest = torch.topk(tmp, pattern.m - pattern.n, dim=1, largest=False)[1]
                mask1.scatter_(1, i + lowest, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


@pytest.mark.parametrize(
    ("pattern", "sparsity", "block"), [("2:4", 0.5, 128), ("1:4", 0.75, 32), ("unstructured", 0.6, 48)]
)
def test_sparsegpt_matches_the_reference_algorithm(pattern: str, sparsity: float, block: int) -> None:
    x = activations(512, 96, seed=3)
    x[:, 7] = 0  # a dead input
    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(4))
    hessian, _ = stats(x)
    parsed = Pattern.parse(pattern)
    ours = sparsegpt_prune(weight, hessian, sparsity, parsed, block_size=block)
    theirs = reference_sparsegpt(weight, hessian, sparsity, parsed, block, 0.01)
    assert torch.equal(ours == 0, theirs == 0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_sparsegpt_dead_inputs_are_zeroed(layer) -> None:
    _, _, _, x = layer
    x = x.clone()
    x[:, [3, 100, 101]] = 0
    hessian, _ = stats(x)
    assert float(hessian.diagonal()[3]) == 0
    weight = layer[0]
    for pattern, sparsity in [("unstructured", 0.5), ("2:4", 0.5)]:
        out = sparsegpt_prune(weight, hessian, sparsity, Pattern.parse(pattern))
        assert bool(torch.isfinite(out).all())
        assert not bool(out[:, [3, 100, 101]].any())
        assert int((out == 0).sum()) == expected_zeros(weight.shape, Pattern.parse(pattern), sparsity)
    assert float(hessian.diagonal()[3]) == 0  # the caller's Hessian keeps its zero


def indefinite_hessian(cols: int) -> torch.Tensor:
    """Eigenvalues from -0.3 to 2.0 (mean 0.85): damping 0.01 and 0.1 are not enough, 1.0 is."""
    q, _ = torch.linalg.qr(
        torch.randn(cols, cols, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    )
    eigs = torch.linspace(-0.3, 2.0, cols, dtype=torch.float64)
    return ((q * eigs) @ q.T).float()


def test_cholesky_retries_with_more_damping() -> None:
    hessian = indefinite_hessian(64)
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky(hessian + 0.1 * hessian.diagonal().abs().mean() * torch.eye(64))
    upper, used = inverse_hessian_factor(hessian, 0.01)
    assert used == pytest.approx(1.0)
    assert torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all())
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    out = sparsegpt_prune(weight, hessian, 0.5, Pattern())
    assert bool(torch.isfinite(out).all()) and int((out == 0).sum()) == 32 * 32


def test_singular_hessian_from_few_tokens() -> None:
    hessian, _ = stats(activations(16, 128, seed=7))  # rank 16 of 128
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(8))
    for pattern, sparsity in [("unstructured", 0.7), ("2:4", 0.5)]:
        out = sparsegpt_prune(weight, hessian, sparsity, Pattern.parse(pattern))
        assert bool(torch.isfinite(out).all())
        assert int((out == 0).sum()) == expected_zeros(weight.shape, Pattern.parse(pattern), sparsity)


def test_hopeless_hessian_raises_instead_of_falling_back() -> None:
    with pytest.raises(RuntimeError, match="not positive definite"):
        inverse_hessian_factor(-torch.eye(8), 0.01, retries=1)
    broken = torch.eye(8)
    broken[2, 3] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        sparsegpt_prune(torch.randn(4, 8), broken, 0.5, Pattern())


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    rows=st.integers(1, 12),
    groups=st.integers(1, 6),
    pattern=st.sampled_from(["unstructured", "2:4", "4:8", "1:4"]),
    sparsity=st.floats(0.05, 0.95),
    block=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_sparsegpt_exact_over_random_shapes(rows, groups, pattern, sparsity, block, seed) -> None:
    parsed = Pattern.parse(pattern)
    cols = groups * 8
    sparsity = parsed.sparsity if parsed.structured else sparsity
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * cols, cols, generator=gen)
    hessian, _ = stats(x)
    weight = torch.randn(rows, cols, generator=gen)
    out = sparsegpt_prune(weight, hessian, sparsity, parsed, block_size=block)
    assert int((out == 0).sum()) == expected_zeros((rows, cols), parsed, sparsity)
    assert satisfies_pattern(out, parsed)


def relative_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    dense = x.double() @ weight.double().T
    return float(((x.double() @ pruned.double().T - dense).norm() / dense.norm()) ** 2)


def test_layer_error_is_relative_output_error(layer) -> None:
    weight, hessian, _, x = layer
    pruned = magnitude_prune(weight, 0.5, Pattern())
    assert layer_error(weight, pruned, hessian) == pytest.approx(relative_error(weight, pruned, x), rel=1e-3)
    assert layer_error(weight, weight, hessian) == 0.0


@pytest.mark.parametrize(("pattern", "sparsity"), [("unstructured", 0.5), ("2:4", 0.5)])
def test_quality_sparsegpt_beats_wanda_beats_magnitude(layer, pattern: str, sparsity: float) -> None:
    weight, hessian, sq_norm, x = layer
    errors = {
        m: relative_error(weight, run(m, weight, hessian, sq_norm, pattern, sparsity), x) for m in METHODS
    }
    assert errors["sparsegpt"] < 0.5 * errors["wanda"], errors
    assert errors["wanda"] < 0.5 * errors["magnitude"], errors


def test_argument_errors(layer) -> None:
    weight, hessian, sq_norm, _ = layer
    with pytest.raises(ValueError, match="fixes sparsity"):
        magnitude_prune(weight, 0.6, Pattern.parse("2:4"))
    with pytest.raises(InvalidRequest, match="multiple of M=8"):
        wanda_prune(weight[:, :252], sq_norm[:252], 0.5, Pattern.parse("4:8"))
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_prune(weight, 1.5, Pattern())
    with pytest.raises(ValueError, match="NaN"):
        magnitude_prune(torch.full((2, 4), float("nan")), 0.5, Pattern())
    with pytest.raises(ValueError, match="input_sq_norm"):
        wanda_prune(weight, sq_norm[:10], 0.5, Pattern())
    with pytest.raises(ValueError, match="hessian"):
        sparsegpt_prune(weight, hessian[:10, :10], 0.5, Pattern())
    with pytest.raises(ValueError, match="unknown pruning method"):
        solve("obs", weight, sparsity=0.5, pattern=Pattern())
    with pytest.raises(ValueError, match="sparsegpt needs the layer's input statistic 'hessian'"):
        solve("sparsegpt", weight, sparsity=0.5, pattern=Pattern())
    # Wanda's default re-fits: it needs the Hessian.
    with pytest.raises(ValueError, match="wanda needs the layer's input statistic 'hessian'"):
        solve("wanda", weight, sparsity=0.5, pattern=Pattern())


def out_of_place_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The factorisation as it was before it was done in place (copies everywhere): the reference bits."""
    hess = hessian.clone()
    dead = hess.diagonal() == 0
    hess.diagonal().copy_(torch.where(dead, 1.0, hess.diagonal()))
    damped = hess.flip(0, 1)
    damped.diagonal().add_(damp * hess.diagonal().abs().mean())
    lower, info = torch.linalg.cholesky_ex(damped)
    assert int(info) == 0
    eye = torch.eye(hess.shape[0])
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)


def test_in_place_factorisation_gives_the_same_bits() -> None:
    x = activations(600, 200, seed=9)
    x[:, [5, 77]] = 0  # dead inputs
    hessian, _ = stats(x)
    before = hessian.clone()
    prepared = prepare_hessian(hessian, 0.01)
    assert torch.equal(bits(prepared.hinv), bits(out_of_place_factor(hessian, 0.01)))
    assert torch.equal(bits(hessian), bits(before))
    weight = torch.randn(24, 200, generator=torch.Generator().manual_seed(10))
    for pattern in ("unstructured", "2:4"):
        parsed = Pattern.parse(pattern)
        reference = PreparedHessian(out_of_place_factor(hessian, 0.01), prepared.dead, prepared.damping)
        ours = sparsegpt_prune(weight, hessian, 0.5, parsed)
        theirs = sparsegpt_prune(weight, hessian, 0.5, parsed, prepared=reference)
        assert torch.equal(bits(ours), bits(theirs))


def test_layer_error_on_strided_rows_estimates_the_exact_value(layer) -> None:
    """max_rows: the traces over every k-th row, exact when the layer has no more rows than that."""
    weight, hessian, _, _ = layer
    pruned = sparsegpt_prune(weight, hessian, 0.5, Pattern())
    exact = layer_error(weight, pruned, hessian)
    assert layer_error(weight, pruned, hessian, max_rows=weight.shape[0]) == exact
    stride = -(-weight.shape[0] // 8)
    sampled = layer_error(weight[::stride], pruned[::stride], hessian)
    assert layer_error(weight, pruned, hessian, max_rows=8) == sampled
    assert sampled == pytest.approx(exact, rel=0.5)


def test_layer_error_in_bf16_products_is_the_fp32_value_to_bf16_precision(layer) -> None:
    """matmul_dtype bf16 (the engine's report where bf16 is fast): operands rounded to bf16, the
    result within a few 2^-9 of the fp32 value, and still zero for an unpruned layer."""
    weight, hessian, _, _ = layer
    pruned = sparsegpt_prune(weight, hessian, 0.5, Pattern())
    exact = layer_error(weight, pruned, hessian)
    estimate = layer_error(weight, pruned, hessian, matmul_dtype=torch.bfloat16)
    assert estimate != exact  # the products did run in bf16
    assert estimate == pytest.approx(exact, rel=4 * 2**-9)
    assert layer_error(weight, weight, hessian, matmul_dtype=torch.bfloat16) == 0.0
