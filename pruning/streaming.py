"""Activations between decoder blocks: capture what each block receives, run blocks, apply the head.

The model's own forward computes everything around the blocks (embeddings, rotary tables, masks,
final norm, lm_head, logit soft-capping), so it is reused instead of re-implemented per
architecture. For capture, every block is swapped for a recording pass-through: one forward
records block 0's hidden states and the arguments *each* block receives (a sliding-window layer
gets its own mask, Gemma 3's local layers their own rotary tables), and stops at the last block.
Arguments shared by several blocks are the same objects, so they are stored once. For the head,
the blocks are swapped for pass-throughs whose last one returns stored hidden states.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shears.errors import ModelUnavailable, ShearsError

if TYPE_CHECKING:  # skeleton needs accelerate; the GPU check runs these functions without it
    from shears.pruning.skeleton import Skeleton

_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")

# Whether a block class returns a tuple (hidden, ...) or the hidden states: pass-throughs must
# return the same, since the model's loop may take `outputs[0]`. Learnt from real block calls.
_RETURNS_TUPLE: dict[type, bool] = {}


@dataclass(frozen=True)
class Call:
    """What a block receives besides its hidden states: the remaining positional and keyword arguments."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class Batch:
    """The hidden states entering the current block for one batch, and every block's other arguments."""

    hidden: torch.Tensor
    calls: list[Call]  # calls[i]: what block i receives

    def clone(self) -> Batch:
        """Own hidden states; the calls (masks, rotary tables) are shared, never modified."""
        return Batch(self.hidden.clone(), self.calls)


class _Stop(Exception):
    pass


class _Retry(Exception):
    pass


class _Proxy(nn.Module):
    """Stands in for a block; attribute reads (e.g. `attention_type`) fall through to the real one."""

    def __init__(self, block: nn.Module, forward: Callable[..., Any]) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_fn", forward)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._block, name)


def _split(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, Call]:
    kwargs = dict(kwargs)
    if args:
        hidden, rest = args[0], args[1:]
    else:
        hidden, rest = kwargs.pop("hidden_states"), ()
    return hidden, _without_cache(rest, kwargs)


def _without_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
    """Drop KV caches (a block is run many times on the same positions); keep everything else."""
    from transformers.cache_utils import Cache

    kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return Call(tuple(None if isinstance(a, Cache) else a for a in args), kwargs)


@contextlib.contextmanager
def _swapped(
    skeleton: Skeleton, forward_of: Callable[[int, nn.Module], Callable[..., Any]]
) -> Iterator[None]:
    """Every block replaced by a proxy running forward_of(index, block)."""
    originals = list(skeleton.blocks)
    for index, block in enumerate(originals):
        skeleton.blocks[index] = _Proxy(block, forward_of(index, block))
    try:
        yield
    finally:
        for index, block in enumerate(originals):
            skeleton.blocks[index] = block


def _returns_tuple(skeleton: Skeleton) -> bool | None:
    return _RETURNS_TUPLE.get(type(skeleton.blocks[0]))


def _capture_one(skeleton: Skeleton, ids: torch.Tensor, store: torch.device, as_tuple: bool) -> Batch:
    last = skeleton.num_blocks - 1
    calls: list[Call] = []
    first: list[torch.Tensor] = []

    def forward_of(index: int, block: nn.Module) -> Callable[..., Any]:
        def record(*args: Any, **kwargs: Any) -> Any:
            hidden, call = _split(args, kwargs)
            if index == 0:
                first.append(hidden.to(store))
            elif hidden.dim() != first[0].dim():  # the loop indexed our tensor: blocks return tuples
                raise _Retry
            calls.append(call)
            if index == last:
                raise _Stop
            return (hidden,) if as_tuple else hidden

        return record

    name = type(skeleton.model).__name__
    try:
        with _swapped(skeleton, forward_of), contextlib.suppress(_Stop):
            skeleton.model(input_ids=ids.to(skeleton.device), use_cache=False)
    except (_Retry, ShearsError):
        raise
    except Exception as exc:  # the model's own forward: it cannot run as Shears runs it
        raise ModelUnavailable(
            f"{name}: its forward fails as Shears runs it ({type(exc).__name__}: {exc}); Shears runs "
            "it on token ids alone (text calibration) with decoder blocks that pass only hidden "
            "states on, so this architecture is not supported"
        ) from exc
    if len(calls) != skeleton.num_blocks:
        raise ModelUnavailable(
            f"{name}: the forward called {len(calls)} of its {skeleton.num_blocks} decoder blocks "
            "in order; this architecture is not supported"
        )
    return Batch(first[0], calls)


@torch.inference_mode()
def capture_inputs(skeleton: Skeleton, batches: Iterable[torch.Tensor], store: torch.device) -> list[Batch]:
    """Run the model's own forward with recording pass-throughs for each batch of token ids: block 0's
    hidden states (kept on `store`) and what every block receives."""
    captured: list[Batch] = []
    for ids in batches:
        as_tuple = bool(_returns_tuple(skeleton))
        try:
            captured.append(_capture_one(skeleton, ids, store, as_tuple))
        except _Retry:
            _RETURNS_TUPLE[type(skeleton.blocks[0])] = True
            captured.append(_capture_one(skeleton, ids, store, True))
    return captured


def run_block(block: nn.Module, index: int, batch: Batch, device: torch.device) -> torch.Tensor:
    """Output of block `index` for one batch, on the batch's storage device."""
    call = batch.calls[index]
    args = tuple(_to(a, device) for a in call.args)
    kwargs = {k: _to(v, device) for k, v in call.kwargs.items()}
    out = block(batch.hidden.to(device), *args, **kwargs)
    _RETURNS_TUPLE[type(block)] = isinstance(out, (tuple, list))  # GPT-1's blocks return a list
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.to(batch.hidden.device)


def advance(block: nn.Module, index: int, batch: Batch, device: torch.device) -> None:
    """Replace the batch's hidden states by block `index`'s output, in the same buffer.

    Each batch's buffer is allocated once, at capture, and reused by every block: fresh outputs
    per block would interleave long-lived activations with the forward's temporaries on the heap,
    and the fragmentation shows up as resident memory the job does not use.
    """
    batch.hidden.copy_(run_block(block, index, batch, device))


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
    known = _returns_tuple(skeleton)
    for as_tuple in (bool(known),) if known is not None else (False, True):

        def forward_of(index: int, block: nn.Module, as_tuple: bool = as_tuple) -> Callable[..., Any]:
            def passthrough(*args: Any, **kwargs: Any) -> Any:
                hidden = final_hidden.to(skeleton.device) if index == last else _split(args, kwargs)[0]
                return (hidden,) if as_tuple else hidden

            return passthrough

        try:
            with _swapped(skeleton, forward_of):
                logits = skeleton.model(input_ids=ids.to(skeleton.device), use_cache=False).logits
        except Exception as exc:  # the model's own head: it cannot run as Shears runs it
            raise ModelUnavailable(
                f"{type(skeleton.model).__name__}: its forward fails as Shears runs it "
                f"({type(exc).__name__}: {exc}); Shears runs it on token ids alone (text "
                "calibration) with decoder blocks that pass only hidden states on, so this "
                "architecture is not supported"
            ) from exc
        if logits.shape[:-1] == ids.shape:  # else the loop took [0] of our tensor: blocks return tuples
            return logits
    raise RuntimeError(
        f"{type(skeleton.model).__name__}: the head gave logits of shape {tuple(logits.shape)}"
    )
