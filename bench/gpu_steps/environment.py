"""Step 1: the machine and the software: GPU, memory, driver, versions, and two baselines (bf16 matmul
TFLOP/s and device copy GB/s) that put the later numbers in context."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from bench.gpu_steps import FORBIDDEN
from bench.gpu_steps.common import time_us
from bench.gpu_steps.context import StepContext

PACKAGES = ("torch", "triton", "transformers", "safetensors", "numpy", "matplotlib", "tokenizers")
# Baseline sizes: (matmul side, copy MiB) on the GPU and in a dry run.
SIZES = {"gpu": (8192, 1024), "dry": (256, 8)}


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def imported_from() -> dict[str, str]:
    """Where Shears' packages came from: on the GPU machine, the checkout (no install there)."""
    import importlib

    return {
        name: str(Path(importlib.import_module(name).__file__).parent)
        for name in ("shears", "shears.kernels", "shears.pruning")
    }


def nvidia_smi() -> dict[str, str] | None:
    query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 or not done.stdout.strip():
        return None
    values = [v.strip() for v in done.stdout.splitlines()[0].split(",")]
    return dict(zip(query.split(","), values, strict=False))


def device_info(device: torch.device) -> dict:
    info: dict = {
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    if device.type != "cuda":
        info["name"] = f"cpu ({platform.machine()})"
        return info
    props = torch.cuda.get_device_properties(device)
    info.update(
        name=props.name,
        capability=list(torch.cuda.get_device_capability(device)),
        sms=props.multi_processor_count,
        memory_bytes=props.total_memory,
        count=torch.cuda.device_count(),
        cudnn=torch.backends.cudnn.version(),
        nvidia_smi=nvidia_smi(),
    )
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None:
        info["cusparselt"] = cusparselt.version() if cusparselt.is_available() else None
    return info


def baselines(device: torch.device, dry: bool) -> dict[str, float]:
    side, copy_mib = SIZES["dry" if dry else "gpu"]
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    b = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    runs = 3 if dry else 10
    matmul_us = time_us(lambda: a @ b, device, warmup=1, runs=runs)
    src = torch.empty(copy_mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_us = time_us(lambda: dst.copy_(src), device, warmup=1, runs=runs)
    return {
        "bf16_matmul_side": side,
        "bf16_matmul_tflops": 2 * side**3 / matmul_us / 1e6,
        "copy_mib": copy_mib,
        "copy_gb_per_s": 2 * src.numel() / copy_us / 1e3,  # bytes read + written
    }


def triton_state() -> str:
    from shears.kernels.dispatch import triton_status

    return triton_status() or "ok"


def run(ctx: StepContext) -> None:
    """Also the probe that decides the mode of the later steps: `gpu` is whether torch sees a GPU.

    Recorded first and with nothing of Shears imported, so that a broken import costs its own line,
    not the GPU window (the later steps would otherwise run as the dry run)."""
    gpu = torch.cuda.is_available() and not ctx.dry
    device = torch.device("cuda" if gpu else "cpu")
    ctx.set("gpu", gpu)
    ctx.set("device", ctx.attempt("device", lambda: device_info(device)) or {"name": str(device)})
    ctx.set("versions", versions())
    ctx.set("python_executable", sys.executable)
    ctx.set("absent_packages", {name: importlib.util.find_spec(name) is None for name in FORBIDDEN})
    ctx.set("imported_from", ctx.attempt("import shears", imported_from))
    ctx.set("triton_status", ctx.attempt("import the kernels", triton_state))
    ctx.set("baselines", ctx.attempt("baselines", lambda: baselines(device, not gpu)))
