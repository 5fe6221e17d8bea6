"""Cutting one block's width: head groups, then MLP channels, then experts, each chosen from
calibration statistics with its consumer re-fitted (the maths is in `solvers` and `select`).

Heads come first so that the MLP's statistics are gathered with the heads already gone: the
channels are chosen, and down_proj re-fitted, for the inputs the pruned block will really give it.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from shears.pruning.config import StructureSpec
from shears.pruning.streaming import Batch
from shears.pruning.structure import solvers
from shears.pruning.structure.layout import ModelLayout
from shears.pruning.structure.select import choose_units, expert_saliency, forward_all, input_moments


def cut_widths(
    layout: ModelLayout,
    index: int,
    block: nn.Module,
    tensors: dict[str, Tensor],
    calib: list[Batch],
    dense_out: list[Tensor],
    spec: StructureSpec,
    device: torch.device,
    record: dict[str, Any],
) -> tuple[dict[str, Tensor], bool]:
    """Choose the kept heads, channels and experts of block `index`, re-fitting each consumer in
    `tensors` (its checkpoint tensors) and in `block` (so later statistics see the pruned block).

    Returns the kept unit indices by kind and whether `dense_out` now holds the dense block's
    outputs on the leading calibration batches (from the first statistics pass). What was removed
    goes into `record`.
    """
    rules = layout.rules[index]
    prefix = f"{layout.checkpoint_prefix}.{index}."
    kept: dict[str, Tensor] = {}
    measured = False
    start = time.perf_counter()
    for kind in ("heads", "mlp"):
        if kind not in layout.plan.width_kinds or kind not in rules.consumers:
            continue
        consumer = rules.consumers[kind]
        module = block.get_submodule(consumer)
        with input_moments(module, device) as moments:
            forward_all(block, index, calib, device, None if measured else dense_out)
        measured = True
        units, keep = layout.units(kind), keep_count(layout, kind)
        (rule,) = [r for r in rules.params[consumer + ".weight"] if r.axis == 1 and r.kind == kind]
        weight_name, bias_name = prefix + consumer + ".weight", prefix + consumer + ".bias"
        weight = tensors[weight_name].to(device)
        bias = tensors[bias_name].to(device) if bias_name in tensors else None
        magnitude = (
            layout.unit_squared_norms(index, kind, tensors) if spec.channel_score == "magnitude" else None
        )
        kept_units = choose_units(
            spec.channel_score, weight, moments, sum(rule.segments), keep, spec.damp, magnitude
        ).cpu()
        columns = rule.index(kept_units, units).to(device)
        removed_columns = complement(columns, weight.shape[1])
        if spec.reconstruct:
            fitted, new_bias = solvers.refit_consumer(
                weight,
                moments.second,
                columns,
                spec.damp,
                bias=bias,
                mean=moments.mean if bias is not None else None,
            )
        else:
            fitted = weight[:, columns].float()
            new_bias = (
                solvers.compensate_bias(weight, bias, moments.mean, removed_columns)
                if bias is not None
                else None
            )
        error = solvers.output_error(
            weight, moments.second, fitted, columns, bias=bias, new_bias=new_bias, mean=moments.mean
        )
        padded = torch.zeros(weight.shape, dtype=torch.float32, device=device)
        padded[:, columns] = fitted
        tensors[weight_name] = padded.to(tensors[weight_name].dtype).cpu()
        module.weight.data.copy_(padded.to(module.weight.dtype))
        if bias is not None and new_bias is not None:
            tensors[bias_name] = new_bias.to(tensors[bias_name].dtype).cpu()
            module.bias.data.copy_(new_bias.to(module.bias.dtype))
        kept[kind] = kept_units
        record[kind] = {
            "removed": complement(kept_units, units).tolist(),
            "kept": len(kept_units),
            "consumer": consumer,
            "consumer_output_error": error,
        }
    if "experts" in layout.plan.width_kinds and rules.experts_module is not None:
        module = block.get_submodule(rules.experts_module)
        units = layout.units("experts")
        with expert_saliency(module, units, device) as saliency:
            forward_all(block, index, calib, device, None if measured else dense_out)
        measured = True
        kept["experts"] = solvers.top_units(saliency.scores.cpu(), keep_count(layout, "experts"))
        record["experts"] = {
            "removed": complement(kept["experts"], units).tolist(),
            "kept": len(kept["experts"]),
            "saliency": [round(float(v), 6) for v in saliency.scores],
            "routed_tokens": saliency.tokens.tolist(),
        }
    record["seconds"] = time.perf_counter() - start
    return kept, measured


def keep_count(layout: ModelLayout, kind: str) -> int:
    plan = layout.plan
    keep = {"mlp": plan.mlp_keep, "heads": plan.kv_keep, "experts": plan.experts_keep}[kind]
    assert keep is not None
    return keep


def complement(kept: Tensor, size: int) -> Tensor:
    """The indices below `size` that are not in `kept`, sorted."""
    mask = torch.ones(size, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask.nonzero().flatten()
