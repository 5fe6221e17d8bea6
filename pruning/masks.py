"""Pruning masks: which weights to zero, given per-weight scores (lower score = pruned first).

Every mask is exact (the requested count, never "about"), and ties are broken by position (the
lower flat index is pruned first), so the same scores give the same mask on CPU and CUDA.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from shears.errors import InvalidRequest
from shears.pattern import Pattern
from shears.pruning.linalg import all_finite


def check_pattern(shape: tuple[int, ...], pattern: Pattern, name: str) -> None:
    """Raise `InvalidRequest` if a [out, in] weight of `shape` cannot take `pattern`."""
    if len(shape) != 2:
        raise InvalidRequest(f"layer {name!r}: expected a 2-D [out, in] weight, got shape {tuple(shape)}")
    if not pattern.structured:
        return
    width = shape[1]
    if width % pattern.m != 0:
        raise InvalidRequest(
            f"layer {name!r} has input width {width}, which is not a multiple of M={pattern.m} "
            f"for pattern {pattern}: choose an N:M pattern whose M divides {width}, prune unstructured, "
            f"or add the layer to 'ignore'"
        )


def prune_mask(scores: Tensor, sparsity: float, pattern: Pattern, *, per_row: bool = False) -> Tensor:
    """Boolean mask (True = prune) of the lowest `scores` of a 2-D [out, in] score matrix.

    N:M: in every group of M consecutive input columns of each row, exactly M-N are pruned (the
    `sparsity` argument is then ignored: the pattern fixes it). Unstructured: exactly
    round(sparsity * in) per row if `per_row`, else exactly round(sparsity * numel) in the matrix.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out, in], got shape {tuple(scores.shape)}")
    # -0.0 and +0.0 compare equal but may sort apart on some backends; NaN would break the selection.
    scores = torch.nan_to_num(scores, nan=float("inf")) + 0.0
    if pattern.structured:
        rows, cols = scores.shape
        if cols % pattern.m:
            raise ValueError(f"input width {cols} is not a multiple of M={pattern.m} for pattern {pattern}")
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        return nm_group_mask(groups, pattern.m - pattern.n, dim=-1).reshape(rows, cols)
    _check_sparsity(sparsity)
    if per_row:
        return lowest_k_mask(scores, round(sparsity * scores.shape[1]), dim=1)
    return lowest_k_mask(scores.reshape(-1), round(sparsity * scores.numel()), dim=0).reshape(scores.shape)


GROUP_ROWS = 256  # rows argsorted at a time: argsort's int64 order is 8 bytes an entry


def nm_group_mask(groups: Tensor, prune: int, dim: int) -> Tensor:
    """Mask of the `prune` lowest entries along `dim` (a group of M); ties go to the lower index."""
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device)
    if dim % groups.dim() == 0:
        rows = [slice(None)]
    else:  # in slices of the first dimension: the sort's index buffer stays small on a large layer
        rows = [slice(start, start + GROUP_ROWS) for start in range(0, groups.shape[0], GROUP_ROWS)]
    for part in rows:
        order = torch.argsort(groups[part], dim=dim, stable=True).narrow(dim, 0, prune)
        mask[part].scatter_(dim, order, True)
    return mask


SAMPLE_SIZE = 1 << 18  # scores a large selection's threshold is bracketed (or estimated) from
EXACT_BELOW = 1 << 21  # 1-D selections at most this long use torch.kthvalue directly


def sample_of(values: Tensor, count: int = SAMPLE_SIZE) -> Tensor:
    """`count` entries of a 1-D tensor drawn uniformly with a fixed seed: deterministic, and free of the
    aliasing of a strided sample (a stride that divides the row length samples the same few columns
    of every row, and columns differ in scale)."""
    return values[_sample_indices(values.numel(), count, values.device)]


