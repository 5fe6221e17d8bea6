"""Which linear layers get pruned, and to what sparsity: ignore list, per-layer overrides, OWL."""

from __future__ import annotations

import torch

from shears.errors import InvalidRequest
from shears.pruning.block_pruner import collect
from shears.pruning.config import PruneRequest
from shears.pruning.layer_regex import compile_layer_regex
from shears.pruning.masks import check_pattern
from shears.pruning.owl import outlier_ratio, owl_sparsities
from shears.pruning.skeleton import Skeleton
from shears.pruning.stats import InputNormAccumulator
from shears.pruning.streaming import Batch


def layer_targets(
    skeleton: Skeleton, request: PruneRequest, block_sparsity: list[float] | None = None
) -> dict[str, float | None]:
    """Target sparsity of every linear layer in the blocks; None means left dense.

    The first matching ignore regex leaves a layer dense; else the first matching override sets
    its sparsity; else the block's OWL sparsity, or the request's. Regexes are searched in the full
    module name (e.g. `model.layers.3.mlp.down_proj`).
    """
    ignore = [compile_layer_regex(rx, "ignore") for rx in request.ignore]
    overrides = [(compile_layer_regex(rx, "overrides"), value) for rx, value in request.overrides.items()]
    pattern = request.pattern
    targets: dict[str, float | None] = {}
    for index in range(skeleton.num_blocks):
        default = block_sparsity[index] if block_sparsity else request.sparsity
        for name, layer in skeleton.prunables(index).items():
            if any(rx.search(name) for rx in ignore):
                targets[name] = None
                continue
            check_pattern(layer.shape, pattern, name)
            targets[name] = next((value for rx, value in overrides if rx.search(name)), default)
    if all(value is None for value in targets.values()):
        raise InvalidRequest(f"the ignore list {request.ignore} leaves no layer to prune")
    return targets


@torch.inference_mode()
def owl_block_sparsities(skeleton: Skeleton, calib: list[Batch], request: PruneRequest) -> list[float]:
    """A dense pass over all blocks measuring each block's outlier ratio (OWL), then its sparsity.

    `calib` is not modified: the pass streams copies of the hidden states.
    """
    assert request.owl is not None
    device = skeleton.device
    stream = [batch.clone() for batch in calib]
    ratios = []
    for index in range(skeleton.num_blocks):
        block = skeleton.materialize_block(index)
        # The block's linear layers (experts see only their routed tokens: left out of the ratio).
        layers = {n: p for n, p in skeleton.prunables(index).items() if p.expert is None}
        stats, _ = collect(block, index, layers, "norms", stream, device, [batch.hidden for batch in stream])
        pairs = []
        for name, layer in layers.items():
            acc = stats.of(name)
            if acc is None:  # never ran
                continue
            assert isinstance(acc, InputNormAccumulator)
            pairs.append((layer.matrix(layer.module.weight.data), acc.sq_norm))
        ratios.append(outlier_ratio(pairs, request.owl.threshold))
        skeleton.release_block(index)
    return owl_sparsities(ratios, request.sparsity, request.owl.lam)
