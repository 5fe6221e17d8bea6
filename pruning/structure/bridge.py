"""The layer re-fit: the kept block before a removed run takes over what the run added to the residual.

With blocks p+1..q removed, block p's output h_p reaches block q+1 instead of h_q. The last linear
layer of block p that writes into the residual stream (down_proj in pre-norm blocks) is re-fitted
so that its output also carries delta = h_q - h_p, as far as its inputs x can express it:

    W' = argmin E||W' x - (W x + delta)||^2 + d ||W' - W||^2  =  W + E[delta x^T] (E[x x^T] + d I)^-1

The removed blocks run on block p's (pruned) outputs to give delta, one block in memory at a time.
The re-fit assumes the block's output is linear in that layer's weight; blocks that normalise the
layer's output before adding it (Gemma's post-feedforward norms) fail that check on the first
batch and are left as they were (the record says so).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from shears.pruning.skeleton import Skeleton
from shears.pruning.stats import ieee_fp32_matmul
from shears.pruning.streaming import Batch, advance, run_block

LINEARITY_TOLERANCE = 0.05


def residual_writer(block: nn.Module, hidden: int) -> str | None:
    """The last nn.Linear of the block (in definition order) whose output has the residual's width."""
    found = None
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == hidden:
            found = name
    return found


@torch.inference_mode()
def bridge_run(
    block: nn.Module,
    position: int,
    writer: str,
    skeleton: Skeleton,
    run: list[int],
    calib: list[Batch],
    damp: float,
) -> tuple[Tensor | None, dict[str, Any]]:
    """The re-fitted weight of `writer` in `block` (None if the re-fit does not apply) and a record.

    `block` is block p (at `position` in the dense numbering, for its arguments); `calib` holds its
    inputs and is left unchanged; `block` is left unchanged too.
    """
    device = skeleton.device
    layer: nn.Linear = block.get_submodule(writer)
    # 1. block p's outputs, carried through the removed run: h_q
    carried = [Batch(run_block(block, position, batch, device), batch.calls) for batch in calib]
    for index in run:
        removed = skeleton.materialize_block(index)
        for batch in carried:
            advance(removed, index, batch, device)
        skeleton.release_block(index)
    # 2. statistics of the writer's inputs x and of delta = h_q - h_p
    columns = layer.in_features
    second = torch.zeros(columns, columns, dtype=torch.float64, device=device)
    cross = torch.zeros(layer.out_features, columns, dtype=torch.float64, device=device)
    delta_sq = 0.0
    tokens = 0
    inputs: list[Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    try:
        with ieee_fp32_matmul():
            for batch, target in zip(calib, carried, strict=True):
                out = run_block(block, position, batch, device)
                x = inputs.pop().reshape(-1, columns).float()
                delta = (target.hidden.float() - out.float()).reshape(-1, layer.out_features)
                second += (x.T @ x).double()
                cross += (delta.T @ x).double()
                delta_sq += float(delta.square().sum())
                tokens += x.shape[0]
    finally:
        handle.remove()
    second, cross = (second / tokens).float(), (cross / tokens).float()
    regularised = second.clone()
    regularised.diagonal().add_(damp * float(second.diagonal().mean()))
    lower, info = torch.linalg.cholesky_ex(regularised)
    if int(info):
        return None, {"run": run, "writer": writer, "skipped": "input statistics not positive definite"}
    update = torch.cholesky_solve(cross.T, lower).T  # E[delta x^T] (S + d I)^-1
    # fraction of E||delta||^2 the update explains: 1 - E||delta - U x||^2 / E||delta||^2
    explained_sq = float(2 * (update * cross).sum() - ((update @ second) * update).sum())
    record: dict[str, Any] = {
        "run": run,
        "writer": writer,
        "explained": explained_sq / (delta_sq / tokens) if delta_sq else 0.0,
    }
    original = layer.weight.data.clone()
    refitted = original.float() + update
    if not _linear_in(block, position, layer, refitted, calib[0], device):
        record["skipped"] = "the block's output is not linear in this layer (a norm follows it)"
        return None, record
    return refitted, record


def _linear_in(
    block: nn.Module, position: int, layer: nn.Linear, weight: Tensor, batch: Batch, device: torch.device
) -> bool:
    """Whether changing the layer's weight moves the block output by exactly the layer's change."""
    inputs: list[Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    try:
        before = run_block(block, position, batch, device).float()
    finally:
        handle.remove()
    original = layer.weight.data.clone()
    layer.weight.data.copy_(weight.to(original.dtype))
    try:
        after = run_block(block, position, batch, device).float()
    finally:
        layer.weight.data.copy_(original)
    predicted = (inputs[0].float() @ (weight.to(original.dtype).float() - original.float()).T).to(
        after.device
    )
    change = after - before
    scale = float(predicted.norm()) or 1.0
    return float((change - predicted).norm()) / scale < LINEARITY_TOLERANCE
