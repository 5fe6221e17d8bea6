"""OWL (Yin et al. 2024): outlier-weighted layer-wise sparsity, one sparsity per decoder block.

Blocks whose Wanda scores hold more outliers keep more weights. Follows the OWL reference code
(`check_outlier_mean` and the min-max normalisation in `prune_wanda_outlier`), except that the
sparsities are kept inside (0, 1) by shrinking their spread, where the reference clamps at 0.01
and so loses the target mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from shears.pruning.solvers.wanda import wanda_scores

# Sparsities stay this far inside (0, 1).
MARGIN = 1e-3


@torch.no_grad()
def outlier_ratio(weights_and_norms: Iterable[tuple[Tensor, Tensor]], threshold: float) -> float:
    """Fraction of the block's Wanda scores above `threshold` x the block's mean score.

    `weights_and_norms`: (weight [out, in], input_sq_norm [in]) for every linear layer of one
    decoder block, input_sq_norm as InputNormAccumulator.sq_norm (the same input wanda_prune takes).
    As in the OWL code, the mean is over all scores of the block together, not layer by layer.
    """
    pairs = list(weights_and_norms)
    if not pairs:
        raise ValueError("outlier_ratio needs at least one (weight, input_sq_norm) pair")
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    # Two passes, one layer at a time: a block's concatenated scores can be gigabytes.
    total, count = 0.0, 0
    for weight, sq_norm in pairs:
        total += float(wanda_scores(weight, sq_norm).sum(dtype=torch.float64))
        count += weight.numel()
    if count == 0:
        return 0.0
    cutoff = threshold * total / count
    outliers = sum(int((wanda_scores(weight, sq_norm) > cutoff).sum()) for weight, sq_norm in pairs)
    return outliers / count


def owl_sparsities(ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """Per-block sparsities whose mean is `target`; a block with a higher outlier ratio gets less.

    The ratios are min-max normalised into [0, 2 * lam] and shifted so that the mean keep ratio is
    1 - target (the OWL reference code). Equal ratios give `target` everywhere.
    """
    if not 0 < target < 1:
        raise ValueError(f"target sparsity must be within (0, 1), got {target}")
    if lam < 0:
        raise ValueError(f"lam must be non-negative, got {lam}")
    values = [float(r) for r in ratios]
    if not values:
        return []
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"outlier ratios must be finite, got {values}")
    low, high = min(values), max(values)
    if high == low or lam == 0:
        return [target] * len(values)
    keep = [(v - low) / (high - low) * 2 * lam for v in values]
    mean_keep = sum(keep) / len(keep)
    deviation = [k - mean_keep for k in keep]  # sparsity_i = target - deviation_i
    # Shrink the spread (keeping mean and order) if a block would leave (MARGIN, 1 - MARGIN).
    shrink = 1.0
    for d in deviation:
        if d > 0:
            shrink = min(shrink, (target - MARGIN) / d)
        elif d < 0:
            shrink = min(shrink, (1 - MARGIN - target) / -d)
    shrink = max(shrink, 0.0)
    return [target - shrink * d for d in deviation]
