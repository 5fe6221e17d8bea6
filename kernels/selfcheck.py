"""Correctness checks of every Triton kernel against its torch reference, on a few small odd shapes.

Runs on the GPU, or on the CPU under TRITON_INTERPRET=1. Kernels decorated without the interpreter
cannot switch to it, and setting the variable here would turn every later SparseLinear of this process
into interpreted kernels, so `run_checks_anywhere` runs `python -m shears.kernels.selfcheck` in a child
with TRITON_INTERPRET=1 unless this process already has it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from shears.kernels.configs import KernelConfig, interpreting
from shears.kernels.formats import PackedWeight
from shears.kernels.reference import tolerance
from shears.kernels.registry import format_of, reference_matmul

# (name, layout, n, m or density, rows, cols, M, dtype, launch)
CASES: list[tuple[str, str, int, float, int, int, int, torch.dtype, KernelConfig]] = [
    ("2:4 gemv fp32", "nm", 2, 4, 40, 200, 1, torch.float32, KernelConfig(1, 16, 64, 2)),
    ("2:4 gemv bf16", "nm", 2, 4, 33, 136, 1, torch.bfloat16, KernelConfig(1, 16, 64, 1)),
    ("2:4 dot fp16", "nm", 2, 4, 40, 200, 5, torch.float16, KernelConfig(16, 16, 64, 2)),
    ("2:4 dot bf16 split", "nm", 2, 4, 33, 192, 20, torch.bfloat16, KernelConfig(16, 16, 64, 3)),
    ("4:8 gemv bf16", "nm", 4, 8, 17, 128, 1, torch.bfloat16, KernelConfig(1, 16, 64, 2)),
    ("1:4 dot fp32", "nm", 1, 4, 24, 96, 3, torch.float32, KernelConfig(16, 16, 64, 1)),
    ("bitmask 70% gemv fp16", "bitmask", 0, 0.3, 40, 300, 1, torch.float16, KernelConfig(1, 16, 128, 2)),
    ("bitmask 90% dot bf16", "bitmask", 0, 0.1, 33, 256, 6, torch.bfloat16, KernelConfig(16, 16, 128, 2)),
]


def sparse_weight(
    layout: str,
    n: int,
    m_or_density: float,
    rows: int,
    cols: int,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> PackedWeight:
    """A random weight of that pattern (n > 0: N:M, else of that density), with an all-zero row and
    -0.0 entries, packed in `layout`."""
    weight = torch.randn(rows, cols, generator=generator)
    m = int(m_or_density) if n else 0
    if n:
        order = torch.rand(rows, cols // m, m, generator=generator).argsort(-1)[..., :n]
        keep = torch.zeros(rows, cols // m, m).scatter_(-1, order, 1.0).bool().view(rows, cols)
    else:
        keep = torch.rand(rows, cols, generator=generator) < m_or_density
    weight = torch.where(keep, weight, torch.zeros(()))
    weight[0] = 0.0
    weight[-1, : min(8, cols)] = -0.0
    weight = weight.to(dtype)
    return format_of(layout).pack(weight, n, m, "weight")


def check_kernel(packed: PackedWeight, x: torch.Tensor, config: KernelConfig) -> dict[str, Any]:
    got = format_of(packed).kernel_module().matmul(x, packed, config)
    want = reference_matmul(x.float(), packed.to(x.device) if packed.device != x.device else packed)
    scale = float(want.abs().max()) or 1.0
    error = float((got.float() - want.float()).abs().max()) / scale
    return {"relative_error": error, "ok": bool(error <= tolerance(x.dtype)) and got.dtype == x.dtype}


def run_checks(device: str = "cpu") -> list[dict[str, Any]]:
    """Every case on `device` (CPU requires TRITON_INTERPRET=1 before triton was imported)."""
    generator = torch.Generator().manual_seed(0)
    results = []
    for name, layout, n, m_or_density, rows, cols, m_rows, dtype, config in CASES:
        packed = sparse_weight(layout, n, m_or_density, rows, cols, dtype, generator)
        packed = packed.to(device)
        x = torch.randn(m_rows, cols, generator=generator).to(dtype).to(device)
        try:
            outcome = check_kernel(packed, x, config)
        except Exception as exc:  # report, do not hide: a failing case is a result
            outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        results.append(
            {
                "case": name,
                "shape": [rows, cols],
                "m": m_rows,
                "dtype": str(dtype).removeprefix("torch."),
                "config": str(config),
                **outcome,
            }
        )
    return results


def run_checks_anywhere() -> dict[str, Any]:
    """The checks on the GPU if there is one, else under the interpreter (in a child process if needed)."""
    from shears.kernels.dispatch import triton_status

    if torch.cuda.is_available() and triton_status() is None:
        return {"mode": "gpu", "results": run_checks("cuda")}
    if interpreting():
        status = triton_status()
        if status is not None:
            return {"mode": "skipped", "reason": status, "results": []}
        return {"mode": "interpreter", "results": run_checks("cpu")}
    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        PYTHONPATH=os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    done = subprocess.run(
        [sys.executable, "-m", "shears.kernels.selfcheck"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    try:  # a failing case exits 1 but still prints every result
        return {"mode": "interpreter", "results": json.loads(done.stdout)}
    except json.JSONDecodeError:
        return {"mode": "interpreter", "reason": done.stderr[-2000:], "results": []}


def main() -> int:
    device = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    results = run_checks(device)
    print(json.dumps(results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
