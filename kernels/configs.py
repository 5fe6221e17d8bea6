"""Launch configurations of Shears' Triton kernels, and the candidates the dispatcher tunes over.

Tuning is keyed on (layout, N, K, M bucket, dtype, device) by the dispatcher (dispatch.py), which times
these candidates against dense cuBLAS and torch's semi-structured 2:4 and caches the fastest. No triton
import here: the dispatcher and the benchmark read configs on machines without triton.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

M_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096)
BITMASK_CHUNK = 128  # columns per in-memory value offset of the bitmask kernels; BLOCK_K is a multiple


def interpreting() -> bool:
    """Whether Triton kernels run under its CPU interpreter (TRITON_INTERPRET=1, read when triton loads)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def m_bucket(m: int) -> int:
    """The smallest bucket >= m (the largest bucket for anything bigger)."""
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


@dataclass(frozen=True)
class KernelConfig:
    """One launch: block_m == 1 is the GEMV kernel (one program per input row), else the tl.dot kernel."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    @property
    def gemv(self) -> bool:
        return self.block_m == 1

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"m{self.block_m}n{self.block_n}k{self.block_k}s{self.split_k}"
            f"w{self.num_warps}st{self.num_stages}"
        )


def split_tiles(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(splits actually launched, K tiles per split): no split is left without a tile."""
    tiles = max(1, -(-k // block_k))
    per_split = -(-tiles // max(1, min(split_k, tiles)))
    return -(-tiles // per_split), per_split


def _split_for(n: int, k: int, block_n: int, block_k: int, programs_wanted: int) -> int:
    """Smallest power-of-two split-K that launches about `programs_wanted` programs (fills the GPU)."""
    row_blocks = -(-n // block_n)
    split = 1
    while row_blocks * split < programs_wanted and split * 2 * block_k <= k and split < 32:
        split *= 2
    return split


@dataclass(frozen=True)
class Launches:
    """The launches one packed layout's kernels are tuned over (formats registry: Format.launches).

    Tables of (block_n, block_k, num_warps) for the decode GEMV (M = 1) and tl.dot (M <= 16)
    kernels and (block_m, block_n, block_k, num_warps, num_stages) for prefill; each compiles for
    sm_90 without register spills (checked with `python -m shears.kernels.aot_check --all`, which
    reports registers and stack). `fits(config, (n, m))` says whether a launch tiles the layout;
    `interpreter_block_k` is the block_k used under TRITON_INTERPRET.
    """

    decode_gemv: tuple[tuple[int, int, int], ...]
    decode_dot: tuple[tuple[int, int, int], ...]
    prefill: tuple[tuple[int, int, int, int, int], ...]
    fits: Callable[[KernelConfig, tuple[int, int]], bool]
    interpreter_block_k: int


def _fits_nm(config: KernelConfig, pattern: tuple[int, int]) -> bool:
    """Whole N:M groups and whole metadata words per K tile."""
    n, m = pattern
    per_word = 16 // (1 if m == 2 else 2 if m <= 4 else 4)
    return config.block_k % m == 0 and (config.block_k // m * n) % per_word == 0 and config.block_k >= 16


def _fits_bitmask(config: KernelConfig, pattern: tuple[int, int]) -> bool:
    """Whole bitmask chunks per K tile."""
    return config.block_k % BITMASK_CHUNK == 0


NM_LAUNCHES = Launches(
    decode_gemv=(
        (16, 256, 4),
        (32, 128, 4),
        (16, 512, 4),
        (32, 256, 4),
        (64, 128, 4),
        (64, 256, 8),
        (32, 512, 8),
    ),
    decode_dot=((32, 128, 4), (16, 256, 4), (64, 64, 4), (128, 64, 8), (32, 256, 8), (64, 128, 8)),
    prefill=((64, 128, 64, 8, 4), (128, 128, 32, 8, 3), (128, 64, 32, 8, 4), (64, 64, 32, 4, 4)),
    fits=_fits_nm,
    interpreter_block_k=64,
)
BITMASK_LAUNCHES = Launches(
    decode_gemv=((16, 128, 4), (8, 512, 4), (16, 256, 4), (32, 256, 8), (32, 128, 4), (64, 128, 8)),
    decode_dot=((16, 128, 4), (32, 128, 8), (16, 256, 4), (32, 128, 4), (64, 128, 8)),
    prefill=((64, 32, 128, 8, 2), (32, 32, 128, 4, 3)),
    fits=_fits_bitmask,
    interpreter_block_k=BITMASK_CHUNK,
)


def interpreter_config(m: int, launches: Launches) -> KernelConfig:
    """Small blocks for TRITON_INTERPRET (CPU): correctness, not speed; split-K 2 exercises the reduction."""
    return KernelConfig(1 if m == 1 else 16, 16, launches.interpreter_block_k, split_k=2)


def candidate_configs(
    n: int,
    k: int,
    m: int,
    launches: Launches,
    sm_count: int = 132,
    pattern: tuple[int, int] = (2, 4),
    per_kernel: int | None = None,
) -> list[KernelConfig]:
    """The launches worth timing for one (N, K, M) on a GPU with `sm_count` multiprocessors; with
    `per_kernel`, only the first that many of each kernel (GEMV, tl.dot): a smaller tuning space
    where compile time is short (`make gpu-check`).

    Decode (M <= 16) is memory-bound: split-K fills the GPU (about 4 programs per SM), capped so the
    fp32 partial sums stay small next to the weight. The GEMV kernel reads the weight once per x row,
    so it is a candidate at M = 1 only; 2 <= M <= 16 uses the tl.dot kernel with block_m 16. Prefill
    is compute-bound: tensor-core tiles, split-K only while the grid is small.
    """
    wanted = 4 * sm_count
    max_split = 1 << max(0, (k // (64 * m)).bit_length() - 1)  # a power of two <= K / (64 M)
    configs: list[KernelConfig] = []
    if m == 1:
        for block_n, block_k, warps in launches.decode_gemv:
            split = min(max_split, _split_for(n, k, block_n, block_k, wanted))
            configs.append(KernelConfig(1, block_n, block_k, split, warps, 3))
    if m <= 16:
        for block_n, block_k, warps in launches.decode_dot:
            split = min(max_split, _split_for(n, k, block_n, block_k, wanted))
            configs.append(KernelConfig(16, block_n, block_k, split, warps, 3))
    else:
        for block_m, block_n, block_k, warps, stages in launches.prefill:
            m_blocks = -(-m // block_m)
            split = 1
            if m_blocks * -(-n // block_n) < sm_count:
                split = min(max_split, _split_for(n, k, block_n, block_k, 2 * sm_count // m_blocks))
            configs.append(KernelConfig(block_m, block_n, block_k, split, warps, stages))
    configs = [c for c in configs if launches.fits(c, pattern)]
    if per_kernel is None:
        return configs
    gemv, dot = [c for c in configs if c.gemv], [c for c in configs if not c.gemv]
    return gemv[:per_kernel] + dot[:per_kernel]
