"""Pure-torch reference implementations of every Shears kernel: the ground truth the Triton kernels are
tested against, and the path the dispatcher takes where no kernel runs (CPU, unsupported patterns).

Each computes y[M, N] = x[M, K] @ W[N, K]^T with W decoded from its packed form, fp32 accumulation,
output in x's dtype (as the kernels do). registry.reference_matmul picks the one of a weight's layout.
"""

from __future__ import annotations

import torch

from shears.kernels.formats import PackedBitmask, PackedNM, bitmask_bits, nm_indices


def tolerance(dtype: torch.dtype) -> float:
    """Relative error a kernel may show against these references: output rounding plus accumulation order."""
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def _matmul_fp32(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(accumulate) @ dense.to(accumulate).t()).to(x.dtype)


def nm_matmul_reference(x: torch.Tensor, packed: PackedNM) -> torch.Tensor:
    """Decode the metadata into column indices and scatter the values: independent of formats.unpack_nm."""
    rows, cols = packed.shape
    groups = cols // packed.m
    column = nm_indices(packed) + torch.arange(groups, device=packed.device).view(1, groups, 1) * packed.m
    dense = torch.zeros(rows, cols, dtype=packed.dtype, device=packed.device)
    dense.scatter_(1, column.reshape(rows, -1), packed.values)
    return _matmul_fp32(x, dense)


def bitmask_matmul_reference(x: torch.Tensor, packed: PackedBitmask) -> torch.Tensor:
    rows, cols = packed.shape
    dense = torch.zeros(rows, cols, dtype=packed.dtype, device=packed.device)
    dense[bitmask_bits(packed.bitmask, cols)] = packed.values
    return _matmul_fp32(x, dense)
