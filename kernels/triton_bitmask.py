"""Triton bitmask (unstructured) sparse x dense matmul: y[M, N] = x[M, K] @ W[N, K]^T, W a PackedBitmask.

Load as sparse, compute as dense (Flash-LLM): each program reads the mask bytes of its [BLOCK_N,
BLOCK_K] tile, turns them into bits, ranks the set bits inside every chunk of BITMASK_CHUNK columns
(an in-register cumsum) and gathers the non-zeros from `values` at chunk offset + rank; the tile is
then multiplied densely (GEMV: multiply + row sum; GEMM: tl.dot), split-K fused as in triton_common.
The per-chunk offsets (int32, one per
BITMASK_CHUNK columns of a row, 0.25 bit per weight) are derived from the file's bitmask at load time
by `chunk_offsets`, so a program finds its values without scanning the row before it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shears.kernels.configs import BITMASK_CHUNK, KernelConfig, interpreting, split_tiles
from shears.kernels.formats import PackedBitmask, row_popcounts
from shears.kernels.triton_common import (
    SUPPORTED_DTYPES,
    accumulate_tile,
    output_buffers,
    store_split_k,
    tile_counters,
)


def supports(packed: PackedBitmask, dtype: torch.dtype) -> bool:
    return dtype in SUPPORTED_DTYPES and packed.values.numel() < 2**31


def chunk_offsets(packed: PackedBitmask, chunk: int = BITMASK_CHUNK) -> torch.Tensor:
    """int32 [N, ceil(K/chunk)]: index in `values` of the first non-zero of every chunk of every row."""
    rows, cols = packed.shape
    chunk_bytes = chunk // 8
    chunks = -(-cols // chunk)
    padded = torch.zeros(rows, chunks * chunk_bytes, dtype=torch.uint8, device=packed.device)
    padded[:, : packed.bitmask.shape[1]] = packed.bitmask
    counts = row_popcounts(padded.view(rows * chunks, chunk_bytes)).view(rows, chunks)
    before = torch.cumsum(counts, 1) - counts
    return (before + packed.row_offsets[:-1, None]).to(torch.int32).contiguous()


@triton.jit
def _bitmask_tile(
    bits_ptr,
    vals_ptr,
    chunk_ptr,
    rows,
    row_mask,
    t,
    stride_b,
    stride_c,
    bytes_per_row,
    chunks_per_row,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The dense [BLOCK_N, BLOCK_K] tile t of the packed rows `rows`, in the values' dtype."""
    BYTES: tl.constexpr = BLOCK_K // 8
    CHUNKS: tl.constexpr = BLOCK_K // CHUNK
    offs_b = t * BYTES + tl.arange(0, BYTES)
    byte = tl.load(
        bits_ptr + rows[:, None] * stride_b + offs_b[None, :],
        mask=row_mask[:, None] & (offs_b[None, :] < bytes_per_row),
        other=0,
    ).to(tl.int32)
    bit = (byte[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    bit = tl.reshape(bit, (BLOCK_N, CHUNKS, CHUNK))
    rank = tl.cumsum(bit, axis=2) - bit
    offs_c = t * CHUNKS + tl.arange(0, CHUNKS)
    base = tl.load(
        chunk_ptr + rows[:, None] * stride_c + offs_c[None, :],
        mask=row_mask[:, None] & (offs_c[None, :] < chunks_per_row),
        other=0,
    ).to(tl.int64)
    w = tl.load(vals_ptr + base[:, :, None] + rank, mask=bit != 0, other=0.0)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _bitmask_gemv_kernel(
    x_ptr,
    bits_ptr,
    vals_ptr,
    chunk_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    N,
    K,
    bytes_per_row,
    chunks_per_row,
    stride_xm,
    stride_b,
    stride_c,
    plane,
    tiles_per_split,
    splits,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_SPLIT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced once, after the loop
    t_start = pid_k * tiles_per_split
    t_stop = tl.minimum(t_start + tiles_per_split, tl.cdiv(K, BLOCK_K))
    for t in range(t_start, t_stop):
        w = _bitmask_tile(
            bits_ptr,
            vals_ptr,
            chunk_ptr,
            rows,
            n_mask,
            t,
            stride_b,
            stride_c,
            bytes_per_row,
            chunks_per_row,
            CHUNK,
            BLOCK_N,
            BLOCK_K,
        ).to(tl.float32)
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + row * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        acc += w * xv[None, :]
    tile_id = tl.program_id(1) * tl.num_programs(0) + pid_n
    store_split_k(
        tl.sum(acc, axis=1),
        out_ptr,
        partial_ptr,
        counter_ptr,
        tile_id,
        pid_k,
        splits,
        row * N + offs_n,
        n_mask,
        plane,
        USE_SPLIT,
    )


@triton.jit
def _bitmask_gemm_kernel(
    x_ptr,
    bits_ptr,
    vals_ptr,
    chunk_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    M,
    N,
    K,
    bytes_per_row,
    chunks_per_row,
    stride_xm,
    stride_b,
    stride_c,
    plane,
    tiles_per_split,
    splits,
    CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    x_rows = offs_m.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_start = pid_k * tiles_per_split
    t_stop = tl.minimum(t_start + tiles_per_split, tl.cdiv(K, BLOCK_K))
    for t in range(t_start, t_stop):
        w = _bitmask_tile(
            bits_ptr,
            vals_ptr,
            chunk_ptr,
            rows,
            n_mask,
            t,
            stride_b,
            stride_c,
            bytes_per_row,
            chunks_per_row,
            CHUNK,
            BLOCK_N,
            BLOCK_K,
        )
        acc = accumulate_tile(acc, w, x_ptr, x_rows, m_mask, t, K, BLOCK_K, IEEE, UPCAST)
    tile_id = pid_m * tl.num_programs(0) + pid_n
    out_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    store_split_k(
        acc,
        out_ptr,
        partial_ptr,
        counter_ptr,
        tile_id,
        pid_k,
        splits,
        out_offs,
        m_mask[:, None] & n_mask[None, :],
        plane,
        USE_SPLIT,
    )


def bitmask_matmul(
    x: torch.Tensor, packed: PackedBitmask, config: KernelConfig, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ unpack(packed)^T for a 2-D x [M, K]; `offsets` from chunk_offsets (computed if absent)."""
    rows, cols = packed.shape
    if x.dim() != 2 or x.shape[1] != cols:
        raise ValueError(f"x must be [M, {cols}]; got {tuple(x.shape)}")
    if x.dtype != packed.dtype or not supports(packed, x.dtype):
        raise ValueError(f"no Triton bitmask kernel for {packed.dtype} weights with {x.dtype} input")
    if config.block_k % BITMASK_CHUNK:
        raise ValueError(f"block_k {config.block_k} must be a multiple of {BITMASK_CHUNK}")
    offsets = chunk_offsets(packed) if offsets is None else offsets
    x = x.contiguous()
    m_rows = x.shape[0]
    splits, per_split = split_tiles(cols, config.block_k, config.split_k)
    out, partial = output_buffers(x, rows, splits)
    if m_rows == 0:
        return out
    bitmask, values = packed.bitmask.contiguous(), packed.values.contiguous()
    row_blocks = triton.cdiv(rows, config.block_n)
    m_blocks = m_rows if config.gemv else triton.cdiv(m_rows, config.block_m)
    counters = tile_counters(x.device, row_blocks * m_blocks)
    args = (x, bitmask, values, offsets, out, partial, counters)
    shape = (
        rows,
        cols,
        bitmask.shape[1],
        offsets.shape[1],
        x.stride(0),
        bitmask.stride(0),
        offsets.stride(0),
        m_rows * rows,
        per_split,
        splits,
    )
    constants = dict(
        CHUNK=BITMASK_CHUNK,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        USE_SPLIT=splits > 1,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    grid = (row_blocks, m_blocks, splits)
    if config.gemv:
        _bitmask_gemv_kernel[grid](*args, *shape, **constants)
    else:
        _bitmask_gemm_kernel[grid](
            *args,
            m_rows,
            *shape,
            BLOCK_M=config.block_m,
            IEEE=x.dtype == torch.float32,
            UPCAST=interpreting() and x.dtype == torch.bfloat16,
            **constants,
        )
    return out


def aot_signature(
    config: KernelConfig, ty: str, n: int, m: int
) -> tuple[object, dict[str, str], list[str], dict[str, object]]:
    """(kernel, its own pointer types, its own int arguments, its constants) for aot_check."""
    kernel = _bitmask_gemv_kernel if config.gemv else _bitmask_gemm_kernel
    pointers = {"x_ptr": f"*{ty}", "bits_ptr": "*u8", "vals_ptr": f"*{ty}", "chunk_ptr": "*i32"}
    ints = ["N", "K", "bytes_per_row", "chunks_per_row", "stride_xm", "stride_b", "stride_c"]
    return kernel, pointers, ints, dict(CHUNK=BITMASK_CHUNK)


def prepare(packed: PackedBitmask) -> torch.Tensor:
    """registry.FORMATS["bitmask"]'s per-weight state: the chunk offsets."""
    return chunk_offsets(packed)


matmul = bitmask_matmul  # registry.FORMATS["bitmask"]'s kernel: (x, packed, config, offsets)
