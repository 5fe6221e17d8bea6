"""The weight matrices of a decoder block that can be pruned, whatever module holds them.

A matrix is pruned as [out, in] (masks per output row, N:M groups along the input): an
nn.Linear's weight as it is, a Conv1D's [in, out] weight transposed, one expert's slice of a fused
3-D experts parameter (transposed where the experts store [in, out]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shears.pruning.families import (
    DENSE_GATES,
    ROUTER_NAMES,
    TRANSPOSED_LINEARS,
    ExpertsLayout,
    experts_layout,
)


@dataclass(frozen=True)
class Prunable:
    name: str  # e.g. model.layers.0.mlp.down_proj, or model.layers.1.mlp.experts.gate_up_proj[3]
    param: str  # the model parameter holding it, e.g. model.layers.0.mlp.down_proj.weight
    module: nn.Module  # a linear layer (hooked for its inputs) or the experts module
    expert: int | None  # the expert's index in a fused 3-D parameter
    transposed: bool  # stored [in, out]
    shape: tuple[int, int]  # [out, in]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """The [out, in] view of this matrix inside `tensor` (the full parameter)."""
        if self.expert is not None:
            tensor = tensor[self.expert]
        return tensor.T if self.transposed else tensor


@dataclass(frozen=True)
class ExpertsModule:
    """A fused-experts module of a block, with its layout."""

    name: str
    module: nn.Module
    layout: ExpertsLayout
    count: int


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in TRANSPOSED_LINEARS


def _linear_shape(module: nn.Module) -> tuple[tuple[int, int], bool]:
    rows, cols = module.weight.shape
    transposed = not isinstance(module, nn.Linear)
    return ((cols, rows) if transposed else (rows, cols)), transposed


def find_experts(block: nn.Module, prefix: str) -> list[ExpertsModule]:
    found = []
    for name, module in block.named_modules():
        layout = experts_layout(module)
        if layout is not None:
            count = getattr(module, layout.down).shape[0]
            found.append(ExpertsModule(prefix + name, module, layout, count))
    return found


def _is_router(name: str, module: nn.Module, block: nn.Module, experts: list[ExpertsModule]) -> bool:
    """A linear named like a router (or inside a module that is) scoring one output per expert."""
    parts = name.split(".")
    if not ROUTER_NAMES & set(parts[-2:]):
        return False
    shape, _ = _linear_shape(module)
    counts = {group.count for group in experts}
    counts |= {len(m) for n, m in block.named_modules() if isinstance(m, nn.ModuleList) and "expert" in n}
    return shape[0] in counts


def find_prunables(block: nn.Module, prefix: str) -> dict[str, Prunable]:
    """Every prunable matrix of `block` (whose parameters are named `prefix` + name), in definition
    order; routers (a linear scoring the experts) and shared-expert gates are left out: they stay
    dense."""
    experts = find_experts(block, prefix)
    found: dict[str, Prunable] = {}
    for name, module in block.named_modules():
        if name.rpartition(".")[2] in DENSE_GATES:
            continue
        if _is_linear(module) and not _is_router(name, module, block, experts):
            shape, transposed = _linear_shape(module)
            full = prefix + name
            found[full] = Prunable(full, full + ".weight", module, None, transposed, shape)
    for group in experts:
        for param_name in (group.layout.up, group.layout.down):
            param = getattr(group.module, param_name)
            rows, cols = param.shape[1:]
            shape = (cols, rows) if group.layout.transposed else (rows, cols)
            for index in range(group.count):
                full = f"{group.name}.{param_name}[{index}]"
                found[full] = Prunable(
                    full, f"{group.name}.{param_name}", group.module, index, group.layout.transposed, shape
                )
    return found
