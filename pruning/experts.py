"""MoE experts: each expert's matrices pruned with statistics of the tokens its router sends it.

During a block's statistics pass, a hook on each fused-experts module keeps what the module
receives: the hidden states and the router's top-k choice (one more copy of the block's
activations, on the activation store). Experts are then solved one at a time, each from its own
tokens: the up (gate+up) projection from the routed hidden states, the down projection from the
expert's intermediate activations on them, computed with the module's own gate function. Only
one expert's statistics exist at a time.

Fallback: an expert the router sent fewer than MIN_EXPERT_TOKENS calibration tokens is pruned
with the statistics of every token reaching the MoE layer, as if all were routed to it (a few
tokens cannot estimate a Hessian or input norms); the manifest lists these experts and the
tokens each saw.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from shears.errors import ModelUnavailable
from shears.pruning.prunable import ExpertsModule

MIN_EXPERT_TOKENS = 32


@dataclass
class RoutedInputs:
    """What one experts module received, batch by batch."""

    hidden: list[torch.Tensor] = field(default_factory=list)  # [tokens, H]
    index: list[torch.Tensor] = field(default_factory=list)  # [tokens, k] expert ids

    def routed(self, expert: int) -> list[torch.Tensor]:
        """Per batch, the rows of the tokens routed to `expert`."""
        return [(index == expert).any(dim=-1).nonzero().squeeze(-1) for index in self.index]

    def tokens(self, expert: int) -> int:
        return sum(int((index == expert).any(dim=-1).sum()) for index in self.index)


class ExpertCapture:
    """Forward hooks keeping each experts module's inputs; the first batch's output is checked
    against a recomputation from the layout (a layout not understood is refused, never guessed)."""

    def __init__(self, groups: list[ExpertsModule], store: torch.device, check: bool = True) -> None:
        self.groups = groups
        self.store = store
        self.check = check
        self.inputs: dict[str, RoutedInputs] = {g.name: RoutedInputs() for g in groups}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ExpertCapture:
        for group in self.groups:
            self._handles.append(group.module.register_forward_hook(self._hook(group), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, group: ExpertsModule) -> Callable[..., None]:
        signature = inspect.signature(group.module.forward)

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            values = list(signature.bind(*args, **kwargs).arguments.values())
            hidden, index = values[0], values[1]
            if not isinstance(index, torch.Tensor) or index.is_floating_point():
                raise ModelUnavailable(
                    f"{type(module).__name__}: its router does not hand the experts top-k indices; "
                    "this MoE layout is not supported"
                )
            hidden = hidden.reshape(-1, hidden.shape[-1])
            index = index.reshape(hidden.shape[0], -1)
            routed = self.inputs[group.name]
            if self.check and not routed.hidden:
                check_layout(group, hidden, index, values[2].reshape(index.shape), output)
            routed.hidden.append(hidden.to(self.store))
            routed.index.append(index.to(self.store))

        return hook


def intermediate(group: ExpertsModule, expert: int, x: torch.Tensor) -> torch.Tensor:
    """The expert's activations entering its down projection, the way the module computes them."""
    layout, module = group.layout, group.module
    y = _project(module, layout.up, layout, expert, x)
    return module._apply_gate(y) if layout.has_gate else module.act_fn(y)


def _project(module: nn.Module, name: str, layout: object, expert: int, x: torch.Tensor) -> torch.Tensor:
    weight = getattr(module, name)[expert]
    y = x @ weight if layout.transposed else x @ weight.T
    if layout.has_bias:
        y = y + getattr(module, name + "_bias")[expert]
    return y


def check_layout(
    group: ExpertsModule,
    hidden: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    output: torch.Tensor,
) -> None:
    """Recompute the experts' output from the layout; refuse the model if it differs."""
    module, layout = group.module, group.layout
    total = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in index.unique().tolist():
        if not 0 <= expert < group.count:
            continue
        rows, slots = (index == expert).nonzero(as_tuple=True)
        y = _project(module, layout.down, layout, expert, intermediate(group, expert, hidden[rows]))
        if getattr(module, "has_post_expert_norm", False):
            y = module.post_expert_norm(y)
        total.index_add_(0, rows, y.float() * weights[rows, slots, None].float())
    got = output.reshape(total.shape).float()
    scale = float(got.abs().max()) or 1.0
    tolerance = 1e-4 if hidden.dtype == torch.float32 else 3e-2
    if float((total - got).abs().max()) > tolerance * scale:
        raise ModelUnavailable(
            f"{type(module).__name__}: the experts do not compute what their declared layout says "
            "(gate, bias, orientation); Shears cannot prune them per expert"
        )
