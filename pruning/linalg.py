"""Dense linear algebra the solvers share, in place: one K x K buffer, GEMM speed.

torch.cholesky_inverse (LAPACK's potri) is measured 7-10x slower than GEMMs of the same size on
the CPUs here (25 s vs 3 s at K = 4096, 2 cores), and out-of-place alternatives (a triangular solve
of an identity, then L^-T L^-1) need two more K x K buffers: at K = 5632 that is 254 MiB of a block's
peak. The blocked algorithms of LAPACK's trtri and lauum below do the same work as matrix products
on panels of BLOCK columns, overwriting the factor: one buffer and K x BLOCK temporaries.

Torch only (the statistics import it). On CUDA, callers hold stats.ieee_fp32_matmul: these products
are the factorisation itself, TF32 would spoil it.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 512  # panel width (measured at K = 4096: 128 4.3 s, 256 3.4 s, 512 2.5 s, 1024 2.7 s)


@torch.no_grad()
def invert_lower_(lower: Tensor, block: int = BLOCK) -> Tensor:
    """Overwrite a lower-triangular [K, K] matrix with its inverse (LAPACK's blocked trtri).

    The strictly upper triangle must be zero (torch's Cholesky writes it so) and stays zero. Panels
    right to left: the trailing part is already inverted, so the panel below the diagonal block
    becomes -inv(L22) L21 inv(L11) and the diagonal block its own inverse. inv(L22) L21 is taken a
    row block at a time over inv(L22)'s lower triangle only (half the flops of one GEMM over its
    zero upper half), bottom to top: a row block needs the panel's rows above it, still L21.
    """
    size = lower.shape[0]
    for start in range(((size - 1) // block) * block, -1, -block):
        end = min(start + block, size)
        diagonal = lower[start:end, start:end]
        if end < size:
            panel = lower[end:, start:end]
            for rows in range(((size - end - 1) // block) * block, -1, -block):
                stop = min(rows + block, size - end)
                panel[rows:stop] = lower[end + rows : end + stop, end : end + stop] @ panel[:stop]
            panel.copy_(torch.linalg.solve_triangular(diagonal, panel, upper=False, left=False)).neg_()
        eye = torch.eye(end - start, dtype=lower.dtype, device=lower.device)
        diagonal.copy_(torch.linalg.solve_triangular(diagonal, eye, upper=False))
    return lower


@torch.no_grad()
def gram_of_lower_(lower: Tensor, block: int = BLOCK) -> Tensor:
    """Overwrite a lower-triangular [K, K] matrix M with the symmetric M^T M (LAPACK's lauum).

    Row panels top to bottom: rows [i, i + block) of M^T M need only rows >= i of M, which are
    still M; the columns left of the panel mirror rows already written, so the result is exactly
    symmetric. Each column block j of the panel sums over rows >= j only (M is zero above its
    diagonal): half the flops of one product over all rows >= i.
    """
    size = lower.shape[0]
    for start in range(0, size, block):
        end = min(start + block, size)
        right = torch.empty(end - start, size - start, dtype=lower.dtype, device=lower.device)
        for column in range(start, size, block):
            stop = min(column + block, size)
            right[:, column - start : stop - start] = (
                lower[column:, start:end].T @ lower[column:, column:stop]
            )
        lower[start:end, start:] = right
        del right  # before the next panel's is allocated: one [block, K] temporary at a time
        tile = lower[start:end, start:end]  # its two halves summed in different orders: mirror one
        tile.copy_(tile.tril() + tile.tril(-1).T)
        if start:
            lower[start:end, :start] = lower[:start, start:end].T
    return lower


@torch.no_grad()
def mirror_lower_(matrix: Tensor, block: int = BLOCK) -> Tensor:
    """Copy the lower triangle of a square matrix onto its upper one, in place: exactly symmetric."""
    size = matrix.shape[0]
    for start in range(0, size, block):
        end = min(start + block, size)
        tile = matrix[start:end, start:end]
        tile.copy_(tile.tril() + tile.tril(-1).T)
        matrix[start:end, end:] = matrix[end:, start:end].T
    return matrix


@torch.no_grad()
def cholesky_inverse_(lower: Tensor, block: int = BLOCK) -> Tensor:
    """Overwrite the lower Cholesky factor L of A with A^-1 = L^-T L^-1, in place (see module doc)."""
    return gram_of_lower_(invert_lower_(lower, block), block)


def all_finite(tensor: Tensor) -> bool:
    """`torch.isfinite(tensor).all()` at the cost of a sum (isfinite is ~10x slower on the CPUs here):
    a NaN or an infinity makes the sum non-finite, and only a sum that overflows on finite entries
    takes the exact check."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def chunk_rows(columns: int, chunk_bytes: int = 4 * 2**20) -> int:
    """Rows of a [rows, columns] fp32 temporary of at most `chunk_bytes` (at least 16 rows).

    Row-chunked solvers keep their temporaries under glibc's mmap threshold (resources.tune_malloc:
    8 MiB), so they are reused from the heap instead of mapped and faulted in again each time
    (measured: an elementwise op that allocates a 64 MiB result costs 4x one in place).
    """
    return max(16, chunk_bytes // (4 * max(columns, 1)))
