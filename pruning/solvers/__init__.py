"""The pruning solvers: pure functions on tensors, one module per method of pruning.methods.METHODS.

Each returns a new tensor in the caller's dtype.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from shears.pattern import Pattern
from shears.pruning.solvers.magnitude import magnitude_prune
from shears.pruning.solvers.reconstruct import reconstruct_masked
from shears.pruning.solvers.sparsegpt import PreparedHessian, layer_error, prepare_hessian, sparsegpt_prune
from shears.pruning.solvers.wanda import wanda_prune

__all__ = [
    "PreparedHessian",
    "layer_error",
    "magnitude_prune",
    "prepare_hessian",
    "reconstruct_masked",
    "solve",
    "sparsegpt_prune",
    "wanda_prune",
]


def solve(
    method: str,
    weight: Tensor,
    *,
    sparsity: float,
    pattern: Pattern,
    statistic: Tensor | None = None,
    options: Any = None,
) -> Tensor:
    """Prune one [out, in] weight with `method`, given the input statistic its entry names."""
    # Imported here: the registry needs pydantic, the solvers themselves only torch (the GPU check
    # runs them on a machine without pydantic).
    from shears.pruning.methods import method_named

    return method_named(method).solve(weight, sparsity, pattern, statistic=statistic, options=options)
