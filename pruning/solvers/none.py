"""Method 'none': zeroes nothing (a request with it removes only whole units: its `structure`)."""

from __future__ import annotations

from torch import Tensor

from shears.pattern import Pattern


def solve(
    weight: Tensor, sparsity: float, pattern: Pattern, statistic: None, options: None, prepared: None
) -> Tensor:
    """METHODS["none"]: the weight unchanged (a copy, as every solver returns a new tensor)."""
    return weight.detach().clone()
