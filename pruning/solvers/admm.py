"""ADMM pruning: mask and weights chosen together (the family of ALPS, Meng et al. 2024, and Boža 2024).

Per layer: min over W of tr((W - W0) Hd (W - W0)^T) with W in S, the set of weights with the exact
zero count (or N:M pattern) asked for, and Hd = H + damping * I. ADMM splits the least-squares side W
from the sparse side Z (U is the scaled dual):

    W <- (W0 Hd + rho (Z - U)) (Hd + rho I)^-1  =  W0 + rho (Z - U - W0) F,   F = (Hd + rho I)^-1
    Z <- P_S(W + U)      keep the largest |.|, exactly the count (or N:M) asked for
    U <- U + W - Z

All of it in coordinates scaled by d = sqrt(diag Hd): there Hd has a unit diagonal, so one rho suits
every layer, and |w_ij| d_j (Wanda's score) is what the projection ranks. The sparsity of S rises from
0 to the target along a cubic ramp over the first iterations (pruning a little at a time lets the
weights move before the next cut), then stays; rho is fixed, so one factorisation F serves every
iteration and every layer that reads the same input (q/k/v, gate/up). With V = W + U the state is V
and the mask: Z = V on the kept entries, U = V on the pruned ones, so Z - U = sign * V.

The support of the last Z is the mask; its kept weights are then fitted by preconditioned conjugate
gradients (solvers.reconstruct), started from Z.

Regularisation: the damping is a ridge pull towards the dense weights (it is what keeps a fit to the
calibration tokens from drifting where those tokens do not look); few iterations are early stopping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from shears.pattern import Pattern
from shears.pruning.linalg import cholesky_inverse_
from shears.pruning.masks import SAMPLE_SIZE, check_solver_args, lowest_k_mask, nm_group_mask, sample_of
from shears.pruning.solvers.reconstruct import reconstruct_masked
from shears.pruning.stats import ieee_fp32_matmul

log = logging.getLogger(__name__)

CHUNK_ROWS = 512  # rows of an iteration's temporaries: 11 MiB of fp32 at K = 5632
RHO_RETRIES = 4  # rho, 10x, ... if the shifted matrix fails Cholesky (it should not: Hd is definite)


@dataclass(frozen=True)
class PreparedADMM:
    """What ADMM derives from a Hessian before touching weights; shared by layers reading one input."""

    scale: Tensor  # d = sqrt(diag(H) + damping), [K] fp32
    inverse: Tensor  # F = (D^-1 Hd D^-1 + rho I)^-1, [K, K] fp32 (symmetric)
    rho: float
    damping: float  # the absolute value added to H's diagonal
    # No bf16 copy of F for the iterations' product: in these scaled coordinates a model's massive
    # activations (SmolLM2 block 11's down_proj) span 1e5 x, and bf16's 2^-8 relative error on the
    # large entries swamps the small ones (measured 2026-11-30: a broken model, ppl 49,152).


@torch.no_grad()
def prepare_admm(
    hessian: Tensor,
    damp: float,
    rho: float,
    device: torch.device | None = None,
) -> PreparedADMM:
    """Factorise once per Hessian; `damp` is relative to mean(diag H) (as SparseGPT's)."""
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    if not bool(torch.isfinite(hessian.diagonal()).all()):
        raise RuntimeError("ADMM: the Hessian has NaN or infinite entries (the layer's inputs overflowed)")
    with ieee_fp32_matmul():
        device = device or hessian.device
        diag = hessian.diagonal().to(device=device, dtype=torch.float32)
        damping = damp * float(diag.abs().mean()) or damp  # an all-dead input still gets a definite Hd
        scale = (diag + damping).clamp_min(torch.finfo(torch.float32).tiny).sqrt()
        inverse_scale = 1.0 / scale
        shift = rho
        for _ in range(RHO_RETRIES + 1):
            # One K x K buffer: the scaled, shifted Hessian becomes its Cholesky factor, then F.
            matrix = hessian.detach().to(device=device, dtype=torch.float32, copy=True)
            matrix.diagonal().add_(damping)
            matrix.mul_(inverse_scale[:, None]).mul_(inverse_scale[None, :])
            matrix.diagonal().add_(shift)
            _, info = torch.linalg.cholesky_ex(matrix, out=(matrix, torch.empty((), dtype=torch.int32)))
            if int(info) == 0:
                cholesky_inverse_(matrix)  # in place at GEMM speed (LAPACK's potri: ~10x slower)
                if shift != rho:
                    log.warning("ADMM: the shifted Hessian needed rho %g (asked for %g)", shift, rho)
                return PreparedADMM(scale, matrix, shift, damping)
            del matrix
            shift *= 10
    raise RuntimeError(
        f"ADMM: H + damping is not positive definite even shifted by {shift / 10:g}; "
        "the calibration inputs of this layer are degenerate"
    )


def sparsity_ramp(iteration: int, ramp: int, sparsity: float) -> float:
    """Cubic ramp (Zhu & Gupta 2017) from 0 at iteration 0 to `sparsity` at iteration `ramp`."""
    if ramp <= 0 or iteration >= ramp:
        return sparsity
    return sparsity * (1.0 - (1.0 - iteration / ramp) ** 3)


def project(scores: Tensor, pattern: Pattern, zeros: int, *, exact: bool = True) -> Tensor:
    """Mask (True = pruned) of exactly `zeros` entries of a [rows, K] score matrix, lowest first.

    Unstructured: the lowest `zeros` of the layer. N:M: only the M-N lowest of each group of M are
    candidates, and the lowest `zeros` candidates are pruned; at zeros = numel * (M-N)/M that is the
    full N:M mask, below it an N:M mask on part of the groups (the tightening ramp of N:M).
    `exact=False` (any step but the last, whose count only needs to be about right: the sample's
    quantile is within ~0.1% of it): on a large layer the threshold is the quantile of a uniform
    sample of SAMPLE_SIZE scores (masks.sample_of, fixed seed), not a selection over all of them (a
    third of ADMM's time at K = 2048). Only the last step's mask, the one kept, is exact.
    """
    rows, cols = scores.shape
    candidates = None
    if pattern.structured:
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        candidates = nm_group_mask(groups, pattern.m - pattern.n, dim=-1).reshape(rows, cols)
        if zeros >= int(candidates.sum()):
            return candidates
        scores = torch.where(candidates, scores, torch.inf)
    flat = scores.reshape(-1)
    if exact or flat.numel() <= 2 * SAMPLE_SIZE:
        return lowest_k_mask(flat, zeros, dim=0).reshape(rows, cols)
    if zeros == 0:
        return torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    sample = sample_of(flat)
    rank = min(max(round(zeros * sample.numel() / flat.numel()), 1), sample.numel())
    threshold = torch.kthvalue(sample, rank).values
    below = scores <= threshold
    return below if candidates is None else below & candidates  # never a non-candidate (inf) of N:M


@torch.no_grad()
def admm_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    pattern: Pattern,
    *,
    iterations: int = 20,
    ramp: int | None = None,
    rho: float = 1.0,
    damp: float = 0.01,
    refine_iterations: int = 10,
    prepared: PreparedADMM | None = None,
    trace: list[float] | None = None,
    refit_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A new [out, in] tensor in `weight`'s dtype and device: pruned by ADMM, kept weights re-fitted.

    `iterations` ADMM steps, the first `ramp` of them (default: 60%) tightening the mask; then
    `refine_iterations` of preconditioned CG on the final support. Unstructured: exactly
    round(sparsity * numel) zeros over the layer; N:M: M-N zeros in every group of M inputs.
    `trace`, if given, receives the damped objective tr(dW Hd dW^T) after the ADMM phase and after
    each CG step (non-increasing: CG minimises the quadratic over a growing subspace).
    """
    check_solver_args(weight, sparsity, pattern, hessian)
    rows, cols = weight.shape
    if iterations < 1:
        raise ValueError(f"iterations must be positive, got {iterations}")
    device = weight.device
    prepared = prepared or prepare_admm(hessian, damp, rho, device)
    ramp = round(0.6 * iterations) if ramp is None else ramp
    target = pattern.sparsity if pattern.structured else sparsity
    numel = rows * cols
    scale = prepared.scale
    with ieee_fp32_matmul():
        state = weight.detach().to(device=device, dtype=torch.float32) * scale  # V = W + U = W0 at first
        pruned = torch.zeros(rows, cols, dtype=torch.bool, device=device)
        for step in range(1, iterations + 1):
            # Rows are independent given the mask, so the step's temporaries are CHUNK_ROWS rows at a
            # time, and W0 (scaled) is re-derived per chunk from `weight`: a layer costs V and the mask,
            # not four [rows, K] buffers (the memory cgroup benchmark).
            for start in range(0, rows, CHUNK_ROWS):
                kept_rows = slice(start, start + CHUNK_ROWS)
                chunk, mask = state[kept_rows], pruned[kept_rows]
                dense = weight[kept_rows].to(device=device, dtype=torch.float32) * scale  # a new tensor
                # Z - U - W0 = sign * V - W0 (sign +1 on kept entries, -1 on pruned ones).
                residual = torch.where(mask, -chunk, chunk).sub_(dense)
                solution = dense.add_(residual @ prepared.inverse, alpha=prepared.rho)  # W
                del residual
                chunk.copy_(solution.add_(chunk.masked_fill_(~mask, 0.0)))  # V = W + U, U = V where pruned
                del solution, dense
            zeros = round(sparsity_ramp(step, ramp, target) * numel)
            pruned = project(state.abs(), pattern, zeros, exact=step == iterations)
        # The last Z (V on the kept entries) starts the fit, back in the weight's coordinates.
        start = state.masked_fill_(pruned, 0.0).div_(scale)
        del state
    hess = hessian.detach().to(device=device, dtype=torch.float32)
    if trace is not None:
        trace.append(damped_objective(weight, start, hess, prepared.damping))
    result = reconstruct_masked(
        weight,
        start,
        hess,
        prepared.damping,
        refine_iterations,
        drop=pruned,
        trace=trace,
        matmul_dtype=refit_dtype,
        in_place=True,  # `start` is this function's own buffer
    )
    if not bool(torch.isfinite(result).all()):
        raise RuntimeError("ADMM produced non-finite weights; the layer's Hessian is degenerate")
    return result.to(weight.dtype).add_(0.0).contiguous()  # -0.0 -> +0.0


@torch.no_grad()
def damped_objective(dense: Tensor, weight: Tensor, hessian: Tensor, damping: float) -> float:
    """tr((W - W0) (H + damping I) (W - W0)^T), the quantity every solver here minimises."""
    with ieee_fp32_matmul():
        delta = weight.detach().to(torch.float32) - dense.detach().to(
            device=weight.device, dtype=torch.float32
        )
        hess = hessian.to(device=weight.device, dtype=torch.float32)
        return float((torch.addmm(delta, delta, hess, beta=damping) * delta).sum())
