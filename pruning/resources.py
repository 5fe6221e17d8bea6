"""Wall time and peak memory per phase, and the progress events that mark phase changes."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from shears.progress import Event, Phase, Reporter


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls beat fp32 on CPUs with AMX or AVX512-BF16 (about 6x on Sapphire Rapids)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def fast_matmul_dtype(device: torch.device) -> torch.dtype:
    """bf16 where its matmuls are fast (CUDA, CPUs with AMX/AVX512-BF16), else fp32."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return torch.float32


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only; other libcs lack it
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()


def release_freed_memory() -> None:
    """Hand memory freed by a finished block back to the OS.

    glibc keeps freed heap memory (and raises its mmap threshold after large frees), so the
    resident size of a block-by-block job would otherwise creep up with every block; malloc_trim
    returns it. A no-op where the C library has no malloc_trim.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers, from glibc's malloc.h
_M_ARENA_MAX = -8


def tune_malloc(arenas: int = 2, mmap_threshold: int = 8 * 2**20) -> None:
    """Make glibc hand large freed buffers back to the OS, and cap its per-thread arenas.

    glibc raises its mmap threshold after every large free (up to 32 MiB), so a block's Hessian
    and factor buffers (9 MiB each for a 1536-wide input) land on the heap between activations
    and stay resident after they are freed; a fixed threshold keeps them mmapped. Each of torch's
    worker threads also gets its own arena with its own freed temporaries. Measured on SmolLM2
    SparseGPT, 2 cores: peak RSS 791 -> 732 MiB with 2 arenas, -> about 660 MiB with the 8 MiB
    threshold too, for about 10% more pruning time (page faults on the big buffers). Applies to
    arenas and allocations after the call; a no-op outside glibc.
    """
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_ARENA_MAX, arenas)
        _LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PhaseClock:
    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.seconds: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self.peak_cuda_mb: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: Phase, message: str = "") -> Iterator[None]:
        self.reporter(Event("phase", phase=name, message=message or name))
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.peak_rss_mb[name] = peak_rss_mb()
            if cuda:
                self.peak_cuda_mb[name] = torch.cuda.max_memory_allocated() / 2**20

    def summary(self) -> dict[str, object]:
        return {
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "total_seconds": round(sum(self.seconds.values()), 3),
            "peak_rss_mb": {k: round(v, 1) for k, v in self.peak_rss_mb.items()},
            "peak_cuda_mb": {k: round(v, 1) for k, v in self.peak_cuda_mb.items()},
        }
