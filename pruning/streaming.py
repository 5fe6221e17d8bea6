"""Activations between decoder blocks: capture what block 0 receives, run blocks, apply the head.

The model's own forward computes everything around the blocks (embeddings, rotary tables, masks,
final norm, lm_head, logit soft-capping), so it is reused instead of re-implemented per
architecture: block 0 is swapped for a module that records its inputs and stops the forward, and
for the head the blocks are swapped for pass-throughs whose last one returns stored hidden states.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shears.pruning.skeleton import Skeleton


@dataclass
class Batch:
    """The hidden states entering a block for one batch, and the keyword arguments blocks receive."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


class _Stop(Exception):
    pass


class _Proxy(nn.Module):
    """Stands in for a block; attribute reads (e.g. `attention_type`) fall through to the real one."""

    def __init__(self, block: nn.Module, forward: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_fn", forward)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._block, name)


def _split(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    if args:
        return args[0], dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), kwargs


def _without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
    kwargs["use_cache"] = False
    return kwargs


@torch.inference_mode()
def capture_inputs(skeleton: Skeleton, batches: Iterable[torch.Tensor], store: torch.device) -> list[Batch]:
    """Run the model up to block 0 for each batch of token ids; keep block 0's inputs on `store`."""
    captured: list[Batch] = []

    def record(*args: Any, **kwargs: Any) -> torch.Tensor:
        hidden, rest = _split(args, kwargs)
        captured.append(Batch(hidden.to(store), _without_cache(rest)))
        raise _Stop

    original = skeleton.blocks[0]
    skeleton.blocks[0] = _Proxy(original, record)
    try:
        for ids in batches:
            with contextlib.suppress(_Stop):
                skeleton.model(input_ids=ids.to(skeleton.device), use_cache=False)
    finally:
        skeleton.blocks[0] = original
    return captured


def run_block(block: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Block output for one batch, on the batch's storage device."""
    kwargs = {k: _to(v, device) for k, v in batch.kwargs.items()}
    out = block(batch.hidden.to(device), **kwargs)
    if isinstance(out, tuple):
        out = out[0]
    return out.to(batch.hidden.device)


def advance(block: nn.Module, batch: Batch, device: torch.device) -> None:
    """Replace the batch's hidden states by the block's output, in the same buffer.

    Each batch's buffer is allocated once, at capture, and reused by every block: fresh outputs
    per block would interleave long-lived activations with the forward's temporaries on the heap,
    and the fragmentation shows up as resident memory the job does not use.
    """
    batch.hidden.copy_(run_block(block, batch, device))


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


@torch.inference_mode()
def head_logits(skeleton: Skeleton, ids: torch.Tensor, final_hidden: torch.Tensor) -> torch.Tensor:
    """Logits for `ids` given the hidden states after the last block (from the model's own head)."""
    last = skeleton.num_blocks - 1
    originals = list(skeleton.blocks)

    def passthrough(*args: Any, **kwargs: Any) -> torch.Tensor:
        return _split(args, kwargs)[0]

    def emit(*args: Any, **kwargs: Any) -> torch.Tensor:
        return final_hidden.to(skeleton.device)

    for index, block in enumerate(originals):
        skeleton.blocks[index] = _Proxy(block, emit if index == last else passthrough)
    try:
        return skeleton.model(input_ids=ids.to(skeleton.device), use_cache=False).logits
    finally:
        for index, block in enumerate(originals):
            skeleton.blocks[index] = block
