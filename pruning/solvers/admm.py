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
from shears.pruning.linalg import all_finite, cholesky_inverse_, chunk_rows, gram_of_lower_, invert_lower_
from shears.pruning.masks import SAMPLE_SIZE, check_solver_args, lowest_k_mask, nm_group_mask, sample_of
from shears.pruning.solvers.reconstruct import reconstruct_masked, times_fit_matrix
from shears.pruning.stats import ieee_fp32_matmul

log = logging.getLogger(__name__)

RHO_RETRIES = 4  # rho, 10x, ... if the shifted matrix fails Cholesky (it should not: Hd is definite)
# An input whose scale d_j exceeds this many times the median is "wide": its column of the iteration's
# product stays in fp32 when the rest runs in bf16 (see PreparedADMM).
WIDE_SCALE = 8.0
# fp32 rows of a step's buffers (4 of them, + 2 bf16, per layer; at K = 8192 4 MiB took 2.7 s, 16 MiB
# 2.3 s; 8 keeps the memory cgroup's margin)
STEP_BYTES = 8 * 2**20


@dataclass(frozen=True)
class PreparedADMM:
    """What ADMM derives from a Hessian before touching weights; shared by layers reading one input.

    The iterations' product R F runs in `inverse`'s dtype. In bf16, the inputs with a wide scale
    (massive activations: SmolLM2 block 11's down_proj spans 1e5 x) are taken out of it: their
    entries of R are that much larger, and bf16's 2^-9 relative error on them swamps the small
    outputs (all of R F in bf16 broke SmolLM2: ppl 49,152, measured 2026-11-30). Their rows of F
    (`wide_rows`) are kept in fp32 and their part of the product is added in fp32.
    """

    scale: Tensor  # d = sqrt(diag(H) + damping), [K] fp32
    inverse: Tensor  # F = (D^-1 Hd D^-1 + rho I)^-1, [K, K] (symmetric), fp32 or bf16
    rho: float
    damping: float  # the absolute value added to H's diagonal
    wide: Tensor | None = None  # bf16 F: indices of the wide inputs, [W] int64
    wide_rows: Tensor | None = None  # bf16 F: F[wide] in fp32, [W, K]
    shrink: float = 0.0  # Hd is (1 - shrink) H + shrink diag(H) + damping I (solvers.reconstruct)

    def times_inverse(self, residual: Tensor) -> Tensor:
        """residual @ F in fp32 ([rows, K]); the wide inputs' part in fp32 when F is bf16."""
        return self.add_times_inverse_(torch.zeros_like(residual, dtype=torch.float32), residual, 1.0)

    def add_times_inverse_(
        self, target: Tensor, residual: Tensor, alpha: float, scratch: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """target += alpha * residual @ F, in place (fp32 [rows, K]). `scratch`: two buffers of
        residual's shape in F's dtype for the bf16 product (else they are allocated)."""
        if self.inverse.dtype == torch.float32:
            return target.addmm_(residual, self.inverse, alpha=alpha)
        assert self.wide is not None and self.wide_rows is not None
        narrow, product = scratch or (
            torch.empty_like(residual, dtype=self.inverse.dtype),
            torch.empty_like(residual, dtype=self.inverse.dtype),
        )
        narrow.copy_(residual).index_fill_(1, self.wide, 0.0)
        target.add_(torch.mm(narrow, self.inverse, out=product), alpha=alpha)
        if self.wide.numel():
            target.addmm_(residual[:, self.wide], self.wide_rows, alpha=alpha)
        return target


@torch.no_grad()
def prepare_admm(
    hessian: Tensor,
    damp: float,
    rho: float,
    device: torch.device | None = None,
    matmul_dtype: torch.dtype = torch.float32,
    shrink: float = 0.0,
) -> PreparedADMM:
    """Factorise once per Hessian; `damp` is relative to mean(diag H) (as SparseGPT's). `shrink`
    (0 <= s < 1): the off-diagonal of H counts (1 - s) times (reconstruct_masked's `shrink`).

    `matmul_dtype` bf16: F is kept in bf16 for the iterations' product, but for its wide inputs'
    rows (PreparedADMM); the fp32 factorisation is freed."""
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    if not 0.0 <= shrink < 1.0:
        raise ValueError(f"shrink must be in [0, 1), got {shrink}")
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
            if shrink:  # the diagonal stays diag(H) + damping, so the scale d does too
                matrix.mul_(1.0 - shrink).diagonal().add_(diag, alpha=shrink)
            matrix.diagonal().add_(damping)
            matrix.mul_(inverse_scale[:, None]).mul_(inverse_scale[None, :])
            matrix.diagonal().add_(shift)
            _, info = torch.linalg.cholesky_ex(matrix, out=(matrix, torch.empty((), dtype=torch.int32)))
            if int(info) == 0:
                if shift != rho:
                    log.warning("ADMM: the shifted Hessian needed rho %g (asked for %g)", shift, rho)
                if matmul_dtype == torch.float32:
                    cholesky_inverse_(matrix)  # in place at GEMM speed (LAPACK's potri: ~10x slower)
                    return PreparedADMM(scale, matrix, shift, damping, shrink=shrink)
                # A bf16 product: F = M^T M (M = L^-1 in fp32). The wide inputs' rows of F in fp32
                # from M's fp32 columns; the rest a Gram of M rounded to bf16 (each entry summed in
                # fp32 inside one matmul; F is rounded to bf16 for the iterations anyway). Measured
                # 2026-12-02 (AMD EPYC, AVX512-BF16): this preparation 5.4 s -> 4.2 s at K = 8192; on
                # 16 SmolLM2 layers, ADMM's masks 99.8% the same, errors on other-domain text +-0.05%.
                invert_lower_(matrix)
                wide = (scale > WIDE_SCALE * scale.median()).nonzero()[:, 0]
                wide_rows = matrix[:, wide].T @ matrix  # F[wide] = M[:, wide]^T M, [W, K]
                low = matrix.to(matmul_dtype)
                del matrix  # the fp32 K x K buffer goes before the Gram's temporaries come
                return PreparedADMM(scale, gram_of_lower_(low), shift, damping, wide, wide_rows, shrink)
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
    shrink: float = 0.0,
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
    prepared = prepared or prepare_admm(hessian, damp, rho, device, shrink=shrink)
    ramp = round(0.6 * iterations) if ramp is None else ramp
    target = pattern.sparsity if pattern.structured else sparsity
    numel = rows * cols
    scale = prepared.scale
    with ieee_fp32_matmul():
        state = weight.detach().to(device=device, dtype=torch.float32) * scale  # V = W + U = W0 at first
        pruned = torch.zeros(rows, cols, dtype=torch.bool, device=device)
        scores = torch.empty_like(state)  # |V|, in one buffer for every step (a fresh one faults in)
        # Rows are independent given the mask, so a step runs on STEP_BYTES of rows at a time in
        # buffers allocated once: W0 (scaled) is re-derived per chunk from `weight` (a layer costs V and
        # the mask, not four [rows, K] buffers: the memory cgroup benchmark), and every temporary is
        # reused (fresh ones past glibc's mmap threshold are faulted in again each time). Big chunks:
        # each streams all of F through the product.
        step_rows = min(rows, chunk_rows(cols, STEP_BYTES))
        flags, held, dense, residual = (torch.empty(step_rows, cols, device=device) for _ in range(4))
        scratch: tuple[Tensor, Tensor] | None = None
        if prepared.inverse.dtype != torch.float32:  # the bf16 product's input and output
            scratch = (
                torch.empty_like(held, dtype=prepared.inverse.dtype),
                torch.empty_like(held, dtype=prepared.inverse.dtype),
            )
        for step in range(1, iterations + 1):
            for start in range(0, rows, step_rows):
                chunk = state[start : start + step_rows]
                n = chunk.shape[0]
                # 0/1 floats and products, not masked_fill/where (several times slower on CPU).
                pruned_rows = flags[:n].copy_(pruned[start : start + n])
                torch.mul(chunk, pruned_rows, out=held[:n])  # U: V on the pruned entries, else 0
                torch.mul(weight[start : start + n].to(device), scale, out=dense[:n])  # W0, scaled
                # Z - U - W0 = V - 2U - W0 (Z = V on the kept entries, U = V on the pruned ones).
                torch.sub(chunk, dense[:n], out=residual[:n]).sub_(held[:n], alpha=2.0)
                pieces = None if scratch is None else (scratch[0][:n], scratch[1][:n])
                prepared.add_times_inverse_(dense[:n], residual[:n], prepared.rho, pieces)  # W
                torch.add(dense[:n], held[:n], out=chunk)  # V = W + U
            zeros = round(sparsity_ramp(step, ramp, target) * numel)
            pruned = project(torch.abs(state, out=scores), pattern, zeros, exact=step == iterations)
        del scores, flags, held, dense, residual, scratch
        # The last Z (V on the kept entries) starts the fit, back in the weight's coordinates.
        start = state.masked_fill_(pruned, 0.0).div_(scale)
        del state
    hess = hessian.detach().to(device=device, dtype=torch.float32)
    if trace is not None:
        trace.append(damped_objective(weight, start, hess, prepared.damping, prepared.shrink))
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
        shrink=prepared.shrink,
    )
    if not all_finite(result):
        raise RuntimeError("ADMM produced non-finite weights; the layer's Hessian is degenerate")
    return result.to(weight.dtype).add_(0.0).contiguous()  # -0.0 -> +0.0


@torch.no_grad()
def damped_objective(
    dense: Tensor, weight: Tensor, hessian: Tensor, damping: float, shrink: float = 0.0
) -> float:
    """tr((W - W0) (H + damping I) (W - W0)^T), the quantity every solver here minimises (with
    `shrink`: H's off-diagonal weighted 1 - shrink, reconstruct_masked's)."""
    with ieee_fp32_matmul():
        delta = weight.detach().to(torch.float32) - dense.detach().to(
            device=weight.device, dtype=torch.float32
        )
        hess = hessian.to(device=weight.device, dtype=torch.float32)
        return float((times_fit_matrix(delta, hess, damping, shrink) * delta).sum())
