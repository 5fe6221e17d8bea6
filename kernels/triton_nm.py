"""Triton N:M sparse x dense matmul: y[M, N] = x[M, K] @ W[N, K]^T with W packed as formats.PackedNM.

Upstream Triton has no sparse tensor-core path, so the kernels win by reading fewer bytes: metadata is
decoded in registers and the values are multiplied densely with fp32 accumulation.
- GEMV kernel (block_m == 1, decode): one x row per program; no dense tile, each kept value gathers
  the x element its index points at (x stays in L1), multiply + row sum.
- GEMM kernel (block_m >= 16): expands a [BLOCK_N, BLOCK_K] tile to dense in registers, then tl.dot.
Both split K over programs with the fused epilogue of triton_common (no extra launches).
Supports n, m powers of two with m <= 16 (1:2, 1:4, 2:4, 1:8, 2:8, 4:8, ...), fp16/bf16/fp32 in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shears.kernels.configs import KernelConfig, interpreting, split_tiles
from shears.kernels.formats import (
    PackedNM,
    index_bits,
    indices_per_word,
    nm_metadata_columns,
    nm_value_columns,
)
from shears.kernels.triton_common import (
    SUPPORTED_DTYPES,
    accumulate_tile,
    output_buffers,
    store_split_k,
    tile_counters,
)


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def supports(packed: PackedNM, dtype: torch.dtype) -> bool:
    return _pow2(packed.n) and _pow2(packed.m) and packed.m <= 16 and dtype in SUPPORTED_DTYPES


@triton.jit
def _nm_indices(
    meta_ptr,
    rows,
    row_mask,
    t,
    stride_meta,
    words_per_row,
    VALUES: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """In-group indices [BLOCK_N, VALUES] of the kept values of K tile t, decoded from the metadata words."""
    PER_WORD: tl.constexpr = 16 // BITS
    WORDS: tl.constexpr = VALUES // PER_WORD
    offs_w = t * WORDS + tl.arange(0, WORDS)
    words = tl.load(
        meta_ptr + rows[:, None] * stride_meta + offs_w[None, :],
        mask=row_mask[:, None] & (offs_w[None, :] < words_per_row),
        other=0,
    ).to(tl.int32)
    shifts = tl.arange(0, PER_WORD) * BITS
    return tl.reshape((words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), (BLOCK_N, VALUES))


@triton.jit
def _nm_gemv_kernel(
    x_ptr,
    vals_ptr,
    meta_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    N,
    K,
    values_per_row,
    words_per_row,
    stride_xm,
    stride_v,
    stride_meta,
    plane,
    tiles_per_split,
    splits,
    NKEEP: tl.constexpr,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_SPLIT: tl.constexpr,
):
    VALUES: tl.constexpr = BLOCK_K // GROUP * NKEEP
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    x_row = x_ptr + row * stride_xm
    local = tl.arange(0, VALUES)
    group_col = (local // NKEEP) * GROUP
    acc = tl.zeros((BLOCK_N, VALUES), dtype=tl.float32)  # reduced once, after the loop
    t_start = pid_k * tiles_per_split
    t_stop = tl.minimum(t_start + tiles_per_split, tl.cdiv(K, BLOCK_K))
    for t in range(t_start, t_stop):
        offs_v = t * VALUES + local
        v_mask = n_mask[:, None] & (offs_v[None, :] < values_per_row)
        v = tl.load(vals_ptr + rows[:, None] * stride_v + offs_v[None, :], mask=v_mask, other=0.0)
        idx = _nm_indices(meta_ptr, rows, n_mask, t, stride_meta, words_per_row, VALUES, BITS, BLOCK_N)
        xv = tl.load(x_row + t * BLOCK_K + group_col[None, :] + idx, mask=v_mask, other=0.0)
        acc += v.to(tl.float32) * xv.to(tl.float32)
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
def _nm_dense_tile(
    vals_ptr,
    meta_ptr,
    rows,
    row_mask,
    t,
    stride_v,
    stride_meta,
    values_per_row,
    words_per_row,
    NKEEP: tl.constexpr,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The dense [BLOCK_N, BLOCK_K] tile t of the packed rows, in the values' dtype."""
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    VALUES: tl.constexpr = GROUPS * NKEEP
    offs_v = t * VALUES + tl.arange(0, VALUES)
    v = tl.load(
        vals_ptr + rows[:, None] * stride_v + offs_v[None, :],
        mask=row_mask[:, None] & (offs_v[None, :] < values_per_row),
        other=0.0,
    )
    idx = tl.reshape(
        _nm_indices(meta_ptr, rows, row_mask, t, stride_meta, words_per_row, VALUES, BITS, BLOCK_N),
        (BLOCK_N, GROUPS, NKEEP),
    )
    v3 = tl.reshape(v, (BLOCK_N, GROUPS, NKEEP))
    pos = tl.arange(0, GROUP)
    # The indices of a group are distinct, so each dense slot receives at most one value: the sum is exact.
    dense = tl.sum(tl.where(idx[:, :, :, None] == pos[None, None, None, :], v3[:, :, :, None], 0.0), axis=2)
    return tl.reshape(dense, (BLOCK_N, BLOCK_K)).to(v.dtype)


