"""Wanda (Sun et al. 2024): prune by |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from shears.pattern import Pattern
from shears.pruning.masks import apply_mask, check_solver_args, prune_mask
from shears.pruning.solvers.reconstruct import reconstruct_masked, refit_matmul_dtype

if TYPE_CHECKING:  # the options model needs pydantic; the solver runs without it (the GPU check)
    from shears.pruning.methods import WandaOptions


@torch.no_grad()
def wanda_scores(weight: Tensor, input_sq_norm: Tensor) -> Tensor:
    """fp32 [out, in] scores |W_ij| * sqrt(sum over tokens of x_j^2)."""
    if input_sq_norm.shape != (weight.shape[1],):
        raise ValueError(
            f"input_sq_norm has shape {tuple(input_sq_norm.shape)}, the weight needs ({weight.shape[1]},)"
        )
    norm = input_sq_norm.detach().to(device=weight.device, dtype=torch.float32).clamp_min(0).sqrt()
    return weight.detach().to(torch.float32).abs() * norm


@torch.no_grad()
def wanda_prune(weight: Tensor, input_sq_norm: Tensor, sparsity: float, pattern: Pattern) -> Tensor:
    """A new [out, in] tensor in `weight`'s dtype and device with the lowest-scoring entries zeroed.

    Unstructured: exactly round(sparsity * in) zeros in every row. N:M: M-N zeros in every group
    of M consecutive input weights of a row.
    """
    check_solver_args(weight, sparsity, pattern)
    scores = wanda_scores(weight, input_sq_norm)
    return apply_mask(weight.detach(), prune_mask(scores, sparsity, pattern, per_row=True))


def solve(
    weight: Tensor,
    sparsity: float,
    pattern: Pattern,
    statistic: Tensor,
    options: WandaOptions | None,
    prepared: None,
) -> Tensor:
    """METHODS["wanda"]: the statistic is the squared input norms, or the Hessian for the re-fit.

    Re-fit: Wanda's mask (its scores from diag H, proportional to the squared norms, so the same
    ranking within a row), then the kept weights re-fitted to the dense ones under H + damping.
    """
    if options is None or not options.refits:
        norms = statistic if statistic.dim() == 1 else statistic.diagonal()
        return wanda_prune(weight, norms, sparsity, pattern)
    check_solver_args(weight, sparsity, pattern, statistic)
    hessian = statistic.detach().to(device=weight.device, dtype=torch.float32)
    pruned = prune_mask(wanda_scores(weight, hessian.diagonal()), sparsity, pattern, per_row=True)
    damping = options.refit_damp * float(hessian.diagonal().mean()) or options.refit_damp
    return reconstruct_masked(
        weight,
        apply_mask(weight.detach(), pruned),
        hessian,
        damping,
        options.refine_iterations,
        drop=pruned,
        matmul_dtype=refit_matmul_dtype(options.refit_precision, weight.device),
        in_place=True,  # apply_mask's result is a new tensor
        shrink=options.refit_shrink,
    )
