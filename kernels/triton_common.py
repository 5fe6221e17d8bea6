"""What both Triton matmul modules share: the split-K epilogue and its buffers.

Split-K without extra launches: every program stores its fp32 partial tile, then takes a ticket from a
per-tile counter; the program that arrives last sums the partials in split order (deterministic) and
writes the output, then resets the counter to zero for the next launch. A separate reduction kernel
would cost a launch plus a round trip, about the whole budget of a 5 us decode GEMV.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters, one per output tile; kept per device (the kernels leave them at zero)."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < tiles:
        counters = torch.zeros(max(tiles, 1 << 14), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters


def output_buffers(x: torch.Tensor, rows: int, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [M, N] in x's dtype, fp32 partials [splits, M, N] or a 1-element dummy when splits == 1)."""
    out = torch.empty(x.shape[0], rows, dtype=x.dtype, device=x.device)
    if splits == 1:
        return out, torch.empty(1, dtype=torch.float32, device=x.device)
    return out, torch.empty(splits, x.shape[0], rows, dtype=torch.float32, device=x.device)


@triton.jit
def accumulate_tile(
    acc,
    w,
    x_ptr,
    x_rows,
    m_mask,
    t,
    K,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """acc + x[:, tile t] @ w^T for a weight tile `w` [BLOCK_N, BLOCK_K] already expanded to dense."""
    offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
    xt = tl.load(
        x_ptr + x_rows[:, None] + offs_k[None, :], mask=m_mask[:, None] & (offs_k[None, :] < K), other=0.0
    )
    if UPCAST:  # the interpreter's bf16 tl.dot returns garbage (triton 3.9): multiply in fp32 there
        acc = tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(xt, tl.trans(w), acc, input_precision="ieee")
    else:
        acc = tl.dot(xt, tl.trans(w), acc)
    return acc


@triton.jit
def store_split_k(
    acc,
    out_ptr,
    partial_ptr,
    counter_ptr,
    tile_id,
    pid_k,
    splits,
    out_offs,
    mask,
    plane,
    USE_SPLIT: tl.constexpr,
):
    """Write `acc` (fp32) to out_ptr + out_offs, reducing over the split-K programs of this tile."""
    if USE_SPLIT:
        tl.store(partial_ptr + pid_k.to(tl.int64) * plane + out_offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the release below
        arrived = tl.atomic_add(counter_ptr + tile_id, 1, sem="acq_rel")
        if arrived == splits - 1:
            total = tl.zeros_like(acc)
            for s in range(0, splits):
                total += tl.load(
                    partial_ptr + s * plane + out_offs, mask=mask, other=0.0, cache_modifier=".cg"
                )
            tl.store(out_ptr + out_offs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter_ptr + tile_id, 0)
    else:
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
