"""Step 2: every Triton kernel on the device against its pure-torch reference.

Three parts: the kernels' own self-check cases (2:4, 4:8, 1:4, bitmask; fp32, bf16, fp16); the tuned
launch candidates the speed step times, on odd shapes (rows not a multiple of any block, a partial
metadata word or bitmask byte, odd M) in bf16 and fp16; and SparseLinear (3-D input, bias) through
the measuring dispatcher, the path a served model takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.gpu_steps.common import (
    launch_candidates,
    pack_weight,
    random_sparse,
    reference,
    relative_error,
    tolerance,
)
from bench.gpu_steps.context import StepContext


@dataclass(frozen=True)
class Case:
    label: str
    pattern: tuple[int, int]  # (0, 0): unstructured, packed as a bitmask
    density: float
    shape: tuple[int, int]
    dtypes: tuple[torch.dtype, ...]


BF16, FP16 = torch.bfloat16, torch.float16
# N is a multiple of no block_n; K of M (N:M) but of no block_k; a row's last metadata word or
# bitmask byte is partial.
CASES = {
    "gpu": [
        Case("2:4", (2, 4), 0.5, (1001, 1096), (BF16, FP16)),
        Case("bitmask 70%", (0, 0), 0.3, (1001, 1100), (BF16, FP16)),
        Case("4:8", (4, 8), 0.5, (1001, 1096), (BF16,)),
    ],
    "dry": [
        Case("2:4", (2, 4), 0.5, (41, 200), (BF16, FP16)),
        Case("bitmask 70%", (0, 0), 0.3, (33, 300), (BF16, FP16)),
        Case("4:8", (4, 8), 0.5, (25, 200), (BF16,)),
    ],
}
M_VALUES = {"gpu": (1, 7, 300), "dry": (1, 5, 33)}
# Launch candidates per kernel kind checked here, per dtype (each is a compile on the GPU; the speed
# step checks its fastest launch of every row too).
PER_KERNEL = {BF16: 2, FP16: 1}


def packed_case(case: Case, dtype: torch.dtype, device: torch.device, seed: int):
    dense = random_sparse(*case.shape, case.pattern, case.density, dtype, device, seed)
    return pack_weight(dense, case.pattern, case.label)


def check_launches(ctx: StepContext) -> None:
    from shears.kernels.dispatch import Choice, Dispatcher, PackedOperand

    device, runner = ctx.device, Dispatcher(measure=False)
    generator = torch.Generator().manual_seed(1)
    for seed, (case, dtype) in enumerate((c, d) for c in CASES[ctx.mode] for d in c.dtypes):
        packed = packed_case(case, dtype, device, seed)
        op = PackedOperand(packed)
        rows, cols = case.shape
        for m in M_VALUES[ctx.mode]:
            x = torch.randn(m, cols, generator=generator).to(device=device, dtype=dtype)
            want = reference(x.float(), packed)
            for config in launch_candidates(packed, m, device, PER_KERNEL[dtype]):
                if ctx.out_of_time():
                    ctx.problem("time box: launch checks cut short")
                    return
                row = {"case": case.label, "dtype": str(dtype).removeprefix("torch."), "shape": [rows, cols]}
                row |= {"m": m, "config": str(config)}
                try:
                    error = relative_error(runner.run(Choice("triton", config), x, op), want)
                    row |= {"relative_error": error, "ok": error <= tolerance(dtype)}
                except Exception as exc:  # a launch that fails to compile or run is a failed check
                    row |= {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
                ctx.add("launches", row)


def check_sparse_linear(ctx: StepContext) -> None:
    from shears.kernels.dispatch import Dispatcher
    from shears.kernels.sparse_linear import SparseLinear

    device = ctx.device
    dispatcher = Dispatcher(measure=True, max_configs=ctx.max_configs)
    generator = torch.Generator().manual_seed(2)
    for seed, case in enumerate(CASES[ctx.mode][:2]):
        if ctx.out_of_time():
            ctx.problem("time box: SparseLinear checks cut short")
            return
        dtype = BF16
        rows, cols = case.shape
        dense = random_sparse(rows, cols, case.pattern, case.density, dtype, device, 100 + seed)
        linear = torch.nn.Linear(cols, rows, bias=True, device=device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(dense)
        layer = SparseLinear.from_linear(linear, *case.pattern, case.label, dispatcher)
        for shape in ((1, 1, cols), (2, 3, cols)):
            x = torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
            row = {"case": case.label, "input_shape": list(shape)}
            try:
                with torch.no_grad():
                    got = layer(x)
                    want = F.linear(x.float(), dense.float(), linear.bias.float())
                error = relative_error(got, want)
                choice = dispatcher.choose(x.reshape(-1, cols), layer.operand())
                row |= {
                    "relative_error": error,
                    "ok": error <= 2 * tolerance(dtype),
                    "dispatch": choice.label,
                }
                row |= {"shape_ok": tuple(got.shape) == (*shape[:-1], rows)}
                row["ok"] = row["ok"] and row["shape_ok"]
            except Exception as exc:
                row |= {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
            ctx.add("sparse_linear", row)


def run(ctx: StepContext) -> None:
    from shears.kernels.dispatch import triton_status
    from shears.kernels.selfcheck import run_checks

    status = triton_status()
    if status is not None:
        raise RuntimeError(status)
    ctx.set("selfcheck", ctx.attempt("selfcheck", lambda: run_checks(ctx.device.type)) or [])
    ctx.attempt("SparseLinear checks", lambda: check_sparse_linear(ctx))
    ctx.attempt("launch checks", lambda: check_launches(ctx))
    checks = [*ctx.result["selfcheck"], *ctx.result.get("launches", []), *ctx.result.get("sparse_linear", [])]
    cut = [p for p in ctx.problems if p.startswith("time box")]
    ctx.set("checks", len(checks))
    ctx.set("failed", [c for c in checks if not c.get("ok")])
    ctx.set("complete", not cut)  # False: the time box cut some checks (those run are still judged)
    crashed = len(ctx.problems) > len(cut)  # a whole part failed to run
    ctx.set("all_ok", bool(checks) and not ctx.result["failed"] and not crashed)
