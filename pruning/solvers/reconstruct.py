"""Optimal weights for a fixed sparsity mask: min over W of tr((W - W0) H (W - W0)^T), W = 0 off the mask.

SparseGPT fixes its mask column by column and pushes each error only onto the columns to its right,
so the weights it returns are not the least-squares optimum for the mask it ends with. Each row is
an independent quadratic over its kept inputs with the shared matrix H; a few iterations of
Jacobi-preconditioned conjugate gradients per row, started from SparseGPT's weights, close most of
the gap (SmolLM2 layers: 20-37% lower ||WX - W'X||^2 after 10 iterations). All rows advance together:
one [rows, K] x [K, K] matmul per iteration.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from shears.pruning.stats import ieee_fp32_matmul

log = logging.getLogger(__name__)


@torch.no_grad()
def reconstruct_masked(
    dense: Tensor, pruned: Tensor, hessian: Tensor, damping: float, iterations: int
) -> Tensor:
    """`pruned`'s zero pattern with its kept weights re-fitted to `dense` under H + damping * I.

    dense, pruned: [out, in] (any float dtype); hessian: [in, in] fp32; damping: the absolute
    value added to H's diagonal (SparseGPT's, so both solve the same regularised problem).
    Returns a new tensor in `pruned`'s dtype; `pruned` itself if the iteration breaks down.
    """
    if iterations <= 0:
        return pruned
    with ieee_fp32_matmul():
        target = dense.detach().to(device=hessian.device, dtype=torch.float32)
        weight = pruned.detach().to(device=hessian.device, dtype=torch.float32).clone()
        keep = (weight != 0).to(torch.float32)
        precondition = 1.0 / (hessian.diagonal() + damping).clamp_min(torch.finfo(torch.float32).tiny)

        def apply(x: Tensor) -> Tensor:  # x (H + d I), restricted to each row's kept inputs
            return torch.addmm(x, x, hessian, beta=damping).mul_(keep)

        residual = apply(target - weight)  # minus the gradient, zero off the mask
        z = residual * precondition
        direction = z.clone()
        rz = (residual * z).sum(dim=1, keepdim=True)
        for _ in range(iterations):
            curvature = apply(direction)
            step = rz / (direction * curvature).sum(dim=1, keepdim=True).clamp_min(1e-30)
            weight.addcmul_(step, direction)
            residual.addcmul_(step, curvature, value=-1)
            z = residual * precondition
            rz_next = (residual * z).sum(dim=1, keepdim=True)
            direction = direction.mul_(rz_next / rz.clamp_min(1e-30)).add_(z)
            rz = rz_next
        weight.mul_(keep)
    if not bool(torch.isfinite(weight).all()):
        log.warning("mask reconstruction diverged (non-finite weights); keeping the solver's weights")
        return pruned
    return weight.to(device=pruned.device, dtype=pruned.dtype).add_(0.0)  # -0.0 -> +0.0
