"""The three pruning solvers behind one dispatcher. Each returns a new tensor in the caller's dtype."""

from __future__ import annotations

from torch import Tensor

from shears.pattern import Pattern
from shears.pruning.solvers.magnitude import magnitude_prune
from shears.pruning.solvers.reconstruct import reconstruct_masked
from shears.pruning.solvers.sparsegpt import PreparedHessian, layer_error, prepare_hessian, sparsegpt_prune
from shears.pruning.solvers.wanda import wanda_prune

__all__ = [
    "METHODS",
    "PreparedHessian",
    "layer_error",
    "magnitude_prune",
    "prepare_hessian",
    "reconstruct_masked",
    "solve",
    "sparsegpt_prune",
    "wanda_prune",
]

METHODS = ("sparsegpt", "wanda", "magnitude")


def solve(
    method: str,
    weight: Tensor,
    *,
    sparsity: float,
    pattern: Pattern,
    hessian: Tensor | None = None,
    input_sq_norm: Tensor | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    prepared: PreparedHessian | None = None,
    refine_iterations: int = 0,
) -> Tensor:
    """Prune one [out, in] weight with `method`; sparsegpt needs `hessian`, wanda `input_sq_norm`."""
    if method == "magnitude":
        return magnitude_prune(weight, sparsity, pattern)
    if method == "wanda":
        if input_sq_norm is None:
            raise ValueError("wanda needs input_sq_norm (an InputNormAccumulator's sq_norm)")
        return wanda_prune(weight, input_sq_norm, sparsity, pattern)
    if method == "sparsegpt":
        if hessian is None:
            raise ValueError("sparsegpt needs hessian (a HessianAccumulator's hessian)")
        return sparsegpt_prune(
            weight,
            hessian,
            sparsity,
            pattern,
            block_size=block_size,
            damp=damp,
            prepared=prepared,
            refine_iterations=refine_iterations,
        )
    raise ValueError(f"unknown pruning method {method!r}; expected one of {', '.join(METHODS)}")
