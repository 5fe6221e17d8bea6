"""Step 3: Shears' kernels vs dense cuBLAS (torch.matmul) and torch's semi-structured 2:4, per shape and M.

For each (shape, layout, M): every launch candidate (the first few per kernel kind) timed, the fastest
checked against the reference, dense and semi-structured timed, and what the measuring dispatcher
picks, re-timed the same way (a dense pick is the dense time itself). CUDA events, L2 flushed, median.
Rows run in priority order (the targets' rows first), so a time box cuts the least important ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bench.gpu_steps.common import (
    launch_candidates,
    pack_weight,
    random_sparse,
    reference,
    relative_error,
    time_us,
    tolerance,
)
from bench.gpu_steps.context import StepContext

# name: (pattern, density)
LAYOUTS: dict[str, tuple[tuple[int, int], float]] = {
    "2:4": ((2, 4), 0.5),
    "bitmask50": ((0, 0), 0.5),
    "bitmask70": ((0, 0), 0.3),
    "bitmask90": ((0, 0), 0.1),
}


@dataclass(frozen=True)
class Sizes:
    shapes: dict[str, tuple[int, int]]  # name: (N, K) of the weight
    m_values: tuple[int, ...]  # for 2:4
    bitmask_m: tuple[int, ...]
    warmup: int
    runs: int


SIZES = {
    # Llama-3-8B's linear shapes: q/o, k/v, gate/up, down.
    "gpu": Sizes(
        {"qo": (4096, 4096), "kv": (1024, 4096), "up": (14336, 4096), "down": (4096, 14336)},
        (1, 4, 16, 64, 512, 2048),
        (1, 16),
        warmup=3,
        runs=20,
    ),
    "dry": Sizes({"qo": (48, 256)}, (1, 4, 33), (1, 4), warmup=0, runs=1),
}


def plan(sizes: Sizes) -> list[tuple[str, str, int]]:
    """(shape, layout, M) in priority order, a time box cutting the last first: 2:4 decode (M <= 16);
    bitmask 70 and 90% at the first bitmask M; the other bitmask rows; 2:4 prefill."""
    shapes, first = list(sizes.shapes), sizes.bitmask_m[0]
    groups = [
        [("2:4", m) for m in sizes.m_values if m <= 16],
        [(layout, first) for layout in ("bitmask70", "bitmask90")],
        [("bitmask50", first)] + [(lay, m) for m in sizes.bitmask_m[1:] for lay in LAYOUTS if lay != "2:4"],
        [("2:4", m) for m in sizes.m_values if m > 16],
    ]
    return [(shape, layout, m) for group in groups for shape in shapes for layout, m in group]


def measure_row(ctx: StepContext, op: Any, x: torch.Tensor, dispatcher: Any, sizes: Sizes) -> dict[str, Any]:
    from shears.kernels.dispatch import Choice

    device, packed = ctx.device, op.packed

    def timing(fn) -> float:
        return time_us(fn, device, warmup=sizes.warmup, runs=sizes.runs)

    candidates: dict[str, float] = {}
    errors: dict[str, str] = {}
    configs = launch_candidates(packed, x.shape[0], device, ctx.max_configs)
    for config in configs:
        choice = Choice("triton", config)
        try:
            candidates[str(config)] = timing(lambda c=choice: dispatcher.run(c, x, op))
        except Exception as exc:  # a launch this GPU rejects (shared memory, registers): recorded
            errors[str(config)] = f"{type(exc).__name__}: {exc}"[:300]
    best = min(candidates, key=candidates.__getitem__) if candidates else None
    row: dict[str, Any] = {"candidates_us": candidates, "errors": errors, "shears_config": best}
    row["shears_us"] = candidates.get(best) if best else None
    if best:
        config = next(c for c in configs if str(c) == best)
        error = relative_error(dispatcher.run(Choice("triton", config), x, op), reference(x.float(), packed))
        row |= {"relative_error": error, "correct": error <= 2 * tolerance(x.dtype)}
    dense = op.dense()
    row["dense_us"] = timing(lambda: F.linear(x, dense))
    row["semi_us"] = None
    try:  # torch's semi-structured 2:4 (None where the GPU, dtype or shape has none)
        semi = op.semi()
        if semi is not None:
            row["semi_us"] = timing(lambda: F.linear(x, semi))
    except Exception as exc:
        errors["semi"] = f"{type(exc).__name__}: {exc}"[:300]
    choice = dispatcher.choose(x, op)
    row["dispatch"] = choice.label
    # The pick's time from this table (the same measurement as its column), else timed now.
    same = {"dense": row["dense_us"], "semi": row["semi_us"]}.get(choice.backend)
    same = same if choice.backend != "triton" else candidates.get(str(choice.config))
    row["dispatch_us"] = same if same else timing(lambda: dispatcher.run(choice, x, op))
    for key, value in (
        ("speedup_shears", row["shears_us"]),
        ("speedup_semi", row["semi_us"]),
        ("speedup_dispatch", row["dispatch_us"]),
    ):
        row[key] = row["dense_us"] / value if value else None
    return row


def run(ctx: StepContext) -> None:
    from shears.kernels.dispatch import Dispatcher, PackedOperand, triton_status

    status = triton_status()
    if status is not None:
        raise RuntimeError(status)
    sizes = SIZES[ctx.mode]
    dtype = torch.bfloat16
    ctx.set("dtype", "bfloat16")
    ctx.set("max_configs_per_kernel", ctx.max_configs)
    todo = plan(sizes)
    ctx.set("planned", len(todo))
    dispatcher = Dispatcher(measure=True, max_configs=ctx.max_configs)
    operands: dict[tuple[str, str], Any] = {}  # kept for the whole step: a few GB at most on the GPU
    generator = torch.Generator().manual_seed(3)
    for index, (shape_name, layout, m) in enumerate(todo):
        if ctx.out_of_time():
            ctx.set("skipped", [list(item) for item in todo[index:]])
            ctx.problem(f"time box: {len(todo) - index} of {len(todo)} rows not measured")
            return
        n, k = sizes.shapes[shape_name]
        if (shape_name, layout) not in operands:
            pattern, density = LAYOUTS[layout]
            dense = random_sparse(n, k, pattern, density, dtype, ctx.device, seed=len(operands))
            operands[shape_name, layout] = PackedOperand(
                pack_weight(dense, pattern, f"{shape_name}.{layout}")
            )
            del dense
        op = operands[shape_name, layout]
        x = torch.randn(m, k, generator=generator).to(device=ctx.device, dtype=dtype)
        row: dict[str, Any] = {"shape_name": shape_name, "shape": [n, k], "layout": layout, "m": m}
        if op.packed.layout == "bitmask":
            row["density"] = op.packed.density
        try:
            row |= measure_row(ctx, op, x, dispatcher, sizes)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            ctx.problem(f"{shape_name} {layout} M={m}: {row['error']}")
        ctx.add("rows", row)
        print(
            f"[kernel_speed] {shape_name} {layout} M={m}: shears {row.get('shears_us')} us, dense "
            f"{row.get('dense_us')} us, semi {row.get('semi_us')} us, dispatch {row.get('dispatch')}",
            flush=True,
        )
