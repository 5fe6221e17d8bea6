"""How many units a structured request removes, checked against the model's config before any work.

Counts only: which units go is decided later from calibration statistics. Every refusal here is an
InvalidRequest raised before the job reads a weight, with a message that says what to change.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shears.errors import InvalidRequest
from shears.pruning.config import StructureSpec

# Config attribute names, first match wins (read through the config object, so aliases resolve).
INTERMEDIATE_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Dimensions:
    """The unit counts of a decoder, read from its (text) config."""

    layers: int
    intermediate: int | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    experts: int | None
    experts_per_token: int | None

    @property
    def queries_per_group(self) -> int:
        assert self.heads and self.kv_heads
        return self.heads // self.kv_heads


def _first(config: Any, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def dimensions(text_config: Any) -> Dimensions:
    layers = _first(text_config, LAYER_KEYS)
    if layers is None:
        raise InvalidRequest(f"{text_config.model_type}: the config names no layer count (num_hidden_layers)")
    heads = _first(text_config, ("num_attention_heads", "n_head"))
    kv_heads = _first(text_config, ("num_key_value_heads",)) or heads
    head_dim = _first(text_config, ("head_dim",))
    hidden = _first(text_config, ("hidden_size", "n_embd"))
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    experts = _first(text_config, EXPERT_KEYS)
    return Dimensions(
        layers=layers,
        intermediate=_first(text_config, INTERMEDIATE_KEYS),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        experts=experts if experts else None,
        experts_per_token=_first(text_config, ("num_experts_per_tok", "top_k", "moe_topk")),
    )


@dataclass(frozen=True)
class StructurePlan:
    """Counts after pruning; None where the request leaves that unit alone."""

    remove_layers: int
    mlp_keep: int | None
    kv_keep: int | None
    experts_keep: int | None

    @property
    def width_kinds(self) -> tuple[str, ...]:
        kinds = (("mlp", self.mlp_keep), ("heads", self.kv_keep), ("experts", self.experts_keep))
        return tuple(kind for kind, keep in kinds if keep is not None)


def plan_structure(spec: StructureSpec, dims: Dimensions, model_type: str) -> StructurePlan:
    """The unit counts the request asks for; InvalidRequest for anything the model cannot give."""
    remove_layers = 0
    if spec.layers > 0:
        remove_layers = math.floor(dims.layers * spec.layers + 0.5)
        if remove_layers >= dims.layers:
            raise InvalidRequest(
                f"structure.layers={spec.layers:g} would remove all {dims.layers} decoder blocks; "
                f"at most {dims.layers - 1} can go (layers < {(dims.layers - 0.5) / dims.layers:.3f})"
            )
        if remove_layers == 0:
            raise InvalidRequest(
                f"structure.layers={spec.layers:g} removes no block of {dims.layers}; "
                f"ask for at least {0.5 / dims.layers:.3f}"
            )
    return StructurePlan(
        remove_layers=remove_layers,
        mlp_keep=_mlp_keep(spec, dims, model_type) if spec.mlp > 0 else None,
        kv_keep=_kv_keep(spec, dims, model_type) if spec.heads > 0 else None,
        experts_keep=_experts_keep(spec, dims, model_type) if spec.experts > 0 else None,
    )


def _mlp_keep(spec: StructureSpec, dims: Dimensions, model_type: str) -> int:
    width, granule = dims.intermediate, spec.granule
    if width is None:
        raise InvalidRequest(
            f"structure.mlp: {model_type} has no MLP width in its config ({INTERMEDIATE_KEYS})"
        )
    keep = granule * math.floor(width * (1 - spec.mlp) / granule + 0.5)
    if keep < granule:
        raise InvalidRequest(
            f"structure.mlp={spec.mlp:g} leaves {width * (1 - spec.mlp):.0f} of {width} MLP channels, "
            f"below one granule of {granule}; remove less or lower structure.granule"
        )
    if keep >= width:
        raise InvalidRequest(
            f"structure.mlp={spec.mlp:g} removes less than one granule ({granule}) of {width} MLP channels; "
            f"ask for at least {granule / 2 / width:.3f} or lower structure.granule"
        )
    return keep


def _kv_keep(spec: StructureSpec, dims: Dimensions, model_type: str) -> int:
    if not dims.heads or not dims.kv_heads or not dims.head_dim:
        raise InvalidRequest(f"structure.heads: {model_type}'s config gives no attention head counts")
    if dims.kv_heads == 1:
        raise InvalidRequest(
            f"structure.heads: {model_type} has a single key-value head, and head groups are removed "
            "whole (all query heads sharing it): there is nothing to remove; use mlp or layers"
        )
    keep = math.floor(dims.kv_heads * (1 - spec.heads) + 0.5)
    if keep < 1:
        raise InvalidRequest(f"structure.heads={spec.heads:g} would remove every key-value head group")
    if keep >= dims.kv_heads:
        raise InvalidRequest(
            f"structure.heads={spec.heads:g} removes no head group of {dims.kv_heads} (groups of "
            f"{dims.queries_per_group} query heads stay whole); ask for at least {0.5 / dims.kv_heads:.3f}"
        )
    return keep


def _experts_keep(spec: StructureSpec, dims: Dimensions, model_type: str) -> int:
    if not dims.experts:
        raise InvalidRequest(
            f"structure.experts: {model_type} is a dense model (its config lists no experts)"
        )
    keep = math.floor(dims.experts * (1 - spec.experts) + 0.5)
    top_k = dims.experts_per_token or 1
    if keep < top_k:
        raise InvalidRequest(
            f"structure.experts={spec.experts:g} leaves {keep} experts, fewer than the {top_k} each "
            "token is routed to; remove less"
        )
    if keep >= dims.experts:
        raise InvalidRequest(
            f"structure.experts={spec.experts:g} removes no expert of {dims.experts}; "
            f"ask for at least {0.5 / dims.experts:.3f}"
        )
    return keep


class _ConfigFile:
    """A config.json's (text) fields read as attributes, None where the file does not spell one out."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getattr__(self, name: str) -> Any:
        return self._values.get(name)


def check_config_file(spec: StructureSpec, folder: Path) -> None:
    """At the edge, without torch: the request's counts against a local folder's config.json, so an
    impossible structure is refused at submission (HTTP 422) instead of failing the job later.

    A config may rely on its class's defaults for some fields; a kind whose counts the file does not
    spell out is left to the job, which reads the full config (plan_structure again, before any work).
    """
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # the job reports an unreadable config in its own words
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
    if not isinstance(text, dict) or not any(isinstance(text.get(k), int) for k in LAYER_KEYS):
        return
    fields = _ConfigFile(text)
    dims = dimensions(fields)
    model_type = str(text.get("model_type") or data.get("model_type") or "the model")
    dense = dims.experts is None and "moe" not in model_type.lower()
    checked = {
        "mlp": dims.intermediate is not None,
        "heads": isinstance(text.get("num_attention_heads"), int),
        "experts": dims.experts is not None or dense,
    }
    unchecked = {kind: 0.0 for kind, known in checked.items() if not known}
    plan_structure(spec.model_copy(update=unchecked), dims, model_type)
