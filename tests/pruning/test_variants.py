"""The variants behind `method: sparsegpt` and `method: wanda`: the papers' algorithms one option away."""

from __future__ import annotations

import pytest
import torch

from shears.pattern import Pattern
from shears.pruning.config import EvaluationSpec
from shears.pruning.engine import prune
from shears.pruning.methods import METHODS
from shears.pruning.solvers import layer_error, prepare_hessian, sparsegpt_prune, wanda_prune
from tests.pruning.test_solvers import activations, bits, expected_zeros, out_of_place_factor, stats

ROWS, COLS = 40, 96


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = activations(6 * COLS, COLS, seed=21)
    x[:, 13] = 0  # a dead input
    hessian, sq_norm = stats(x)
    weight = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(22)) * 0.02
    return weight, hessian, sq_norm


def solve(method: str, weight, statistic, pattern: str, **options) -> torch.Tensor:
    entry = METHODS[method]
    chosen = entry.options(**options)
    prepared = entry.prepare(statistic, chosen, weight.device)
    return entry.solve(
        weight, 0.5, Pattern.parse(pattern), statistic=statistic, options=chosen, prepared=prepared
    )


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_paper_variant_is_todays_sparsegpt_bit_for_bit(problem, pattern: str) -> None:
    weight, hessian, _ = problem
    paper = solve("sparsegpt", weight, hessian, pattern, variant="paper")
    # refine_iterations 0 was how the paper's algorithm was asked for before variants: still the same.
    legacy = solve("sparsegpt", weight, hessian, pattern, variant="refit", refine_iterations=0)
    prepared = prepare_hessian(hessian, 0.01)
    reference = type(prepared)(out_of_place_factor(hessian, 0.01), prepared.dead, prepared.damping)
    before = sparsegpt_prune(weight, hessian, 0.5, Pattern.parse(pattern), prepared=reference)
    assert torch.equal(bits(paper), bits(legacy)) and torch.equal(bits(paper), bits(before))
    assert METHODS["sparsegpt"].describe(METHODS["sparsegpt"].options(variant="paper"))["variant"] == "paper"


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_variants_keep_the_pattern_and_lower_the_error(problem, pattern: str) -> None:
    weight, hessian, _ = problem
    parsed = Pattern.parse(pattern)
    errors = {}
    for variant in ("paper", "refit", "admm"):
        # At SparseGPT's own damping: the fitting power. The default refit_damp (0.3) gives some of
        # the calibration fit back for text of other domains (test_refit_damping_pulls_...).
        fit = {} if variant == "paper" else {"refit_damp": 0.01}
        out = solve("sparsegpt", weight, hessian, pattern, variant=variant, **fit)
        assert int((out == 0).sum()) == expected_zeros(weight.shape, parsed, 0.5)
        errors[variant] = layer_error(weight, out, hessian)
    assert errors["refit"] < errors["paper"] and errors["admm"] < errors["paper"], errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_refit_keeps_wandas_mask_and_fits_the_kept_weights(problem, pattern: str, dtype) -> None:
    weight, hessian, sq_norm = problem
    low = weight.to(dtype)
    paper = wanda_prune(low, sq_norm, 0.5, Pattern.parse(pattern))
    assert torch.equal(solve("wanda", low, sq_norm, pattern, variant="paper"), paper)
    refit = solve("wanda", low, hessian, pattern, variant="refit")
    assert refit.dtype == dtype
    assert torch.equal(refit == 0, paper == 0)  # the same mask (diag H ranks inputs as the norms do)
    assert bool((bits(refit)[refit == 0] == 0).all())  # pruned weights are +0.0 exactly
    assert layer_error(weight, refit, hessian) < 0.9 * layer_error(weight, paper, hessian)
    assert METHODS["wanda"].statistic_of(METHODS["wanda"].options(variant="refit")) == "hessian"


def test_refit_damping_pulls_towards_the_dense_weights(problem) -> None:
    weight, hessian, _ = problem
    loose = solve("wanda", weight, hessian, "2:4", variant="refit", refit_damp=0.01)
    tight = solve("wanda", weight, hessian, "2:4", variant="refit", refit_damp=1.0)
    kept = loose != 0
    assert (tight - weight)[kept].norm() < (loose - weight)[kept].norm()
    # ...at some cost on the calibration objective, the price of generalising beyond it.
    assert layer_error(weight, loose, hessian) < layer_error(weight, tight, hessian)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_variants_end_to_end_fit_closer_than_the_papers(tiny_llama, tmp_path, compute_dtype: str) -> None:
    """Through the engine, fp32 and bf16 block forwards: exact patterns, the manifest names the
    variant, and the re-fitting variants leave the pruned model closer to the dense one."""
    from tests.pruning.test_engine import check_output, fast_request

    runs = {
        "sparsegpt-paper": dict(method="sparsegpt", sparsegpt={"variant": "paper"}),
        "sparsegpt-admm": dict(method="sparsegpt", sparsegpt={"variant": "admm", "admm_iterations": 8}),
        "wanda-paper": dict(method="wanda", wanda={"variant": "paper"}),
        "wanda-refit": dict(method="wanda", wanda={"variant": "refit", "refit_precision": "bfloat16"}),
    }
    errors = {}
    for name, fields in runs.items():
        request = fast_request(
            tiny_llama,
            pattern=Pattern.parse("2:4"),
            compute_dtype=compute_dtype,
            evaluation=EvaluationSpec(enabled=False),
            **fields,
        )
        manifest = prune(request, tmp_path / name)
        check_output(tmp_path / name, request)
        assert manifest["solver"]["variant"] == name.split("-")[1]
        errors[name] = sum(block["model_error"] for block in manifest["blocks"])
    assert manifest["solver"]["refit_precision"] == manifest["solver"]["refit_matmul_dtype"] == "bfloat16"
    assert manifest["solver"]["refit_shrink"] == 0.5  # Wanda's default: H shrunk halfway to its diagonal
    assert errors["sparsegpt-admm"] < errors["sparsegpt-paper"]
    assert errors["wanda-refit"] < errors["wanda-paper"]
