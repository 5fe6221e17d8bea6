"""Kernel tests run the Triton kernels on the CPU under the interpreter.

triton.jit reads TRITON_INTERPRET when a kernel is decorated, i.e. when kernels.triton_* is first
imported; this conftest is imported before any test module, so the kernels come up interpreted.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest
import torch


def magnitude_prune(weight: torch.Tensor, n: int, m: int, sparsity: float = 0.5) -> torch.Tensor:
    """Keep the n largest |w| of every m consecutive inputs (n = m = 0: the largest 1 - sparsity overall)."""
    if m:
        groups = weight.view(weight.shape[0], -1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(
            -1, groups.abs().topk(n, dim=-1).indices, True
        )
        return torch.where(keep, groups, torch.zeros((), dtype=weight.dtype)).view_as(weight)
    threshold = weight.abs().flatten().kthvalue(max(1, int(weight.numel() * sparsity))).values
    return torch.where(weight.abs() > threshold, weight, torch.zeros((), dtype=weight.dtype))


def prune_folder(
    source: Path, target: Path, n: int, m: int, dtype: torch.dtype | None = None, sparsity: float = 0.5
) -> list[str]:
    """Copy a model folder with its decoder-block linear weights magnitude-pruned; return their names."""
    import shutil

    from transformers import AutoModelForCausalLM

    shutil.copytree(source, target)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
    names = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(magnitude_prune(module.weight, n, m, sparsity))
                names.append(f"{name}.weight")
    model.save_pretrained(target)
    return names


@pytest.fixture(scope="session")
def pruned_24(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """tiny_llama with every decoder linear pruned to 2:4 (fp32), not yet packed."""
    target = tmp_path_factory.mktemp("pruned") / "llama-2of4"
    return target, prune_folder(tiny_llama, target, 2, 4)


@pytest.fixture(scope="session")
def pruned_24_bf16(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    target = tmp_path_factory.mktemp("pruned") / "llama-2of4-bf16"
    return target, prune_folder(tiny_llama, target, 2, 4, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def pruned_unstructured(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """tiny_llama with every decoder linear 70% magnitude-pruned (fp32)."""
    target = tmp_path_factory.mktemp("pruned") / "llama-70"
    return target, prune_folder(tiny_llama, target, 0, 0, sparsity=0.7)
