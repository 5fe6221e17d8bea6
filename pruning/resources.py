"""Wall time and peak memory per phase, and the progress events that mark phase changes."""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator

import torch

from pruning.progress import Event, Phase, Reporter


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
