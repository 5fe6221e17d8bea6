"""`METHODS`: every pruning method, one entry each.

An entry says which statistic of a layer's inputs the method needs, which solver module prunes
with it, and the model of its options (the request's `<method>: {...}` block). The request schema
(and so the OpenAPI schema), `shears prune`, the engine and the block pruner all read this table.

Adding a method: a solver module in pruning/solvers/ and an entry here (+ tests). The module
defines `solve(weight, sparsity, pattern, statistic, options, prepared) -> Tensor`, and may define
`prepare(statistic, options, device)`, run once per input that several layers share (q/k/v, gate/up)
and handed to each of their solves.

Torch-free: the API process builds its request schema from this table; a solver module (torch)
is imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from shears.schema import Strict

if TYPE_CHECKING:
    import torch

    from shears.pattern import Pattern

# What a method reads of each layer's inputs: nothing, the per-feature squared norms sum x_j^2
# (stats.InputNormAccumulator), or the Hessian 2/N X X^T (stats.HessianAccumulator).
Statistic = Literal["none", "norms", "hessian"]


class SparseGPTOptions(Strict):
    block_size: Annotated[int, Field(ge=1, le=4096)] = Field(
        128, description="columns pruned between two lazy updates of the later columns"
    )
    damp: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.01, description="dampening added to the Hessian's diagonal, relative to its mean"
    )
    refine_iterations: Annotated[int, Field(ge=0, le=1000)] = Field(
        10,
        description="conjugate-gradient iterations re-fitting the kept weights to the final mask "
        "(least squares under the damped Hessian); 0 gives the paper's SparseGPT",
    )


@dataclass(frozen=True)
class Method:
    name: str
    statistic: Statistic
    solver: str  # module of shears.pruning.solvers
    summary: str
    options: type[Strict] | None = None  # the request's `<name>: {...}` block, if the method has one

    def module(self) -> ModuleType:
        return importlib.import_module(f"shears.pruning.solvers.{self.solver}")

    def default_options(self) -> Strict | None:
        return self.options() if self.options is not None else None

    def prepare(self, statistic: torch.Tensor, options: Any, device: torch.device) -> Any:
        """What the solver derives once per shared input (None if it derives nothing)."""
        prepare = getattr(self.module(), "prepare", None)
        return prepare(statistic, options, device) if prepare is not None else None

    def solve(
        self,
        weight: torch.Tensor,
        sparsity: float,
        pattern: Pattern,
        *,
        statistic: torch.Tensor | None = None,
        options: Any = None,
        prepared: Any = None,
    ) -> torch.Tensor:
        """A new [out, in] tensor in `weight`'s dtype: `weight` pruned by this method."""
        if self.statistic != "none" and statistic is None:
            raise ValueError(f"{self.name} needs the layer's input statistic {self.statistic!r}")
        if options is None:
            options = self.default_options()
        return self.module().solve(weight, sparsity, pattern, statistic, options, prepared)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "sparsegpt",
            statistic="hessian",
            solver="sparsegpt",
            options=SparseGPTOptions,
            summary="SparseGPT (Frantar & Alistarh 2023): column-wise pruning with Hessian error "
            "updates, then a least-squares re-fit of the kept weights",
        ),
        Method(
            "wanda",
            statistic="norms",
            solver="wanda",
            summary="Wanda (Sun et al. 2024): |W| x input norm, compared within each output row",
        ),
        Method(
            "magnitude",
            statistic="none",
            solver="magnitude",
            summary="smallest |W| over the whole layer; needs no calibration data",
        ),
    )
}


# A request's method when only its `structure` prunes: no weights are zeroed, so it is no entry of
# METHODS (every entry prunes to a sparsity); the request schema and `shears prune` accept it too.
NO_METHOD = "none"


def method_named(name: str) -> Method:
    """The entry of `name`; a ValueError listing the methods if there is none."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; expected one of {', '.join(METHODS)}") from None
