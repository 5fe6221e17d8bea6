"""METHODS is the one list of pruning methods: the request schema, the CLI and the solvers follow it."""

from __future__ import annotations

import inspect

import pytest
import torch
from pydantic import ValidationError

from shears.cli import build_parser
from shears.pattern import Pattern
from shears.pruning.cli_prune import _request_from_args
from shears.pruning.config import PruneRequest
from shears.pruning.methods import METHODS, NO_METHOD, method_named
from shears.pruning.stats import ACCUMULATORS

SOLVER_ARGS = ["weight", "sparsity", "pattern", "statistic", "options", "prepared"]


@pytest.mark.parametrize("name", list(METHODS))
def test_entry_is_complete(name: str) -> None:
    entry = METHODS[name]
    assert entry.name == name and entry.summary
    assert entry.statistic == "none" or entry.statistic in ACCUMULATORS
    module = entry.module()
    assert list(inspect.signature(module.solve).parameters) == SOLVER_ARGS
    if hasattr(module, "prepare"):
        assert len(inspect.signature(module.prepare).parameters) == 3  # (statistic, options, device)
    # An options block is a request field named after its method: it must not shadow another field.
    if entry.options is not None:
        assert PruneRequest.model_fields[name].annotation is entry.options


def test_request_schema_lists_the_registry() -> None:
    schema = PruneRequest.model_json_schema()
    assert schema["properties"]["method"]["enum"] == [*METHODS, NO_METHOD]  # none: structure only
    for name, entry in METHODS.items():
        assert name in schema["properties"]["method"]["description"]
        assert (name in schema["properties"]) == (entry.options is not None)


def test_request_json_stays_compatible() -> None:
    """Requests written before the registry still parse and mean the same."""
    request = PruneRequest.model_validate_json(
        '{"model": "m", "method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4",'
        ' "sparsegpt": {"block_size": 64, "damp": 0.02, "refine_iterations": 0}}'
    )
    assert request.method_options == METHODS["sparsegpt"].options(
        block_size=64, damp=0.02, refine_iterations=0
    )
    assert request.pattern == Pattern(2, 4)
    assert PruneRequest(model="m", method="magnitude", sparsity=0.5).method_options is None
    # refine_iterations 0 still means the paper's SparseGPT, and the manifest says so.
    assert METHODS["sparsegpt"].describe(request.method_options) == {
        "method": "sparsegpt",
        "statistic": "hessian",
        "variant": "paper",
        "block_size": 64,
        "damp": 0.02,
    }
    with pytest.raises(ValidationError, match="Input should be 'sparsegpt', 'wanda'"):
        PruneRequest(model="m", method="obs", sparsity=0.5)
    with pytest.raises(ValidationError, match="extra"):
        PruneRequest(model="m", method="sparsegpt", sparsity=0.5, sparsegpt={"dampening": 0.1})
    with pytest.raises(ValueError, match="unknown pruning method 'obs'; expected one of sparsegpt"):
        method_named("obs")


def _parse(*argv: str):
    return _request_from_args(build_parser().parse_args(["prune", "m", "--out", "o", *argv]))


def test_cli_flags_come_from_the_options_models() -> None:
    request = _parse(
        "--method", "sparsegpt", "--sparsity", "0.5", "--refine-iterations", "0", "--damp", "0.1"
    )
    assert request.sparsegpt == METHODS["sparsegpt"].options(refine_iterations=0, damp=0.1)
    with pytest.raises(ValueError, match="--admm-iterations: not an option of method wanda"):
        _parse("--method", "wanda", "--sparsity", "0.5", "--admm-iterations", "3")
    wanda = _parse("--method", "wanda", "--sparsity", "0.5", "--variant", "refit", "--refine-iterations", "4")
    assert wanda.wanda == METHODS["wanda"].options(variant="refit", refine_iterations=4)
    assert METHODS["wanda"].statistic_of(wanda.wanda) == "hessian"  # the re-fit needs the Hessian
    assert METHODS["wanda"].statistic_of(METHODS["wanda"].options(variant="paper")) == "norms"
    with pytest.raises(ValueError, match="variant"):
        _parse("--method", "wanda", "--sparsity", "0.5", "--variant", "admm")
    with pytest.raises(SystemExit):
        _parse("--method", "sparsegpt", "--sparsity", "0.5", "--variant", "obs")
    with pytest.raises(SystemExit):
        _parse("--method", "obs", "--sparsity", "0.5")
    low = _parse("--method", "sparsegpt", "--sparsity", "0.5", "--refit-precision", "bfloat16")
    assert METHODS["sparsegpt"].describe(low.sparsegpt)["refit_precision"] == "bfloat16"
    with pytest.raises(SystemExit):
        _parse("--method", "sparsegpt", "--sparsity", "0.5", "--refit-precision", "float16")


