"""Torch helpers the steps of `make gpu-check` share: timing, memory, random sparse weights."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_us(fn: Callable[[], object], device: torch.device, *, warmup: int, runs: int) -> float:
    """Median microseconds of fn(): CUDA events with L2 flushed on a GPU, the wall clock elsewhere."""
    if device.type == "cuda":
        from shears.kernels.timing import gpu_time_us

        return gpu_time_us(fn, device, warmup=warmup, runs=runs)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), seconds) with the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return value, time.perf_counter() - start


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def allocated_bytes(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def peak_bytes(device: torch.device) -> int:
    """Peak device memory since the last reset (CUDA); the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sm_count(device: torch.device) -> int:
    """Multiprocessors the launch candidates are sized for (an H100's 132 where there is no GPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def random_sparse(
    rows: int,
    cols: int,
    pattern: tuple[int, int],
    density: float,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> torch.Tensor:
    """A random [rows, cols] weight (std 0.02) made on `device`: n of every m kept at random for an
    N:M pattern, else each entry kept with probability `density`."""
    generator = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator, device=device) * 0.02
    n, m = pattern
    if m:
        order = torch.rand(rows, cols // m, m, generator=generator, device=device).argsort(-1)
        keep = torch.zeros(rows, cols // m, m, dtype=torch.bool, device=device).scatter_(
            -1, order[..., :n], True
        )
        keep = keep.view(rows, cols)
    else:
        keep = torch.rand(rows, cols, generator=generator, device=device) < density
    return torch.where(keep, weight, 0.0).to(dtype)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return float((got.float() - want).abs().max()) / (float(want.abs().max()) or 1.0)


# The kernels' API as the steps use it, in one place (the kernels package is where it changes).


def pack_weight(dense: torch.Tensor, pattern: tuple[int, int], name: str) -> Any:
    """`dense` packed in the layout its pattern calls for ((0, 0): unstructured, a bitmask)."""
    from shears.kernels.registry import pack

    return pack(dense, *pattern, name)


def reference(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """The pure-torch reference matmul y = x @ W^T of a packed weight (fp32 accumulation)."""
    from shears.kernels.registry import reference_matmul

    return reference_matmul(x, packed)


def tolerance(dtype: torch.dtype) -> float:
    """Relative error a kernel may show against the reference in this dtype."""
    from shears.kernels.reference import tolerance as allowed

    return allowed(dtype)


def launch_candidates(packed: Any, m: int, device: torch.device, per_kernel: int | None) -> list[Any]:
    """The Triton launches tuned for `packed` at M = m: the first `per_kernel` of each kernel kind."""
    from shears.kernels.configs import candidate_configs
    from shears.kernels.registry import format_of

    rows, cols = packed.shape
    launches = format_of(packed).launches
    return candidate_configs(rows, cols, m, launches, sm_count(device), packed.nm, per_kernel)
