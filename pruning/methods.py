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

from pydantic import Field, model_validator

from shears.schema import Strict

if TYPE_CHECKING:
    import torch

    from shears.pattern import Pattern

# What a method reads of each layer's inputs: nothing, the per-feature squared norms sum x_j^2
# (stats.InputNormAccumulator), or the Hessian 2/N X X^T (stats.HessianAccumulator).
Statistic = Literal["none", "norms", "hessian"]


def _refuse_unused(options: Strict, *fields: str, unless: bool, used_by: str) -> None:
    """A request that sets an option its variant ignores to other than its default is refused: it would
    not do what it says. (Defaults pass: a dumped request, every field written out, parses again.)"""
    defaults = type(options).model_fields
    given = [name for name in fields if getattr(options, name) != defaults[name].default]
    if given and not unless:
        raise ValueError(f"{', '.join(given)}: only used by {used_by}; drop it or pick that variant")


def _paper_if_no_refit(data: object) -> object:
    """`refine_iterations: 0` without a variant asks for the paper's algorithm (its spelling before
    variants existed, and still documented): the variant is set to say so."""
    if isinstance(data, dict) and "variant" not in data and data.get("refine_iterations") == 0:
        return {**data, "variant": "paper"}
    return data


class SparseGPTOptions(Strict):
    # The defaults are the best measured on held-out text of another domain than the calibration's
    # (bench/results/peers-*.md; README "Benchmark"): ADMM, few iterations (more fit the calibration
    # text, not the model), a short re-fit.
    variant: Literal["admm", "refit", "paper"] = Field(
        "admm",
        description="'paper': SparseGPT as published; 'refit': SparseGPT, then the kept weights re-fitted "
        "to the final mask (conjugate gradients); 'admm': mask and weights found together by ADMM "
        "(solvers.admm), then the same re-fit",
    )
    block_size: Annotated[int, Field(ge=1, le=4096)] = Field(
        128, description="columns pruned between two lazy updates of the later columns"
    )
    damp: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.01, description="dampening added to the Hessian's diagonal, relative to its mean"
    )
    refine_iterations: Annotated[int, Field(ge=0, le=1000)] = Field(
        4,
        description="conjugate-gradient iterations re-fitting the kept weights to the final mask "
        "(least squares under the damped Hessian; variants refit and admm); 0 without a variant "
        "gives the paper's SparseGPT",
    )
    # 0.3: a strong pull towards the dense weights generalises best. Measured on SmolLM2 (32 x 512
    # tokens of one domain, perplexity on the other's held-out text, README "Benchmarks"): against
    # 0.01 it gained in three of the four cells (2:4 calibrated on GSM8K 0.937x -> 0.853x the peer's)
    # and lost in one that stays far ahead (2:4 calibrated on Shakespeare 0.670x -> 0.726x).
    refit_damp: Annotated[float, Field(gt=0, lt=10)] = Field(
        0.3,
        description="dampening of the re-fit and of ADMM, relative to mean(diag H): a pull towards the "
        "dense weights that keeps the fit from overfitting the calibration text",
    )
    # 0 (plain H): 0.5, Wanda's default, measured on SmolLM2's four other-domain cells (2026-12-02) was
    # no better in any (README "Benchmarks"); ADMM's mask is chosen against H and refit_damp 0.3 already
    # pulls hard towards the dense weights.
    refit_shrink: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0,
        description="shrinks the Hessian of the re-fit and of ADMM towards its diagonal, (1 - s) H + "
        "s diag(H): trusts the calibration inputs' cross-correlations less (0: plain H)",
    )
    refit_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="matmul dtype of the re-fit's steps (iterate and residual stay fp32): 'auto' is "
        "bf16 on GPUs and on CPUs with AMX/AVX512-BF16, where it is faster, else fp32",
    )
    admm_iterations: Annotated[int, Field(ge=1, le=1000)] = Field(
        8, description="ADMM iterations (variant admm), the first 60% tightening the mask"
    )
    admm_rho: Annotated[float, Field(gt=0, le=100)] = Field(
        1.0, description="ADMM penalty, relative to the normalised Hessian's unit diagonal (variant admm)"
    )
    # 'auto': measured on SmolLM2 (32 x 512 tokens, other-domain perplexity, 2026-12-01) 0.7-1.6% from
    # fp32 in the three cells run both ways, and 2.4x faster per iteration at hidden 2048 on an AMX CPU.
    admm_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="matmul dtype of the ADMM iterations' product (variant admm; inputs with massive "
        "activations stay fp32, solvers.admm): 'auto' is bf16 on GPUs and on CPUs with "
        "AMX/AVX512-BF16, else fp32",
    )

    _legacy_paper = model_validator(mode="before")(_paper_if_no_refit)

    @model_validator(mode="after")
    def _options_of_the_variant(self) -> SparseGPTOptions:
        _refuse_unused(
            self,
            "admm_iterations",
            "admm_rho",
            "admm_precision",
            unless=self.variant == "admm",
            used_by="variant 'admm'",
        )
        _refuse_unused(
            self,
            "block_size",
            "damp",
            unless=self.variant != "admm",
            used_by="variants 'paper' and 'refit' (ADMM has no column sweep; its damping is refit_damp)",
        )
        _refuse_unused(
            self,
            "refit_damp",
            "refit_shrink",
            "refit_precision",
            unless=self.variant != "paper",
            used_by="variants 'refit' and 'admm' (the paper's SparseGPT re-fits nothing)",
        )
        _refuse_unused(
            self,
            "refine_iterations",
            unless=self.variant != "paper" or self.refine_iterations == 0,
            used_by="variants 'refit' and 'admm' (the paper's SparseGPT re-fits nothing)",
        )
        return self

    def describe(self) -> dict[str, Any]:
        """The exact variant and the parameters it uses (for the manifest)."""
        if self.variant == "paper" or (self.refine_iterations == 0 and self.variant == "refit"):
            return {"variant": "paper", "block_size": self.block_size, "damp": self.damp}
        fit = {
            "refine_iterations": self.refine_iterations,
            "refit_damp": self.refit_damp,
            "refit_shrink": self.refit_shrink,
            "refit_precision": self.refit_precision,
        }
        if self.variant == "refit":
            return {"variant": "refit", "block_size": self.block_size, "damp": self.damp, **fit}
        return {
            "variant": "admm",
            "admm_iterations": self.admm_iterations,
            "admm_rho": self.admm_rho,
            "admm_precision": self.admm_precision,
            **fit,
        }


