"""Prune one decoder block: gather input statistics with hooks, solve each matrix, write it back.

Layers that read the same input tensor (q/k/v, gate/up) are found on the first batch and share one
accumulator, so a Hessian is computed once per input, not once per layer. MoE experts are solved
one expert at a time from the tokens their router sends them (pruning/experts.py).

Error correction (request.error_correction) fits each linear layer to the dense model's outputs for
the same tokens (solvers/correction.py), group after group: a group's inputs are gathered once the
groups before it were pruned and corrected (the dense stream runs through the block's dense
copies). MoE experts are not corrected: the dense and the pruned model route tokens differently, so
an expert's inputs in the two models do not pair up token for token; experts keep the plain
per-expert fit on their routed tokens (`corrected` in the manifest).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Self

import torch
from torch import nn

from shears.pruning.config import PruneRequest
from shears.pruning.experts import MIN_EXPERT_TOKENS, ExpertCapture, RoutedInputs, intermediate
from shears.pruning.masks import achieved_sparsity
from shears.pruning.methods import METHODS
from shears.pruning.prunable import ExpertsModule, Prunable
from shears.pruning.resources import cpu_has_fast_bf16, fast_matmul_dtype, release_freed_memory
from shears.pruning.solvers import layer_error
from shears.pruning.solvers.correction import corrected_target, correction_factor
from shears.pruning.stats import ACCUMULATORS, Accumulator, CorrectionAccumulator, HessianAccumulator
from shears.pruning.streaming import Batch, advance, run_block

# Rows a layer's reported error is taken over (solvers.layer_error's estimate; exact below this).
ERROR_ROWS = 512


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, int]
    target: float
    sparsity: float
    error: float | None  # relative ||WX - W'X||^2 / ||WX||^2 where a Hessian was collected (ERROR_ROWS)
    seconds: float
    param: str  # the model parameter holding the matrix
    expert: int | None = None  # its expert, in a fused 3-D experts parameter
    transposed: bool = False  # stored [in, out] (Conv1D, some experts)
    tokens: int | None = None  # calibration tokens routed to the expert
    fallback: bool = False  # the expert saw too few tokens: pruned with all of the layer's tokens
    corrected: bool = False  # fitted to the dense model's outputs (error correction)


class _LayerHooks:
    """A forward hook on each layer's module while in a `with` block; subclasses say what it does."""

    layers: dict[str, Prunable]
    _handles: list[torch.utils.hooks.RemovableHandle]

    def __enter__(self) -> Self:
        for name, layer in self.layers.items():
            self._handles.append(layer.module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        raise NotImplementedError


class InputStats(_LayerHooks):
    """Forward hooks accumulating per-input statistics for a set of linear layers."""

    def __init__(
        self, layers: dict[str, Prunable], kind: str, device: torch.device, correcting: bool = False
    ) -> None:
        self.layers = layers
        self.kind = kind  # a key of ACCUMULATORS: the statistic a method needs
        self.device = device
        # Error correction: each batch's dense-model inputs of the same layers (set before the
        # pruned stream's pass) pair up with the pruned-model inputs the hooks see.
        self.correcting = correcting
        self.dense: dict[str, torch.Tensor] = {}
        # A Hessian of bf16 inputs multiplies them in bf16 where that is fast (stats.HessianAccumulator).
        self.bf16_products = kind == "hessian" and device.type == "cpu" and cpu_has_fast_bf16()
        self.batch_tokens = 0  # tokens of the current batch: a layer seeing fewer is routed
        self.groups: list[list[str]] | None = None  # layers sharing one input, in execution order
        self.accumulators: dict[str, Accumulator] = {}  # keyed by each group's first layer
        self._seen: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _new(self, columns: int) -> Accumulator:
        if self.correcting:
            return CorrectionAccumulator(columns, self.device)
        if self.bf16_products:
            return HessianAccumulator(columns, self.device, bf16_products=True)
        return ACCUMULATORS[self.kind](columns, self.device)

    def _add(self, name: str, x: torch.Tensor) -> None:
        accumulator = self.accumulators[name]
        if not isinstance(accumulator, CorrectionAccumulator):
            accumulator.add(x)
            return
        dense = self.dense.get(name)
        # Inputs pair up token for token only where both models ran the layer on every token of the
        # batch; a routed layer (an expert kept as a module list) sees different tokens in each.
        if dense is not None and dense.shape == x.shape and x.shape[:-1].numel() == self.batch_tokens:
            accumulator.add_pair(x, dense)
        else:
            accumulator.add_unpaired(x)

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.groups is None:
                self._seen[name] = args[0]
            elif name in self.accumulators:
                self._add(name, args[0])

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
            self._add(leader, self._seen[leader])
        self._seen.clear()

    def _leader(self, name: str) -> str | None:
        assert self.groups is not None
        return next((group[0] for group in self.groups if name in group), None)

    def of(self, name: str) -> Accumulator | None:
        """The layer's statistic; None for a layer the forward never ran (e.g. the cross-attention
        of a decoder used without an encoder): it does not touch the outputs and stays dense."""
        leader = self._leader(name)
        return self.accumulators.get(leader) if leader is not None else None

    def release(self, name: str) -> None:
        """Drop the statistic of `name`'s group once its layers are solved (a K x K Hessian each)."""
        leader = self._leader(name)
        if leader is not None:
            self.accumulators.pop(leader, None)


class DenseInputs(_LayerHooks):
    """Forward hooks keeping, for one batch, the input each of a set of linear layers receives."""

    def __init__(self, layers: dict[str, Prunable]) -> None:
        self.layers = layers
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.inputs[name] = args[0]

        return hook


def _block_tensor(layer: Prunable) -> torch.Tensor:
    """The block's own (compute precision) parameter holding `layer`."""
    return getattr(layer.module, layer.param.rpartition(".")[2])


class DenseWeights:
    """Error correction: the block's dense (compute precision) copies of the matrices solved so far,
    bound in place of the pruned ones while the dense stream runs through the block."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # by parameter: (param, dense)

    def keep(self, name: str, param: torch.Tensor) -> None:
        self.held[name] = (param, param.data)

    @contextmanager
    def bound(self) -> Iterator[None]:
        current = {name: param.data for name, (param, _) in self.held.items()}
        for param, dense in self.held.values():
            param.data = dense
        try:
            yield
        finally:
            for name, (param, _) in self.held.items():
                param.data = current[name]


@contextmanager
def _solving(
    layers: list[Prunable], masters: dict[str, torch.Tensor], dense: DenseWeights | None = None
) -> Iterator[None]:
    """While `layers` are solved the block holds no copy of their parameters; after, each is bound to
    its solved master, cast to the block's compute dtype.

    The solvers read and write the masters only; the block's copies (bf16 for an AMX forward, or a
    second fp32 copy) would sit unused at the solves' memory peak: 103 MiB of bf16 (206 of fp32) per
    block at hidden 2048. Where the dtypes agree the parameter becomes the master itself, no copy:
    nothing writes either in place afterwards (the block's forwards read it, _write_block reads the
    master, release_block drops the parameter). With `dense` (error correction) the dense copies are
    kept there instead of freed: the dense stream still runs through the block.
    """
    held = {}
    for layer in layers:
        if layer.param not in held:
            param = _block_tensor(layer)
            held[layer.param] = (param, param.dtype)
            if dense is not None:
                dense.keep(layer.param, param)
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    try:
        yield
    finally:
        for name, (param, dtype) in held.items():
            param.data = masters[name].to(dtype)


def _solve_layers(
    layers: list[Prunable],
    statistic_of: Callable[[str], Accumulator | None],
    targets: dict[str, float],
    masters: dict[str, torch.Tensor],
    request: PruneRequest,
    release: Callable[[str], None] | None = None,
    write_block: bool = True,
    **record: object,
) -> list[LayerResult]:
    """Solve each matrix on its master weight (storage precision, `masters` by parameter), writing
    the result into it. `write_block`: the block's own parameter (compute precision) gets the pruned
    values too, for the forward passes after (experts: the caller's _solving re-binds linears').

    With error correction (a CorrectionAccumulator whose inputs paired up) each matrix is solved for
    its corrected target (solvers.correction) instead of its own dense weight. Once every layer
    sharing an input is solved, its factorisation is dropped and `release(name)` frees its statistic:
    only the current input group's are alive.
    """
    method, options = METHODS[request.method], request.method_options
    needed = method.statistic_of(options)
    results = []
    # Layers left per shared statistic (by identity; no reference kept, so a released one is freed).
    unsolved = Counter(
        id(acc) for acc in map(statistic_of, (layer.name for layer in layers)) if acc is not None
    )
    prepared: dict[int, object] = {}  # what the solver derives once per shared input
    corrected: dict[str, torch.Tensor] = {}
    for layer in layers:
        start = time.perf_counter()
        acc = statistic_of(layer.name)
        if acc is None and needed != "none":
            continue  # never ran on the calibration tokens: left dense
        view = layer.matrix(masters[layer.param])
        statistic = acc.value if acc is not None else None
        if statistic is not None and id(acc) not in prepared:
            if isinstance(acc, CorrectionAccumulator) and acc.paired:
                assert request.error_correction is not None
                group = [other for other in layers if statistic_of(other.name) is acc]
                corrected.update(_corrected_targets(group, acc, masters, request.error_correction.damp))
            prepared[id(acc)] = method.prepare(statistic, options, view.device)
        is_corrected = layer.name in corrected
        weight = corrected.pop(layer.name) if is_corrected else view.contiguous()
        pruned = method.solve(
            weight,
            targets[layer.name],
            request.pattern,
            statistic=statistic,
            options=options,
            prepared=prepared.get(id(acc)),
        ).to(view.dtype)
        hessian = statistic if needed == "hessian" else None
        error = None
        if hessian is not None:  # a report's estimate: bf16 products where they are fast
            error = layer_error(
                weight, pruned, hessian, max_rows=ERROR_ROWS, matmul_dtype=fast_matmul_dtype(view.device)
            )
        del weight, statistic, hessian
        view.copy_(pruned)
        if write_block:
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
                corrected=is_corrected,
                **record,
            )
        )
        if acc is not None:
            unsolved[id(acc)] -= 1
            if not unsolved[id(acc)]:  # the group is done: free its factorisation and statistic
                prepared.pop(id(acc), None)
                del acc
                if release is not None:  # a linear group's (an expert's statistics are its caller's)
                    release(layer.name)
                    release_freed_memory()
    return results


def _corrected_targets(
    group: list[Prunable], acc: CorrectionAccumulator, masters: dict[str, torch.Tensor], damp: float
) -> dict[str, torch.Tensor]:
    """Each layer's corrected target ([out, in], fp32); then the cross moment and the factor are freed."""
    hessian = acc.hessian
    damping = damp * float(hessian.diagonal().mean()) or damp
    factor = correction_factor(hessian, damping)
    out = {
        layer.name: corrected_target(layer.matrix(masters[layer.param]), acc.cross, factor, damping)
        for layer in group
    }
    del factor
    acc.release_cross()
    return out


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
    dense_batches: list[Batch] | None = None,
    dense_weights: DenseWeights | None = None,
) -> tuple[InputStats, ExpertCapture]:
    """One forward pass over the calibration batches with statistics hooks on `layers` (linear
    layers) and capture hooks on `experts` modules.

    `outputs`, if given, are buffers shaped like the leading batches' hidden states that receive
    the block's outputs (a batch's own `hidden` may be its buffer: its input is read before).
    `dense_batches` (error correction): the dense model's stream for the same tokens, at this block's
    input; each batch first runs through the dense block there (`dense_weights` bound in place of
    the matrices already pruned), with only DenseInputs' hooks on, and its layers' inputs pair up
    with the pruned stream's. The dense stream is left where it is (prune_block advances it).
    """
    stats = InputStats(layers, kind, device, correcting=dense_batches is not None)
    capture = ExpertCapture(experts or [], batches[0].hidden.device if batches else device)
    for position, batch in enumerate(batches):
        if dense_batches is not None:
            with dense_weights.bound() if dense_weights else nullcontext(), DenseInputs(layers) as dense:
                run_block(block, index, dense_batches[position], device)
            stats.dense = dense.inputs
        stats.batch_tokens = batch.hidden.shape[:-1].numel()
        with stats, capture:
            out = run_block(block, index, batch, device)
            stats.after_batch()
        stats.dense = {}
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
    dense_batches: list[Batch] | None = None,
) -> tuple[list[LayerResult], bool]:
    """Prune `layers` (a subset of the block's prunable matrices); return results and whether
    `dense_outputs` (buffers for the leading batches) now hold the block's dense outputs.

    `dense_batches`: the dense model's stream for error correction (see `collect`); it leaves
    holding this block's dense outputs. The linear layers are corrected, the experts are not.

    `masters` holds each layer's parameter in storage precision (the block may compute in bf16);
    the solvers work on those and leave the pruned weights in them.

    The dense outputs come from the first statistics pass, before any weight changed, so the
    caller can measure the pruned block's output error against them.
    """
    kind = METHODS[request.method].statistic_of(request.method_options)
    linears = {name: layer for name, layer in layers.items() if layer.expert is None}
    moe = [g for g in experts or [] if any(layer.module is g.module for layer in layers.values())]
    if kind == "none" or not batches:
        return _solve_layers(list(layers.values()), lambda _: None, targets, masters, request), False
    correcting = dense_batches is not None
    if correcting and (kind != "hessian" or request.true_sequential):
        raise ValueError("error correction needs a Hessian method and no true_sequential")
    stats, capture = collect(block, index, linears, kind, batches, device, dense_outputs, moe, dense_batches)
    release_freed_memory()  # the forward's temporaries: the solves allocate differently shaped ones
    dense_weights = DenseWeights() if correcting else None

    def solve(subset: list[Prunable], stats: InputStats) -> list[LayerResult]:
        with _solving(subset, masters, dense_weights):
            return _solve_layers(
                subset, stats.of, targets, masters, request, stats.release, write_block=False
            )

    if not (request.true_sequential or correcting):
        results = solve(list(linears.values()), stats)
    else:
        # Each later group of layers sharing an input gets statistics gathered after the groups
        # before it were pruned, so its solve sees the inputs the pruned block will produce (true
        # sequential). Error correction needs it: collected with every layer dense, a later layer's
        # inputs would still carry the errors the corrected layers before it repair, and its fit
        # would correct them a second time (measured on SmolLM2, Wanda 50%: perplexity 59 without
        # correction, 2,208 with it collected in one pass).
        groups = stats.groups or []
        results = solve([linears[n] for n in groups[0]], stats) if groups else []
        for group in groups[1:]:
            subset = {name: linears[name] for name in group}
            stats, _ = collect(
                block, index, subset, kind, batches, device, None, None, dense_batches, dense_weights
            )
            results += solve(list(subset.values()), stats)
        if correcting:  # the dense stream moves on to the dense block's output (experts still dense)
            assert dense_batches is not None and dense_weights is not None
            with dense_weights.bound():
                for batch in dense_batches:
                    advance(block, index, batch, device)
        if moe and request.true_sequential:  # the experts' inputs after every linear was pruned
            del capture
            _, capture = collect(block, index, {}, kind, batches, device, experts=moe)
    for group in moe:
        results += _solve_experts(
            group, capture.inputs[group.name], layers, kind, targets, masters, request, device
        )
        capture.inputs[group.name] = RoutedInputs()  # this module's copy of the activations
    return results, True
