"""Prune one decoder block: gather input statistics with hooks, solve each matrix, write it back.

Layers that read the same input tensor (q/k/v, gate/up) are found on the first batch and share one
accumulator, so a Hessian is computed once per input, not once per layer. MoE experts are solved
one expert at a time from the tokens their router sends them (pruning/experts.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from shears.pruning.config import PruneRequest
from shears.pruning.experts import MIN_EXPERT_TOKENS, ExpertCapture, RoutedInputs, intermediate
from shears.pruning.masks import achieved_sparsity
from shears.pruning.methods import METHODS
from shears.pruning.prunable import ExpertsModule, Prunable
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
    param: str  # the model parameter holding the matrix
    expert: int | None = None  # its expert, in a fused 3-D experts parameter
    transposed: bool = False  # stored [in, out] (Conv1D, some experts)
    tokens: int | None = None  # calibration tokens routed to the expert
    fallback: bool = False  # the expert saw too few tokens: pruned with all of the layer's tokens


class InputStats:
    """Forward hooks accumulating per-input statistics for a set of linear layers."""

    def __init__(self, layers: dict[str, Prunable], kind: str, device: torch.device) -> None:
        self.layers = layers
        self.kind = kind  # a key of ACCUMULATORS: the statistic a method needs
        self.device = device
        self.groups: list[list[str]] | None = None  # layers sharing one input, in execution order
        self.accumulators: dict[str, Accumulator] = {}  # keyed by each group's first layer
        self._seen: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> InputStats:
        for name, layer in self.layers.items():
            self._handles.append(layer.module.register_forward_hook(self._hook(name)))
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

    def of(self, name: str) -> Accumulator | None:
        """The layer's statistic; None for a layer the forward never ran (e.g. the cross-attention
        of a decoder used without an encoder): it does not touch the outputs and stays dense."""
        assert self.groups is not None
        leader = next((group[0] for group in self.groups if name in group), None)
        return self.accumulators[leader] if leader is not None else None


def _block_tensor(layer: Prunable) -> torch.Tensor:
    """The block's own (compute precision) parameter holding `layer`."""
    return getattr(layer.module, layer.param.rpartition(".")[2])


def _solve_layers(
    layers: list[Prunable],
    statistic_of: Callable[[str], Accumulator | None],
    targets: dict[str, float],
    masters: dict[str, torch.Tensor],
    request: PruneRequest,
    **record: object,
) -> list[LayerResult]:
    """Solve each matrix on its master weight (storage precision, `masters` by parameter), writing
    the result into it; the block's own parameter (compute precision) gets the pruned values too,
    for the forward passes after."""
    method, options = METHODS[request.method], request.method_options
    results = []
    prepared: dict[int, object] = {}  # what the solver derives once per shared input
    for layer in layers:
        start = time.perf_counter()
        view = layer.matrix(masters[layer.param])
        weight = view.contiguous()
        acc = statistic_of(layer.name)
        if acc is None and method.statistic != "none":
            continue  # never ran on the calibration tokens: left dense
        statistic = acc.value if acc is not None else None
        if statistic is not None and id(acc) not in prepared:
            prepared[id(acc)] = method.prepare(statistic, options, weight.device)
        pruned = method.solve(
            weight,
            targets[layer.name],
            request.pattern,
            statistic=statistic,
            options=options,
            prepared=prepared.get(id(acc)),
        )
        hessian = statistic if method.statistic == "hessian" else None
        error = layer_error(weight, pruned, hessian) if hessian is not None else None
        view.copy_(pruned)
        layer.matrix(_block_tensor(layer).data).copy_(pruned)
        results.append(
            LayerResult(
                layer.name,
                tuple(pruned.shape),
                targets[layer.name],
                achieved_sparsity(pruned),
                error,
                time.perf_counter() - start,
                layer.param,
                layer.expert,
                layer.transposed,
                **record,
            )
        )
    return results


@torch.inference_mode()
def collect(
    block: nn.Module,
    index: int,
    layers: dict[str, Prunable],
    kind: str,
    batches: list[Batch],
    device: torch.device,
    outputs: list[torch.Tensor] | None = None,
    experts: list[ExpertsModule] | None = None,
) -> tuple[InputStats, ExpertCapture]:
    """One forward pass over the calibration batches with statistics hooks on `layers` (linear
    layers) and capture hooks on `experts` modules.

    `outputs`, if given, are buffers shaped like the leading batches' hidden states that receive
    the block's outputs (a batch's own `hidden` may be its buffer: its input is read before).
    """
    stats = InputStats(layers, kind, device)
    capture = ExpertCapture(experts or [], batches[0].hidden.device if batches else device)
    with stats, capture:
        for position, batch in enumerate(batches):
            out = run_block(block, index, batch, device)
            stats.after_batch()
            if outputs is not None and position < len(outputs):
                outputs[position].copy_(out)
    return stats, capture