class WandaOptions(Strict):
    variant: Literal["refit", "paper"] = Field(
        "refit",
        description="'paper': Wanda as published (|W| x input norm, the kept weights untouched); 'refit': "
        "Wanda's mask, then the kept weights re-fitted by conjugate gradients (needs the Hessian)",
    )
    refine_iterations: Annotated[int, Field(ge=0, le=1000)] = Field(
        4,
        description="conjugate-gradient iterations of the re-fit (variant refit); 0 gives the paper's Wanda",
    )
    # 0.1, not SparseGPT's 0.01: Wanda's mask was not chosen against the Hessian, so a looser fit of its
    # kept weights overfits the calibration text; measured on SmolLM2, 32 x 512 tokens, the other
    # domain's perplexity fell in all four cells (README "Benchmarks").
    refit_damp: Annotated[float, Field(gt=0, lt=10)] = Field(
        0.1, description="dampening of the re-fit relative to mean(diag H): a pull towards the dense weights"
    )
    # 0.5: measured on SmolLM2 (32 x 512 tokens of one domain, the other's held-out perplexity, README
    # "Benchmarks"), 0 / 0.3 / 0.5 / 0.8 gave geometric means over the four cells of 0.895 / 0.887 /
    # 0.887 / 0.904 the peer's; 0.5 is the one under 0.97 in every cell (50% GSM8K -> Shakespeare
    # 1.000 -> 0.967). The price is on the calibration's own text (50% GSM8K 8.98 -> 9.24).
    refit_shrink: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.5,
        description="shrinks the re-fit's Hessian towards its diagonal, (1 - s) H + s diag(H): the "
        "calibration inputs' cross-correlations, the part of H most particular to that text, count "
        "1 - s (0: plain H)",
    )
    refit_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="matmul dtype of the re-fit's steps (iterate and residual stay fp32): 'auto' is "
        "bf16 on GPUs and on CPUs with AMX/AVX512-BF16, where it is faster, else fp32",
    )

    _legacy_paper = model_validator(mode="before")(_paper_if_no_refit)

    @model_validator(mode="after")
    def _options_of_the_variant(self) -> WandaOptions:
        _refuse_unused(
            self,
            "refit_damp",
            "refit_shrink",
            "refit_precision",
            unless=self.variant == "refit",
            used_by="variant 'refit' (the paper's Wanda re-fits nothing)",
        )
        _refuse_unused(
            self,
            "refine_iterations",
            unless=self.variant == "refit" or self.refine_iterations == 0,
            used_by="variant 'refit' (the paper's Wanda re-fits nothing)",
        )
        return self

    @property
    def refits(self) -> bool:
        return self.variant == "refit" and self.refine_iterations > 0

    @property
    def statistic(self) -> Statistic:
        """Wanda's mask needs only input norms; its re-fit needs the Hessian (whose diagonal has them)."""
        return "hessian" if self.refits else "norms"

    def describe(self) -> dict[str, Any]:
        if not self.refits:
            return {"variant": "paper"}
        return {
            "variant": "refit",
            "refine_iterations": self.refine_iterations,
            "refit_damp": self.refit_damp,
            "refit_shrink": self.refit_shrink,
            "refit_precision": self.refit_precision,
        }


@dataclass(frozen=True)
class Method:
    name: str
    statistic: Statistic  # what the published algorithm reads; statistic_of(options) what a variant does
    solver: str  # module of shears.pruning.solvers
    summary: str
    options: type[Strict] | None = None  # the request's `<name>: {...}` block, if the method has one

    def module(self) -> ModuleType:
        return importlib.import_module(f"shears.pruning.solvers.{self.solver}")

    def default_options(self) -> Strict | None:
        return self.options() if self.options is not None else None

    def statistic_of(self, options: Any = None) -> Statistic:
        """The statistic these options need (None: the default options'); a variant may need more
        than `statistic`, the published algorithm's (Wanda's re-fit, the default, needs the Hessian)."""
        if options is None:
            options = self.default_options()
        return getattr(options, "statistic", None) or self.statistic

    def describe(self, options: Any) -> dict[str, Any]:
        """The method, its exact variant and parameters: what the manifest records."""
        described = options.describe() if hasattr(options, "describe") else {"variant": "paper"}
        return {"method": self.name, "statistic": self.statistic_of(options), **described}

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
        if options is None:
            options = self.default_options()
        needed = self.statistic_of(options)
        if needed != "none" and statistic is None:
            raise ValueError(f"{self.name} needs the layer's input statistic {needed!r}")
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
            "updates, then a least-squares re-fit of the kept weights; or ADMM (ALPS family)",
        ),
        Method(
            "wanda",
            statistic="norms",
            solver="wanda",
            options=WandaOptions,
            summary="Wanda (Sun et al. 2024): |W| x input norm, compared within each output row; "
            "optionally the kept weights re-fitted",
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
