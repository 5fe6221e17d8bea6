"""SparseGPT (Frantar & Alistarh 2023): prune column by column, pushing each error onto later columns.

Follows IST-DASLab/sparsegpt with the fixes of docs/reference section 3: dead inputs handled,
damping retried instead of an identity fallback, exact per-layer sparsity, no caller tensor mutated.
The work runs in the transposed [in, out] layout so that one input column is one contiguous row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from shears.pattern import Pattern
from shears.pruning.linalg import all_finite
from shears.pruning.masks import check_solver_args, lowest_k_mask, nm_group_mask
from shears.pruning.solvers.admm import PreparedADMM, admm_prune, prepare_admm
from shears.pruning.solvers.reconstruct import reconstruct_masked, refit_matmul_dtype
from shears.pruning.stats import ieee_fp32_matmul

if TYPE_CHECKING:  # the options model needs pydantic; the solver runs without it (the GPU check)
    from shears.pruning.methods import SparseGPTOptions

log = logging.getLogger(__name__)

DAMP_RETRIES = 4  # damp, 10x, 100x, 1000x, 10000x
FLIP_ROWS = 256  # rows of H reversed per copy


@torch.no_grad()
def inverse_hessian_factor(
    hessian: Tensor, damp: float, retries: int = DAMP_RETRIES, dead: Tensor | None = None
) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of (H + d * mean(diag H) * I)^-1 and the relative damping d used.

    `hessian` is read, never written; `dead` (inputs that never fired) get H_ii = 1 in the copy.
    d starts at `damp` and grows 10x per failed attempt; if every attempt fails, RuntimeError (never
    the identity: that would be magnitude pruning). U comes from one Cholesky and one triangular
    inverse, without forming H^-1: with P the index reversal and P H P = L L^T,
    H^-1 = (P L^-1 P)^T (P L^-1 P) and P L^-1 P is upper.

    Memory: K x K buffers dominate a block's peak (127 MiB each at K = 5632), so the work happens
    in two of them besides `hessian`: the reversed, damped copy becomes L in place, an identity
    becomes L^-1 in place and is reversed in place into U (returned column-major).
    """
    if not all_finite(hessian):
        raise RuntimeError(
            "SparseGPT: the Hessian has NaN or infinite entries (the layer's inputs overflowed)"
        )
    diagonal = hessian.diagonal() if dead is None else torch.where(dead, 1.0, hessian.diagonal())
    scale = diagonal.abs().mean()
    size = hessian.shape[0]
    relative = damp
    for attempt in range(retries + 1):
        # P H P, the only copy of H, column-major: LAPACK's layout, so the Cholesky runs in place.
        work = torch.empty_strided((size, size), (1, size), dtype=hessian.dtype, device=hessian.device)
        for start in range(0, size, FLIP_ROWS):  # in slices: a whole flipped temporary is a third buffer
            end = min(start + FLIP_ROWS, size)
            work[start:end].copy_(hessian[size - end : size - start].flip(0, 1))
        if dead is not None:
            work.diagonal().copy_(diagonal.flip(0))
        work.diagonal().add_(relative * scale)
        _, info = torch.linalg.cholesky_ex(work, out=(work, torch.empty((), dtype=torch.int32)))
        if int(info) == 0:
            # Solved into the transposed view of an identity: column-major, as LAPACK writes it, so
            # the solve happens in place (and gives the bits of an out-of-place solve).
            buffer = torch.eye(size, dtype=work.dtype, device=work.device)
            upper = buffer.mT
            torch.linalg.solve_triangular(work, upper, upper=False, out=upper)
            del work
            reverse_in_place(buffer)  # P L^-1 P
            if bool(torch.isfinite(upper.diagonal()).all()) and bool((upper.diagonal() > 0).all()):
                if attempt:
                    log.warning("SparseGPT: Hessian needed damping %g (asked for %g)", relative, damp)
                return upper, relative
            del upper, buffer
        else:
            del work
        relative *= 10
    raise RuntimeError(
        f"SparseGPT: the Hessian is not positive definite even with damping {relative / 10:g} x mean(diag H) "
        f"({retries + 1} attempts from {damp:g}); the calibration inputs of this layer are degenerate"
    )


