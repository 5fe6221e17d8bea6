"""The steps of `make gpu-check` (bench/gpu_check.py), one module each, in the order they run.

Each module has `run(ctx: StepContext)`; the time boxes are seconds per step on a GPU and in the CPU
dry run. The summary (step 6) is pure Python and runs in the parent process.
"""

from __future__ import annotations

from dataclasses import dataclass

# Modules the GPU machine does not have: each step reports any of them it imported. Shears' code must
# import none; transformers imports accelerate by itself where it is installed, so that one is only
# reported (tests/bench/test_gpu_check.py hides all three from the dry run).
FORBIDDEN = ("pydantic", "accelerate", "fastapi")
OPPORTUNISTIC = ("accelerate",)
# Launch candidates per kernel kind (GEMV / tl.dot) that the dispatcher and the speed table time:
# compiling every tuned launch for every shape does not fit the 8-minute window.
DEFAULT_MAX_CONFIGS = 3


@dataclass(frozen=True)
class Step:
    name: str
    module: str
    gpu_box_s: float
    dry_box_s: float

    def box(self, mode: str) -> float:
        return self.gpu_box_s if mode == "gpu" else self.dry_box_s


# GPU boxes add up to more than the budget: most steps end well inside theirs, and each step's box is
# also cut so that every later step keeps a minimum (gpu_check.RESERVE_S).
STEPS = [
    Step("environment", "bench.gpu_steps.environment", 60, 40),
    Step("correctness", "bench.gpu_steps.correctness", 90, 45),
    Step("kernel_speed", "bench.gpu_steps.kernel_speed", 170, 45),
    Step("decode", "bench.gpu_steps.decode", 75, 45),
    Step("pruning_speed", "bench.gpu_steps.pruning_speed", 120, 40),
]
