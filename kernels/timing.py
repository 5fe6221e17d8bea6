"""GPU timing: CUDA events around one call after warm-up, L2 flushed before every run, median of many.

Flushing L2 (50 MB on an H100) keeps weights from staying cached between runs, so a decode matmul is
timed as it runs inside a model: memory-bound, reading its weight from HBM.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

_FLUSH: dict[torch.device, torch.Tensor] = {}
_FLUSH_BYTES = 256 << 20


def _flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _FLUSH:
        _FLUSH[device] = torch.empty(_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    return _FLUSH[device]


def gpu_time_us(
    fn: Callable[[], object], device: torch.device, *, warmup: int = 3, runs: int = 25, flush_l2: bool = True
) -> float:
    """Median microseconds of fn() on `device` (CUDA), measured with events."""
    flush = _flush_buffer(device) if flush_l2 else None
    for _ in range(warmup):
        fn()
    samples = []
    with torch.cuda.device(device):
        for _ in range(runs):
            if flush is not None:
                flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(samples)
