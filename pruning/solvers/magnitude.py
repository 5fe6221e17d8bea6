"""Magnitude pruning: drop the smallest |W| of the whole layer (the baseline every method must beat)."""

from __future__ import annotations

import torch
from torch import Tensor

from shears.pattern import Pattern
from shears.pruning.masks import apply_mask, check_solver_args, prune_mask


@torch.no_grad()
def magnitude_prune(weight: Tensor, sparsity: float, pattern: Pattern) -> Tensor:
    """A new [out, in] tensor in `weight`'s dtype and device with the lowest-|W| entries zeroed.

    Unstructured: exactly round(sparsity * numel) zeros chosen over the whole layer.
    N:M: M-N zeros in every group of M consecutive input weights of a row.
    """
    check_solver_args(weight, sparsity, pattern)
    scores = weight.detach().to(torch.float32).abs()
    return apply_mask(weight.detach(), prune_mask(scores, sparsity, pattern, per_row=False))


def solve(
    weight: Tensor, sparsity: float, pattern: Pattern, statistic: None, options: None, prepared: None
) -> Tensor:
    """METHODS["magnitude"]: needs no statistic."""
    return magnitude_prune(weight, sparsity, pattern)
