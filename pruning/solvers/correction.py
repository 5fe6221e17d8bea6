"""Block-level error correction: the dense weights re-aimed at the dense model's outputs.

Each layer of a pruned model sees inputs x~ that drifted from the dense model's x by the errors of
every layer before it. Fitting the pruned layer to W0 x~ (its own inputs) keeps those errors; fitting
it to W0 x (the dense model's outputs for the same tokens) repairs them, and errors stop compounding
through depth (asymmetric calibration, as GPTQv2 does for quantisation). With H~ = sum x~ x~^T and
C = sum x~ x^T, the ridge problem

    min over W of  sum ||W0 x - W x~||^2 + damping ||W - W0||^2

has the minimiser W* = W0 (C^T + damping I)(H~ + damping I)^-1, and its objective differs from
tr((W - W*)(H~ + damping I)(W - W*)^T) by a constant: so any solver pruning W* under H~ (SparseGPT,
ADMM, a re-fit) solves the corrected problem. The damping pulls W* towards W0 (no correction) where
the calibration tokens say little.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shears.pruning.stats import ieee_fp32_matmul


@torch.no_grad()
def correction_factor(hessian: Tensor, damping: float) -> Tensor:
    """Lower Cholesky factor of H~ + damping I (one per shared input; raises if not definite)."""
    with ieee_fp32_matmul():
        factor = hessian.detach().to(torch.float32).clone()
        factor.diagonal().add_(damping)
        _, info = torch.linalg.cholesky_ex(factor, out=(factor, torch.empty((), dtype=torch.int32)))
    if int(info) != 0:
        raise RuntimeError(
            "error correction: the pruned model's input Hessian is not positive definite with damping "
            f"{damping:g}; the calibration inputs of this layer are degenerate"
        )
    return factor


@torch.no_grad()
def corrected_target(weight: Tensor, cross: Tensor, factor: Tensor, damping: float) -> Tensor:
    """W* = W0 (C^T + damping I)(H~ + damping I)^-1 in fp32, [out, in]; `factor` from correction_factor."""
    with ieee_fp32_matmul():
        dense = weight.detach().to(device=cross.device, dtype=torch.float32)
        right = torch.addmm(dense, dense, cross.T, beta=damping)  # W0 (C^T + damping I)
        return torch.cholesky_solve(right.T, factor).T.contiguous()  # (H~ + d I) symmetric
