"""Checkpoint tensor names <-> the model's parameter names, through transformers' own conversions.

`from_pretrained` renames checkpoint keys and converts some tensors: per-expert MoE weights are
stacked into 3-D parameters, a VLM's `language_model.model.layers` becomes
`model.language_model.layers`, GPT-NeoX's `embed_out` becomes `lm_head`, a checkpoint saved
without the `model.` prefix gets it. The same transforms (transformers' conversion mapping, the
one `from_pretrained` applies) are applied here a few tensors at a time, and reversed to write
pruned tensors back under the checkpoint's own names, in its own layout.

A "unit" is what one conversion reads and writes: checkpoint keys in, model parameters out (one
renamed tensor, or e.g. all experts' gate and up weights in, one `gate_up_proj` out).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from shears.errors import ModelUnavailable
from shears.pruning.checkpoint import Checkpoint, TensorSource


@dataclass
class _Unit:
    first: str  # the model parameter the conversion is keyed by
    converter: object | None  # a transformers WeightConverter template, None for a plain rename
    sources: dict[str, list[str]] = field(default_factory=dict)  # source pattern -> checkpoint keys
    targets: list[str] = field(default_factory=list)  # model parameters produced

    @property
    def keys(self) -> list[str]:
        return [key for keys in self.sources.values() for key in keys]


class KeyMap:
    """Which checkpoint tensors make each model parameter, and how to turn them back."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint | TensorSource) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        self.model = model
        self.checkpoint = checkpoint
        self._order = {name: position for position, name in enumerate(checkpoint.names)}
        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        expected = model.state_dict(keep_vars=True)
        prefix = getattr(model, "base_model_prefix", None) or None
        self._units: dict[str, _Unit] = {}
        self.unmapped: list[str] = []  # checkpoint keys no parameter reads (copied through as they are)
        for key in sorted(checkpoint.names, key=dot_natural_key):
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, expected)
            if renamed not in expected and key in expected:
                renamed, pattern = key, None
            if renamed not in expected:
                self.unmapped.append(key)
                continue
            if pattern is None:
                if renamed in self._units:
                    raise ModelUnavailable(
                        f"{checkpoint.folder}: checkpoint tensors {self._units[renamed].keys[0]!r} and "
                        f"{key!r} both load into {renamed!r}"
                    )
                self._units[renamed] = _Unit(renamed, None, {key: [key]}, [renamed])
                continue
            converter = by_pattern[pattern]
            unit = self._units.setdefault(renamed, _Unit(renamed, converter))
            unit.sources.setdefault(pattern, []).append(key)
        # Plain renames here; converter units learn their targets from a dry run on meta tensors.
        self._conversions = [c for c in conversions if c.was_used()]
        self._of_param: dict[str, _Unit] = {}
        for unit in self._units.values():
            if unit.converter is not None:
                unit.targets = sorted(self._convert(unit, self._meta(unit.keys)))
            for target in unit.targets:
                self._of_param[target] = unit
        self._to_key = self._reverse_names()

    # --- names ------------------------------------------------------------------------------

    @property
    def params(self) -> list[str]:
        """Every model parameter the checkpoint's tensors make."""
        return list(self._of_param)

    def has(self, param: str) -> bool:
        return param in self._of_param

    def keys_of(self, params: Iterable[str]) -> list[str]:
        """The checkpoint keys that feed `params` (whole units), in checkpoint order."""
        units = {id(self._of_param[p]): self._of_param[p] for p in params if p in self._of_param}
        wanted = {key for unit in units.values() for key in unit.keys}
        return sorted(wanted, key=self._order.__getitem__)

    def unit_params(self, params: Iterable[str]) -> list[str]:
        """Every model parameter made together with `params` (what converting them back needs)."""
        units = {id(self._of_param[p]): self._of_param[p] for p in params}
        return [target for unit in units.values() for target in unit.targets]

    def converted(self, params: Iterable[str]) -> bool:
        """Whether any of `params` is made by a conversion (not a plain rename)."""
        return any(self._of_param[p].converter is not None for p in params if p in self._of_param)

    # --- tensors ----------------------------------------------------------------------------

    def load(
        self,
        params: Iterable[str],
        device: torch.device | str = "cpu",
        checkpoint: Checkpoint | TensorSource | None = None,
    ) -> dict[str, torch.Tensor]:
        """Model-layout tensors for `params`, read from `checkpoint` (default: the one mapped)."""
        source = checkpoint or self.checkpoint
        wanted = list(params)
        missing = [p for p in wanted if p not in self._of_param]
        if missing:
            raise ModelUnavailable(
                f"{source.folder}: the checkpoint lacks {missing[:3]} (tensor names don't match)"
            )
        out: dict[str, torch.Tensor] = {}
        for unit in {id(self._of_param[p]): self._of_param[p] for p in wanted}.values():
            raw = source.load(unit.keys)
            tensors = (
                self._convert(unit, raw) if unit.converter is not None else {unit.first: raw[unit.keys[0]]}
            )
            for name, tensor in tensors.items():
                if name in wanted:
                    out[name] = tensor.to(device)
        return {p: out[p] for p in wanted}

    def to_checkpoint(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint-layout tensors, by checkpoint key, for model parameters covering whole units."""
        plain = {n: t for n, t in tensors.items() if self._of_param[n].converter is None}
        out = {self._of_param[n].keys[0]: t for n, t in plain.items()}
        rest = {n: t for n, t in tensors.items() if n not in plain}
        if rest:
            for name, tensor in self._revert(rest).items():
                out[self._to_key[name]] = tensor
        return out

    # --- transformers' conversions ----------------------------------------------------------

    def _convert(self, unit: _Unit, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        converter = copy.deepcopy(unit.converter)
        for pattern, keys in unit.sources.items():
            for key in keys:
                converter.add_tensor(unit.first, key, pattern, raw[key])
        result = converter.convert(unit.first, model=self.model, config=self.model.config)
        return {name: (value[0] if isinstance(value, list) else value) for name, value in result.items()}

    def _revert(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from transformers.core_model_loading import revert_weight_conversion

        self.model._weight_conversions = self._conversions  # what from_pretrained would have kept
        return revert_weight_conversion(self.model, dict(tensors))

    def _meta(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return {
            key: torch.empty(self.checkpoint.shapes[key], dtype=self.checkpoint.dtypes[key], device="meta")
            for key in keys
        }

    def _reverse_names(self) -> dict[str, str]:
        """Reverted name -> checkpoint key for every converted parameter, from a dry run on meta
        tensors: a checkpoint whose conversion cannot be written back is refused before any work."""
        converted = [u for u in self._units.values() if u.converter is not None]
        if not converted:
            return {}
        meta = {t: self._convert(u, self._meta(u.keys))[t] for u in converted for t in u.targets}
        reverted = self._revert(meta)
        keys = {key for unit in converted for key in unit.keys}
        prefix = (getattr(self.model, "base_model_prefix", "") or "") + "."
        mapping: dict[str, str] = {}
        for name, tensor in reverted.items():
            # transformers saves with the model's prefix; the checkpoint may lack it (or have it).
            candidates = [name, name.removeprefix(prefix), prefix + name] if prefix != "." else [name]
            key = next((c for c in candidates if c in keys), None)
            if key is None or tuple(tensor.shape) != self.checkpoint.shapes[key]:
                raise ModelUnavailable(
                    f"{self.checkpoint.folder}: transformers converts {name!r} on loading but its reverse "
                    "does not give back the checkpoint's tensors, so pruned weights could not be written in "
                    "its format"
                )
            mapping[name] = key
        if set(mapping.values()) != keys:
            lost = sorted(keys - set(mapping.values()))
            raise ModelUnavailable(
                f"{self.checkpoint.folder}: reversing transformers' conversion loses checkpoint tensors "
                f"{lost[:3]}"
            )
        return mapping


def block_of(name: str, prefix: str) -> int | None:
    """The block index of a model parameter under `prefix` (e.g. model.layers), or None."""
    match = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None
