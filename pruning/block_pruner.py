"""Prune one decoder block: gather input statistics with hooks, solve each linear layer, write it back.

Layers that read the same input tensor (q/k/v, gate/up) are found on the first batch and share one
accumulator, so a Hessian is computed once per input, not once per layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from shears.pruning.config import PruneRequest
from shears.pruning.masks import achieved_sparsity
from shears.pruning.methods import METHODS
from shears.pruning.resources import release_freed_memory
from shears.pruning.solvers import layer_error
from shears.pruning.stats import ACCUMULATORS, Accumulator
from shears.pruning.streaming import Batch, run_block


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, int]
    target: float
    sparsity: float
    error: float | None  # relative ||WX - W'X||^2 / ||WX||^2 where a Hessian was collected
    seconds: float


class InputStats:
    """Forward hooks accumulating per-input statistics for a set of linear layers."""

    def __init__(self, layers: dict[str, nn.Linear], kind: str, device: torch.device) -> None:
        self.layers = layers
        self.kind = kind  # a key of ACCUMULATORS: the statistic a method needs
        self.device = device
        self.groups: list[list[str]] | None = None  # layers sharing one input, in execution order
        self.accumulators: dict[str, Accumulator] = {}  # keyed by each group's first layer
        self._seen: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> InputStats:
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _new(self, columns: int) -> Accumulator:
        return ACCUMULATORS[self.kind](columns, self.device)

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.groups is None:
                self._seen[name] = args[0]
            elif name in self.accumulators:
                self.accumulators[name].add(args[0])

        return hook

    def after_batch(self) -> None:
        """Close the first batch: group layers by the input object they received, then accumulate it."""
        if self.groups is not None:
            return
        by_input: dict[int, list[str]] = {}
        for name, x in self._seen.items():
            by_input.setdefault(id(x), []).append(name)
        self.groups = list(by_input.values())
        for group in self.groups:
            leader = group[0]
            self.accumulators[leader] = self._new(self.layers[leader].in_features)
            self.accumulators[leader].add(self._seen[leader])
        self._seen.clear()

    def of(self, name: str) -> Accumulator:
        assert self.groups is not None
        leader = next(group[0] for group in self.groups if name in group)
        return self.accumulators[leader]


def _solve_layers(
    layers: dict[str, nn.Linear],
    stats: InputStats | None,
    targets: dict[str, float],
    masters: dict[str, torch.Tensor],
    request: PruneRequest,
) -> list[LayerResult]:
    """Solve each layer on its master weight (storage precision), replacing it in `masters`; the
    block's own weight (compute precision) gets the pruned values for the forward passes after."""
    method, options = METHODS[request.method], request.method_options
    results = []
    prepared: dict[int, object] = {}  # what the solver derives once per shared input
    for name, layer in layers.items():
        start = time.perf_counter()
        weight = masters[name]
        acc = stats.of(name) if stats is not None else None
        statistic = acc.value if acc is not None else None
        if statistic is not None and id(acc) not in prepared:
            prepared[id(acc)] = method.prepare(statistic, options, weight.device)
        pruned = method.solve(
            weight,
            targets[name],
            request.pattern,
            statistic=statistic,
            options=options,
            prepared=prepared.get(id(acc)),
        )
        hessian = statistic if method.statistic == "hessian" else None
        error = layer_error(weight, pruned, hessian) if hessian is not None else None
        masters[name] = pruned
        layer.weight.data.copy_(pruned)
        results.append(
            LayerResult(
                name,
                tuple(pruned.shape),
                targets[name],
                achieved_sparsity(pruned),
                error,
                time.perf_counter() - start,
            )
        )
    return results


@torch.inference_mode()
def collect(
    block: nn.Module,
    index: int,
    layers: dict[str, nn.Linear],
    kind: str,
    batches: list[Batch],
    device: torch.device,
    outputs: list[torch.Tensor] | None = None,
) -> InputStats:
    """One forward pass over the calibration batches with statistics hooks on `layers`.

    `outputs`, if given, are buffers shaped like the leading batches' hidden states that receive
    the block's outputs (a batch's own `hidden` may be its buffer: its input is read before).
    """
    stats = InputStats(layers, kind, device)
    with stats:
        for position, batch in enumerate(batches):
            out = run_block(block, index, batch, device)
            stats.after_batch()
            if outputs is not None and position < len(outputs):
                outputs[position].copy_(out)
    return stats


@torch.inference_mode()
def prune_block(
    block: nn.Module,
    index: int,
    layers: dict[str, nn.Linear],
    targets: dict[str, float],
    masters: dict[str, torch.Tensor],
    batches: list[Batch],
    request: PruneRequest,
    device: torch.device,
    dense_outputs: list[torch.Tensor],
) -> tuple[list[LayerResult], bool]:
    """Prune `layers` (a subset of the block's linears); return results and whether
    `dense_outputs` (buffers for the leading batches) now hold the block's dense outputs.

    `masters` holds each layer's weight in storage precision (the block may compute in bf16); the
    solvers work on those and leave the pruned weights in it.

    The dense outputs come from the first statistics pass, before any weight changed, so the
    caller can measure the pruned block's output error against them.
    """
    kind = METHODS[request.method].statistic
    if kind == "none" or not batches:
        return _solve_layers(layers, None, targets, masters, request), False
    stats = collect(block, index, layers, kind, batches, device, dense_outputs)
    release_freed_memory()  # the forward's temporaries: the solves allocate differently shaped ones
    if not request.true_sequential:
        return _solve_layers(layers, stats, targets, masters, request), True
    # True sequential: each later group of layers sharing an input gets statistics gathered after
    # the groups before it were pruned, so its solve sees the inputs the pruned block will produce.
    groups = stats.groups or []
    results = _solve_layers({name: layers[name] for name in groups[0]}, stats, targets, masters, request)
    for group in groups[1:]:
        subset = {name: layers[name] for name in group}
        stats = collect(block, index, subset, kind, batches, device)
        results += _solve_layers(subset, stats, targets, masters, request)
    return results, True