def _expert_statistic(
    kind: str,
    columns: int,
    inputs: list[torch.Tensor],
    device: torch.device,
    make: Callable[..., torch.Tensor],
) -> Accumulator:
    acc = ACCUMULATORS[kind](columns, device)
    for x in inputs:
        if x.shape[0]:
            acc.add(make(x.to(device)))
    return acc


def _solve_experts(
    group: ExpertsModule,
    routed: RoutedInputs,
    layers: dict[str, Prunable],
    kind: str,
    targets: dict[str, float],
    masters: dict[str, torch.Tensor],
    request: PruneRequest,
    device: torch.device,
) -> list[LayerResult]:
    """Each expert in turn: statistics of its routed tokens (or the fallback), then its solves.
    The down projection's inputs come from the dense up projection, or from the pruned one with
    true sequential."""
    layout = group.layout
    results: list[LayerResult] = []
    for expert in range(group.count):
        up = layers.get(f"{group.name}.{layout.up}[{expert}]")
        down = layers.get(f"{group.name}.{layout.down}[{expert}]")
        if up is None and down is None:
            continue
        tokens = routed.tokens(expert)
        fallback = tokens < MIN_EXPERT_TOKENS
        rows = routed.routed(expert)
        inputs = routed.hidden if fallback else [h[r] for h, r in zip(routed.hidden, rows, strict=True)]
        record = {"tokens": tokens, "fallback": fallback}

        def down_input(x: torch.Tensor, expert: int = expert) -> torch.Tensor:
            return intermediate(group, expert, x)

        statistic = {}
        if down is not None and not request.true_sequential:
            statistic[down.name] = _expert_statistic(kind, down.in_features, inputs, device, down_input)
        if up is not None:
            statistic[up.name] = _expert_statistic(kind, up.in_features, inputs, device, lambda x: x)
            results += _solve_layers([up], statistic.get, targets, masters, request, **record)
            del statistic[up.name]
        if down is not None:
            if down.name not in statistic:
                statistic[down.name] = _expert_statistic(kind, down.in_features, inputs, device, down_input)
            results += _solve_layers([down], statistic.get, targets, masters, request, **record)
        del statistic
    return results


@torch.inference_mode()
def prune_block(
    block: nn.Module,
    index: int,
    layers: dict[str, Prunable],
    targets: dict[str, float],
    masters: dict[str, torch.Tensor],
    batches: list[Batch],
    request: PruneRequest,
    device: torch.device,
    dense_outputs: list[torch.Tensor],
    experts: list[ExpertsModule] | None = None,
) -> tuple[list[LayerResult], bool]:
    """Prune `layers` (a subset of the block's prunable matrices); return results and whether
    `dense_outputs` (buffers for the leading batches) now hold the block's dense outputs.

    `masters` holds each layer's parameter in storage precision (the block may compute in bf16);
    the solvers work on those and leave the pruned weights in them.

    The dense outputs come from the first statistics pass, before any weight changed, so the
    caller can measure the pruned block's output error against them.
    """
    kind = METHODS[request.method].statistic
    linears = {name: layer for name, layer in layers.items() if layer.expert is None}
    moe = [g for g in experts or [] if any(layer.module is g.module for layer in layers.values())]
    if kind == "none" or not batches:
        return _solve_layers(list(layers.values()), lambda _: None, targets, masters, request), False
    stats, capture = collect(block, index, linears, kind, batches, device, dense_outputs, moe)
    release_freed_memory()  # the forward's temporaries: the solves allocate differently shaped ones
    if not request.true_sequential:
        results = _solve_layers(list(linears.values()), stats.of, targets, masters, request)
    else:
        # True sequential: each later group of layers sharing an input gets statistics gathered
        # after the groups before it were pruned, so its solve sees the inputs the pruned block will
        # produce; the experts get theirs after every linear layer was pruned.
        groups = stats.groups or []
        results = (
            _solve_layers([linears[n] for n in groups[0]], stats.of, targets, masters, request)
            if groups
            else []
        )
        for group in groups[1:]:
            subset = {name: linears[name] for name in group}
            stats, _ = collect(block, index, subset, kind, batches, device)
            results += _solve_layers(list(subset.values()), stats.of, targets, masters, request)
        if moe:
            del capture
            _, capture = collect(block, index, {}, kind, batches, device, experts=moe)
    for group in moe:
        results += _solve_experts(
            group, capture.inputs[group.name], layers, kind, targets, masters, request, device
        )
        capture.inputs[group.name] = RoutedInputs()  # this module's copy of the activations
    return results, True
