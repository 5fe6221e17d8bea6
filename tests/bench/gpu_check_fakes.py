"""Steps that misbehave, for the time-box tests of bench/gpu_check.py (run in its child processes)."""

from __future__ import annotations

import os
import time

from bench.gpu_steps.context import StepContext


def hang(ctx: StepContext) -> None:
    """Records some work, then hangs past any time box (a deadlocked kernel, say)."""
    ctx.set("before_hang", True)
    time.sleep(600)


def crash(ctx: StepContext) -> None:
    ctx.set("partial", 1)
    raise RuntimeError("boom")


def works(ctx: StepContext) -> None:
    """Says what a step sees: its mode and whether the Triton interpreter is on."""
    ctx.set("mode", ctx.mode)
    ctx.set("interpreter", os.environ.get("TRITON_INTERPRET"))