def reverse_in_place(matrix: Tensor, chunk: int = 1 << 18) -> None:
    """matrix.copy_(matrix.flip(0, 1)) for a contiguous matrix, with chunk-sized temporaries only.

    Flipping both axes of a contiguous matrix reverses its flat storage: swap mirrored chunks.
    """
    flat = matrix.view(-1)
    total = flat.numel()
    for start in range(0, total // 2, chunk):
        end = min(start + chunk, total // 2)
        head = flat[start:end].flip(0)
        flat[start:end] = flat[total - end : total - start].flip(0)
        flat[total - end : total - start] = head


@dataclass(frozen=True)
class PreparedHessian:
    """What SparseGPT derives from a Hessian before touching weights; layers sharing an input
    (q/k/v, gate/up) share one, so the factorisation runs once per input, not once per layer."""

    hinv: Tensor  # upper Cholesky factor of the damped inverse
    dead: Tensor  # inputs that never fired
    damping: float  # the absolute value added to H's diagonal (after any retries)


Prepared = PreparedHessian | PreparedADMM


@torch.no_grad()
def prepare_hessian(hessian: Tensor, damp: float, device: torch.device | None = None) -> PreparedHessian:
    with ieee_fp32_matmul():
        hess = hessian.detach().to(device=device or hessian.device, dtype=torch.float32)  # no copy if fp32
        dead = hess.diagonal() == 0
        hinv, relative = inverse_hessian_factor(hess, damp, dead=dead)
        damping = relative * float(torch.where(dead, 1.0, hess.diagonal()).abs().mean())
    return PreparedHessian(hinv, dead, damping)


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    pattern: Pattern,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    prepared: PreparedHessian | None = None,
    refine_iterations: int = 0,
    refit_damp: float | None = None,
    refit_dtype: torch.dtype = torch.float32,
    refit_shrink: float = 0.0,
) -> Tensor:
    """A new [out, in] tensor in `weight`'s dtype and device: pruned, with kept weights updated.

    With `refine_iterations` > 0 the kept weights are then re-fitted to the final mask
    (solvers.reconstruct) under damping `refit_damp` (relative, like `damp`; default: `damp`) and
    H shrunk towards its diagonal by `refit_shrink`; 0 is the algorithm of the paper.

    Unstructured: round(sparsity * numel) zeros in all (the count of each block of columns is set
    so that the block totals add up to it exactly), chosen per block from the updated weights.
    N:M: M-N zeros in every group of M consecutive input weights of a row, chosen group by group.
    Inputs that never fired (diag H == 0) get their weight column zeroed, which may add zeros.
    """
    check_solver_args(weight, sparsity, pattern, hessian)
    rows, cols = weight.shape
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if pattern.structured:  # a group of M must not straddle two blocks
        block_size = -(-block_size // pattern.m) * pattern.m
    device = weight.device

    prepared = prepared or prepare_hessian(hessian, damp, device)
    hinv, dead = prepared.hinv, prepared.dead
    with ieee_fp32_matmul():
        # [in, out], a private fp32 copy; dead input columns start at zero.
        work = (
            weight.detach()
            .to(device=device, dtype=torch.float32)
            .T.clone(memory_format=torch.contiguous_format)
        )
        work.masked_fill_(dead[:, None], 0.0)
        for start in range(0, cols, block_size):
            end = min(start + block_size, cols)
            # Block quotas from the rounded running total: they add up to round(sparsity * numel).
            quota = (
                None if pattern.structured else round(sparsity * rows * end) - round(sparsity * rows * start)
            )
            _prune_block(work, hinv, start, end, pattern, quota)
        result = work.T.to(weight.dtype).add_(0.0)  # -0.0 (also from a fp16 underflow) -> +0.0
        del work
    if refine_iterations:
        hess = hessian.detach().to(device=device, dtype=torch.float32)
        # The same relative scaling as SparseGPT's damping (including any retry's increase).
        damping = prepared.damping if refit_damp is None else prepared.damping * refit_damp / damp
        result = reconstruct_masked(
            weight, result, hess, damping, refine_iterations, matmul_dtype=refit_dtype, shrink=refit_shrink
        )
    return result.contiguous()


def _prune_block(
    work: Tensor, hinv: Tensor, start: int, end: int, pattern: Pattern, count: int | None
) -> None:
    """Prune input columns [start, end) of `work` [in, out] in place and update the later columns."""
    block = work[start:end]  # a view: updates land in `work`
    hinv_block = hinv[start:end, start:end]
    diag = hinv_block.diagonal()
    width = end - start
    if count is not None:  # unstructured: this block's quota, from the weights as updated so far
        mask = lowest_k_mask((block.square() / diag[:, None].square()).reshape(-1), count, dim=0)
        mask = mask.reshape(block.shape)
        scale = mask / diag[:, None]
    else:
        mask = torch.zeros(block.shape, dtype=torch.bool, device=work.device)
        scale = torch.zeros(block.shape, dtype=torch.float32, device=work.device)
    errors = torch.empty_like(block)
    m = pattern.m
    for i in range(width):
        if count is None and i % m == 0:
            saliency = block[i : i + m].square() / diag[i : i + m, None].square()
            group = nm_group_mask(saliency, m - pattern.n, dim=0)
            mask[i : i + m] = group
            torch.div(group, diag[i : i + m, None], out=scale[i : i + m])
        # err = (w - w_pruned) / U_jj, pushed onto the columns right of i within the block.
        torch.mul(block[i], scale[i], out=errors[i])
        if i + 1 < width:
            # addmm_ with k = 1 rather than addr_: the same rank-1 update, 2x faster on CPU (BLAS gemm)
            block[i + 1 :].addmm_(hinv_block[i, i + 1 :, None], errors[i, None], alpha=-1)
    block.masked_fill_(mask, 0.0)
    if end < work.shape[0]:  # one big update of every later column
        work[end:].addmm_(hinv[start:end, end:].T, errors, alpha=-1)


def prepare(statistic: Tensor, options: SparseGPTOptions, device: torch.device) -> Prepared:
    """Once per shared input: SparseGPT's inverse factor, or ADMM's shifted inverse."""
    if options.variant == "admm":
        dtype = refit_matmul_dtype(options.admm_precision, device)
        return prepare_admm(
            statistic,
            options.refit_damp,
            options.admm_rho,
            device,
            matmul_dtype=dtype,
            shrink=options.refit_shrink,
        )
    return prepare_hessian(statistic, options.damp, device)


def solve(
    weight: Tensor,
    sparsity: float,
    pattern: Pattern,
    statistic: Tensor,
    options: SparseGPTOptions,
    prepared: Prepared | None,
) -> Tensor:
    """METHODS["sparsegpt"]: the statistic is the layer's Hessian; options.variant picks the solver."""
    if options.variant == "admm":
        assert prepared is None or isinstance(prepared, PreparedADMM)
        return admm_prune(
            weight,
            statistic,
            sparsity,
            pattern,
            iterations=options.admm_iterations,
            rho=options.admm_rho,
            damp=options.refit_damp,
            refine_iterations=options.refine_iterations,
            prepared=prepared,
            refit_dtype=refit_matmul_dtype(options.refit_precision, weight.device),
            shrink=options.refit_shrink,
        )
    assert prepared is None or isinstance(prepared, PreparedHessian)
    return sparsegpt_prune(
        weight,
        statistic,
        sparsity,
        pattern,
        block_size=options.block_size,
        damp=options.damp,
        prepared=prepared,
        refine_iterations=0 if options.variant == "paper" else options.refine_iterations,
        refit_damp=options.refit_damp,
        refit_dtype=refit_matmul_dtype(options.refit_precision, weight.device),
        refit_shrink=options.refit_shrink,
    )


@torch.no_grad()
def layer_error(
    weight: Tensor,
    pruned: Tensor,
    hessian: Tensor,
    *,
    max_rows: int | None = None,
    matmul_dtype: torch.dtype = torch.float32,
) -> float:
    """Relative reconstruction error tr(dW H dW^T) / tr(W H W^T) = ||WX - W'X||^2 / ||WX||^2.

    `max_rows`: on a layer with more rows, both traces are taken over every k-th row only (at most
    `max_rows`, evenly strided, deterministic): an estimate, at a fraction of the 2 x rows x K^2
    flops of the exact value (at hidden 2048 the exact value of every layer cost 10% of a job).
    `matmul_dtype`: bf16 runs the two products in bf16 (fp32 accumulation; the operands rounded, so
    ~2^-8 relative on the result): a report's estimate where bf16 is fast (4x at K = 8192 on an
    AVX512-BF16 CPU, where the fp32 products of 512 rows cost 0.8 s a down projection).
    """
    rows = weight.shape[0]
    if max_rows is not None and rows > max_rows:
        stride = -(-rows // max_rows)
        weight, pruned = weight[::stride], pruned[::stride]
    with ieee_fp32_matmul():
        hess = hessian.detach().to(device=weight.device, dtype=torch.float32)
        w = weight.detach().to(torch.float32)
        delta = w - pruned.detach().to(device=weight.device, dtype=torch.float32)
        product = hess.to(matmul_dtype)
        numerator = float(((delta.to(matmul_dtype) @ product).float() * delta).sum())
        denominator = float(((w.to(matmul_dtype) @ product).float() * w).sum())
    if denominator == 0:
        return 0.0 if numerator == 0 else float("inf")
    return numerator / denominator