def test_refit_precision_resolves_per_device() -> None:
    from shears.pruning.resources import fast_matmul_dtype
    from shears.pruning.solvers.reconstruct import refit_matmul_dtype

    cpu = torch.device("cpu")
    assert refit_matmul_dtype("float32", cpu) == torch.float32
    assert refit_matmul_dtype("bfloat16", cpu) == torch.bfloat16
    assert refit_matmul_dtype("auto", cpu) == fast_matmul_dtype(cpu)
    assert refit_matmul_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_solve_through_the_entry_needs_its_statistic() -> None:
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    for name, entry in METHODS.items():
        if entry.statistic == "none":
            assert int((entry.solve(weight, 0.5, Pattern()) == 0).sum()) == 64
        else:
            with pytest.raises(ValueError, match=f"{name} needs the layer's input statistic"):
                entry.solve(weight, 0.5, Pattern())


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        (
            "sparsegpt",
            {"variant": "paper", "refit_damp": 0.1},
            "refit_damp: only used by variants 'refit' and 'admm'",
        ),
        ("sparsegpt", {"variant": "paper", "refine_iterations": 5}, "refine_iterations: only used by"),
        ("sparsegpt", {"variant": "refit", "admm_rho": 2.0}, "admm_rho: only used by variant 'admm'"),
        ("sparsegpt", {"variant": "admm", "damp": 0.05}, "damp: only used by variants 'paper' and 'refit'"),
        (
            "wanda",
            {"variant": "paper", "refit_precision": "float32"},
            "refit_precision: only used by variant 'refit'",
        ),
        ("sparsegpt", {"damp": 0.05}, "damp: only used by variants 'paper' and 'refit'"),  # default: admm
        ("wanda", {"variant": "paper", "refit_shrink": 0.2}, "refit_shrink: only used by variant 'refit'"),
        ("wanda", {"refit_shrink": 1.0}, "less than 1"),  # a diagonal H: the re-fit would do nothing
    ],
)
def test_options_a_variant_ignores_are_refused(method: str, options: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PruneRequest(model="m", method=method, sparsity=0.5, **{method: options})


def test_dumped_requests_parse_again_and_paper_zero_iterations_still_pass() -> None:
    admm = PruneRequest(
        model="m", method="sparsegpt", sparsity=0.5, sparsegpt={"variant": "admm", "admm_rho": 2.0}
    )
    assert PruneRequest.model_validate_json(admm.model_dump_json()) == admm  # every default written out
    paper = PruneRequest(
        model="m", method="sparsegpt", sparsity=0.5, sparsegpt={"variant": "paper", "refine_iterations": 0}
    )
    assert METHODS["sparsegpt"].describe(paper.method_options)["variant"] == "paper"
    wanda = PruneRequest(model="m", method="wanda", sparsity=0.5, wanda={"refine_iterations": 0})
    assert METHODS["wanda"].describe(wanda.method_options) == {
        "method": "wanda",
        "statistic": "norms",
        "variant": "paper",
    }


def test_defaults_are_the_measured_best_and_the_papers_stay_one_option_away() -> None:
    """Defaults (README "Benchmark"): SparseGPT runs ADMM (8 iterations, a 4-step re-fit), Wanda its
    mask with the re-fit; `variant: paper` (or the older `refine_iterations: 0`) runs the papers'."""
    sparsegpt = PruneRequest(model="m", method="sparsegpt", sparsity=0.5).method_options
    assert METHODS["sparsegpt"].describe(sparsegpt) == {
        "method": "sparsegpt",
        "statistic": "hessian",
        "variant": "admm",
        "admm_iterations": 8,
        "admm_rho": 1.0,
        "admm_precision": "auto",
        "refine_iterations": 4,
        "refit_damp": 0.3,
        "refit_shrink": 0.0,
        "refit_precision": "auto",
    }
    wanda = PruneRequest(model="m", method="wanda", sparsity=0.5).method_options
    assert METHODS["wanda"].describe(wanda) == {
        "method": "wanda",
        "statistic": "hessian",
        "variant": "refit",
        "refine_iterations": 4,
        "refit_damp": 0.1,
        "refit_shrink": 0.5,
        "refit_precision": "auto",
    }
    assert METHODS["wanda"].statistic_of(wanda) == "hessian"
    for method in ("sparsegpt", "wanda"):
        for options in ({"variant": "paper"}, {"refine_iterations": 0}):
            request = PruneRequest(model="m", method=method, sparsity=0.5, **{method: options})
            assert METHODS[method].describe(request.method_options)["variant"] == "paper"
            assert request.method_options.variant == "paper"  # the dumped request says so too
    legacy = PruneRequest(
        model="m", method="sparsegpt", sparsity=0.5, sparsegpt={"refine_iterations": 0, "damp": 0.05}
    )
    assert legacy.method_options.damp == 0.05
