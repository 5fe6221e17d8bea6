"""Small pruned models for the kernel tests: magnitude pruning is all they need."""

from __future__ import annotations

import shutil
from pathlib import Path

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