@functools.lru_cache(maxsize=4)
def _sample_indices(numel: int, count: int, device: torch.device) -> Tensor:
    """The indices `sample_of` draws (2 MiB; read-only): drawn once per size, not at each of ADMM's
    projections (the draw cost as much as the gather)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(numel, (count,), generator=generator).to(device)


def kth_smallest(values: Tensor, k: int) -> Tensor:
    """The k-th smallest entry (1-based) of a 1-D tensor: the value torch.kthvalue returns.

    For a long tensor, without kthvalue's full copy and int64 index buffer (12 bytes an entry: 140 MB
    for a 2048 x 5632 layer): a uniform sample brackets the k-th value between two of its quantiles,
    one pass counts the entries below the bracket, and kthvalue runs on the ~1% inside it. A bracket
    that misses (it should not: its margin is 6 standard deviations) falls back to the full kthvalue.
    """
    n = values.numel()
    if n <= EXACT_BELOW:
        return torch.kthvalue(values, k).values
    sample = sample_of(values)
    size = sample.numel()
    fraction = k / n
    margin = 6.0 * (size * fraction * (1.0 - fraction)) ** 0.5 + 8.0
    low_rank, high_rank = round(fraction * size - margin), round(fraction * size + margin)
    low = torch.kthvalue(sample, low_rank).values if low_rank >= 1 else values.new_tensor(-torch.inf)
    high = torch.kthvalue(sample, high_rank).values if high_rank <= size else values.new_tensor(torch.inf)
    below = int(count_true(values < low, 0))
    window = values[(values >= low) & (values <= high)]
    if below < k <= below + window.numel():
        return torch.kthvalue(window, k - below).values
    return torch.kthvalue(values, k).values


def lowest_k_mask(scores: Tensor, k: int, dim: int) -> Tensor:
    """Mask of exactly the `k` lowest entries along `dim` of a 1-D or 2-D tensor.

    A k-th value threshold (linear time, no full sort) plus tie resolution by position: entries
    equal to the threshold are taken in index order until the count is exact.
    """
    length = scores.shape[dim]
    if not 0 <= k <= length:
        raise ValueError(f"cannot prune {k} of {length} entries")
    if k == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k == length:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if scores.dim() == 1:
        threshold = kth_smallest(scores, k).reshape(1)
    else:
        threshold = torch.kthvalue(scores, k, dim=dim, keepdim=True).values
    below = scores < threshold
    missing = k - count_true(below, dim)
    ties = scores == threshold
    if bool((count_true(ties, dim) == missing).all()):  # the usual case: no tie to split
        return below | ties
    return below | (ties & (torch.cumsum(ties, dim=dim) <= missing))


def apply_mask(weight: Tensor, mask: Tensor) -> Tensor:
    """A new tensor: `weight` with the masked entries set to +0.0 (and no -0.0 anywhere)."""
    # x + 0.0 turns -0.0 into +0.0 and leaves every other value alone (packed formats need +0.0).
    return torch.where(mask, 0, weight).add_(0.0)


def count_true(mask: Tensor, dim: int) -> Tensor:
    """`mask.sum(dim, keepdim=True)` of a bool tensor, as bytes into int32 where the count fits (2x
    faster than summing bools on the CPUs here)."""
    dtype = torch.int32 if mask.shape[dim] < 2**31 else torch.int64
    return mask.view(torch.uint8).sum(dim=dim, keepdim=True, dtype=dtype)


def achieved_sparsity(weight: Tensor) -> float:
    """Fraction of entries that are exactly zero."""
    if weight.numel() == 0:
        return 0.0
    return 1.0 - int(torch.count_nonzero(weight)) / weight.numel()


def satisfies_pattern(weight: Tensor, pattern: Pattern) -> bool:
    """True if every group of M consecutive input weights has at least M-N zeros (always, unstructured)."""
    if not pattern.structured:
        return True
    if weight.dim() < 1 or weight.shape[-1] % pattern.m:
        return False
    zeros = (weight.reshape(-1, pattern.m) == 0).sum(dim=1)
    return bool((zeros >= pattern.m - pattern.n).all())


def check_solver_args(
    weight: Tensor, sparsity: float, pattern: Pattern, hessian: Tensor | None = None
) -> None:
    """The checks every solver makes: a finite 2-D weight, a sparsity the pattern agrees with, and
    (solvers that read one) a Hessian of the weight's input width."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if hessian is not None and hessian.shape != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, the weight needs ({cols}, {cols})")
    check_pattern(tuple(weight.shape), pattern, "weight")
    if pattern.structured:
        if abs(sparsity - pattern.sparsity) > 1e-6:
            raise ValueError(f"pattern {pattern} fixes sparsity at {pattern.sparsity:g}, got {sparsity:g}")
    else:
        _check_sparsity(sparsity)
    if not all_finite(weight):
        raise ValueError("weight has NaN or infinite entries; the model's weights are broken")


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be within [0, 1], got {sparsity}")