@triton.jit
def _nm_gemm_kernel(
    x_ptr,
    vals_ptr,
    meta_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    M,
    N,
    K,
    values_per_row,
    words_per_row,
    stride_xm,
    stride_v,
    stride_meta,
    plane,
    tiles_per_split,
    splits,
    NKEEP: tl.constexpr,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
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
        w = _nm_dense_tile(
            vals_ptr,
            meta_ptr,
            rows,
            n_mask,
            t,
            stride_v,
            stride_meta,
            values_per_row,
            words_per_row,
            NKEEP,
            GROUP,
            BITS,
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


def nm_matmul(x: torch.Tensor, packed: PackedNM, config: KernelConfig) -> torch.Tensor:
    """y = x @ unpack(packed)^T for a 2-D x [M, K] of the weight's dtype, on the GPU (or the interpreter)."""
    rows, cols = packed.shape
    if x.dim() != 2 or x.shape[1] != cols:
        raise ValueError(f"x must be [M, {cols}]; got {tuple(x.shape)}")
    if x.dtype != packed.dtype or not supports(packed, x.dtype):
        raise ValueError(f"no Triton kernel for {packed.pattern} {packed.dtype} weights with {x.dtype} input")
    if (
        config.block_k % packed.m
        or config.block_k < 16
        or (config.block_k // packed.m * packed.n) % (indices_per_word(packed.m))
    ):
        raise ValueError(f"block_k {config.block_k} does not tile {packed.pattern} metadata words")
    x = x.contiguous()
    m_rows = x.shape[0]
    splits, per_split = split_tiles(cols, config.block_k, config.split_k)
    out, partial = output_buffers(x, rows, splits)
    if m_rows == 0:
        return out
    values, metadata = packed.values.contiguous(), packed.metadata.contiguous()
    row_blocks = triton.cdiv(rows, config.block_n)
    m_blocks = m_rows if config.gemv else triton.cdiv(m_rows, config.block_m)
    counters = tile_counters(x.device, row_blocks * m_blocks)
    args = (x, values, metadata, out, partial, counters)
    shape = (
        rows,
        cols,
        nm_value_columns(cols, packed.n, packed.m),
        nm_metadata_columns(cols, packed.n, packed.m),
        x.stride(0),
        values.stride(0),
        metadata.stride(0),
        m_rows * rows,
        per_split,
        splits,
    )
    constants = dict(
        NKEEP=packed.n,
        GROUP=packed.m,
        BITS=index_bits(packed.m),
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        USE_SPLIT=splits > 1,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    grid = (row_blocks, m_blocks, splits)
    if config.gemv:
        _nm_gemv_kernel[grid](*args, *shape, **constants)
    else:
        _nm_gemm_kernel[grid](
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
    kernel = _nm_gemv_kernel if config.gemv else _nm_gemm_kernel
    pointers = {"x_ptr": f"*{ty}", "vals_ptr": f"*{ty}", "meta_ptr": "*i16"}
    ints = ["N", "K", "values_per_row", "words_per_row", "stride_xm", "stride_v", "stride_meta"]
    return kernel, pointers, ints, dict(NKEEP=n, GROUP=m, BITS=index_bits(m))


def matmul(x: torch.Tensor, packed: PackedNM, config: KernelConfig, state: None = None) -> torch.Tensor:
    """registry.FORMATS["nm"]'s kernel (it derives nothing from a weight ahead of time)."""
    return nm_matmul(x, packed, config)
