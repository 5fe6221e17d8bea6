"""How a model's config and decoder-block tensors change when layers, channels, heads or experts go.

Nothing here is written per architecture. The config is edited (counts, per-layer lists) and the
edited config is instantiated on the meta device next to the original, one kind of unit at a time:
which parameter changes shape, and along which axis, says how each tensor is sliced. The same
comparison with only layers removed checks that every kept block keeps its type (sliding vs full
attention, MoE vs dense MLP). A parameter whose input axis shrinks with a kind is that kind's
*consumer* (down_proj for channels, o_proj for heads): the one the re-fit solves for.

Tensor layouts along a sliced axis:
- mlp: the axis is `m` consecutive segments of one entry per channel (`m` = 2 for a fused gate_up);
- heads and experts: the axis holds each unit's entries contiguously (query heads sharing a
  key-value head sit next to each other); fused q/k/v projections are listed in SEGMENTED_QKV.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from shears.errors import InvalidRequest, ModelUnavailable
from shears.pruning.checkpoint import Checkpoint
from shears.pruning.structure.plan import (
    EXPERT_KEYS,
    INTERMEDIATE_KEYS,
    LAYER_KEYS,
    Dimensions,
    StructurePlan,
    dimensions,
)

KINDS = ("mlp", "heads", "experts")
# Fused q/k/v projections laid out as [q | k | v] (each unit-major): module name suffix -> segments
SEGMENTED_QKV = ("qkv_proj",)
# Per-layer config lists: one entry per decoder block, trimmed with the blocks.
_PER_LAYER_SUFFIX = "layer_types"
_PER_LAYER_LISTS = ("no_rope_layers",)
# Config lists of block indices, renumbered with the blocks.
_INDEX_LISTS = ("mlp_only_layers", "moe_layers")
# Counts of leading blocks of a kind, lowered by the removed blocks among them.
_LEADING_COUNTS = ("first_k_dense_replace",)
_PER_EXPERT_KEY = re.compile(r"^(?P<head>(?:.*\.)?experts)\.(?P<index>\d+)\.(?P<tail>.+)$")


@dataclass(frozen=True)
class AxisRule:
    """Along `axis`, consecutive segments each holding `per_unit` entries for every unit."""

    kind: str
    axis: int
    segments: tuple[int, ...]

    def index(self, kept: Tensor, units: int) -> Tensor:
        parts, offset = [], 0
        for width in self.segments:
            parts.append(offset + (kept[:, None] * width + torch.arange(width)).reshape(-1))
            offset += units * width
        return torch.cat(parts)

    def size(self, units: int) -> int:
        return units * sum(self.segments)


@dataclass
class BlockRules:
    """For one block: the rules of each parameter (by name inside the block) and each kind's consumer."""

    params: dict[str, list[AxisRule]] = field(default_factory=dict)
    consumers: dict[str, str] = field(default_factory=dict)  # kind -> module name inside the block
    experts_module: str | None = None
    router: str | None = None  # module name of the router whose rows are the experts


def _meta_model(config: Any) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def _config_from_dict(data: dict[str, Any]) -> Any:
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[data["model_type"]].from_dict(data)
    except KeyError as exc:
        raise ModelUnavailable(f"config.json: unknown model_type {data.get('model_type')!r}") from exc


def _text_key(config: Any) -> str | None:
    """The config.json key holding the decoder's config (None when it is the top level)."""
    text = config.get_text_config(decoder=True)
    if text is config:
        return None
    for key in getattr(type(config), "sub_configs", {}) or {}:
        if getattr(config, key, None) is text:
            return key
    raise ModelUnavailable(f"{config.model_type}: cannot tell which sub-config is the language model's")


def _json_key(config: Any, name: str) -> str:
    return type(config).attribute_map.get(name, name)


def _present(config: Any, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return key
    return None


class ModelLayout:
    """A model folder's config and checkpoint, and how structured pruning rewrites both."""

    def __init__(self, folder: Path, plan: StructurePlan, checkpoint: Checkpoint | None = None) -> None:
        from shears.pruning.skeleton import find_blocks

        self.folder = folder
        self.plan = plan
        self.raw: dict[str, Any] = json.loads((folder / "config.json").read_text())
        self.config = _config_from_dict(self.raw)
        self.text_key = _text_key(self.config)
        self.text_config = self.config.get_text_config(decoder=True)
        self.dims: Dimensions = dimensions(self.text_config)
        self.checkpoint = checkpoint or Checkpoint(folder)
        dense = _meta_model(self.config)
        self.module_prefix, self.blocks = find_blocks(dense, self.dims.layers)
        self.checkpoint_prefix = self._checkpoint_prefix()
        self.rules = [BlockRules() for _ in range(self.dims.layers)]
        for kind in plan.width_kinds:
            self._derive(kind)

    # -- the config --------------------------------------------------------------------------

    def _text_node(self, data: dict[str, Any]) -> dict[str, Any]:
        return data[self.text_key] if self.text_key else data

    def config_dict(self, kept_blocks: list[int] | None = None, kinds: tuple[str, ...] | None = None) -> dict:
        """config.json with the plan's counts (`kinds`, default all) and only `kept_blocks`."""
        data = json.loads(json.dumps(self.raw))
        node = self._text_node(data)
        text = self.text_config
        dims, plan = self.dims, self.plan
        kinds = plan.width_kinds if kinds is None else kinds
        if "mlp" in kinds and plan.mlp_keep is not None:
            node[_json_key(text, _present(text, INTERMEDIATE_KEYS) or "intermediate_size")] = plan.mlp_keep
        if "heads" in kinds and plan.kv_keep is not None:
            node[_json_key(text, "num_attention_heads")] = plan.kv_keep * dims.queries_per_group
            node[_json_key(text, "num_key_value_heads")] = plan.kv_keep
            node[_json_key(text, "head_dim")] = dims.head_dim  # else derived from hidden / heads
        if "experts" in kinds and plan.experts_keep is not None:
            node[_json_key(text, _present(text, EXPERT_KEYS) or "num_experts")] = plan.experts_keep
        if kept_blocks is not None and len(kept_blocks) != dims.layers:
            _remove_blocks(node, text, kept_blocks, dims.layers)
        return data

    def pruned_config(
        self, kept_blocks: list[int] | None = None, kinds: tuple[str, ...] | None = None
    ) -> Any:
        return _config_from_dict(self.config_dict(kept_blocks, kinds))

    # -- the rules ---------------------------------------------------------------------------

    def _units(self, kind: str) -> tuple[int, int]:
        """(units before, units after) of a kind."""
        dims, plan = self.dims, self.plan
        if kind == "mlp":
            assert dims.intermediate is not None and plan.mlp_keep is not None
            return dims.intermediate, plan.mlp_keep
        if kind == "heads":
            assert dims.kv_heads is not None and plan.kv_keep is not None
            return dims.kv_heads, plan.kv_keep
        assert dims.experts is not None and plan.experts_keep is not None
        return dims.experts, plan.experts_keep

    def units(self, kind: str) -> int:
        return self._units(kind)[0]

    def _derive(self, kind: str) -> None:
        """Instantiate the config with only `kind` changed and read off the rules of every block."""
        from shears.pruning.skeleton import find_blocks

        before, after = self._units(kind)
        _, changed_blocks = find_blocks(_meta_model(self.pruned_config(kinds=(kind,))), self.dims.layers)
        touched = 0
        for index, (dense, changed) in enumerate(zip(self.blocks, changed_blocks, strict=True)):
            rules = self.rules[index]
            new_params = dict(changed.named_parameters())
            for name, param in dense.named_parameters():
                old, new = tuple(param.shape), tuple(new_params[name].shape)
                if old == new:
                    continue
                touched += 1
                for axis, (a, b) in enumerate(zip(old, new, strict=True)):
                    if a != b:
                        rule = self._rule(kind, name, axis, a, before)
                        if rule.size(after) != b:
                            raise InvalidRequest(
                                f"structure.{kind}: {self.config.model_type}'s {name} changes from {a} to "
                                f"{b} entries, which is not {after} whole units of {rule.segments}; "
                                "this architecture's layout is not supported for it"
                            )
                        rules.params.setdefault(name, []).append(rule)
            self._find_consumers(kind, dense, rules)
        if not touched:
            raise InvalidRequest(
                f"structure.{kind}: changing the {kind} count of {self.config.model_type} changes no weight "
                "shape (the architecture ties it to another size); remove another kind of unit"
            )

    def _rule(self, kind: str, name: str, axis: int, size: int, units: int) -> AxisRule:
        if size % units:
            raise InvalidRequest(
                f"structure.{kind}: {name} has {size} entries, not a multiple of {units} units"
            )
        per_unit = size // units
        if kind == "mlp":
            return AxisRule(kind, axis, (1,) * per_unit)
        module = name.rsplit(".", 1)[0]
        if kind == "heads" and module.endswith(SEGMENTED_QKV):
            head_dim, group = self.dims.head_dim or 0, self.dims.queries_per_group
            if per_unit != (group + 2) * head_dim:
                raise InvalidRequest(f"structure.heads: {name} is not a [q | k | v] fused projection")
            return AxisRule(kind, axis, (group * head_dim, head_dim, head_dim))
        return AxisRule(kind, axis, (per_unit,))

    def _find_consumers(self, kind: str, block: nn.Module, rules: BlockRules) -> None:
        if kind == "experts":
            for name, rule_list in rules.params.items():
                module = name.rsplit(".", 1)[0]
                param = block.get_parameter(name)
                if any(r.kind == "experts" for r in rule_list):
                    if param.dim() == 3:
                        rules.experts_module = module
                    elif param.dim() == 2 and rules.router is None:
                        rules.router = module
            return
        consumers = {
            name.rsplit(".", 1)[0]
            for name, rule_list in rules.params.items()
            if name.endswith("weight")
            and any(r.kind == kind and r.axis == 1 for r in rule_list)
            and block.get_parameter(name).dim() == 2
        }
        if len(consumers) > 1:
            raise InvalidRequest(
                f"structure.{kind}: {self.config.model_type} blocks read the {kind} units in several layers "
                f"({sorted(consumers)}); only one consumer per block is supported"
            )
        if consumers:
            rules.consumers[kind] = consumers.pop()

    # -- checkpoint names --------------------------------------------------------------------

    def _checkpoint_prefix(self) -> str:
        """The checkpoint's name for the block list (it may differ from the module path, e.g. a
        VLM stored as `language_model.model.layers` for `model.language_model.layers`)."""
        names = set(self.checkpoint.names)
        probe = next((n for n, _ in self.blocks[0].named_parameters() if "experts" not in n), None)
        if probe is None:
            raise ModelUnavailable("decoder block 0 has no parameters")
        suffix = f".0.{probe}"
        candidates = sorted({n[: -len(suffix)] for n in names if n.endswith(suffix)})
        last = self.dims.layers - 1
        fitting = [
            c for c in candidates if f"{c}.{last}.{probe}" in names and f"{c}.{last + 1}.{probe}" not in names
        ]
        if self.module_prefix in fitting:
            return self.module_prefix
        if len(fitting) != 1:
            raise ModelUnavailable(
                "cannot find the decoder blocks' tensors in the checkpoint "
                f"(candidates {fitting or candidates})"
            )
        return fitting[0]

    def block_names(self, index: int) -> list[str]:
        prefix = f"{self.checkpoint_prefix}.{index}."
        return [n for n in self.checkpoint.names if n.startswith(prefix)]

    def outside_names(self) -> list[str]:
        prefix = self.checkpoint_prefix + "."
        return [n for n in self.checkpoint.names if not n.startswith(prefix)]

    def _target(
        self, index: int, new_index: int, name: str, kept: dict[str, Tensor] | None
    ) -> tuple[str, list[tuple[AxisRule, int]]] | None:
        """The output name of a block tensor and its (rule, units) slices; None when it is dropped."""
        relative = name[len(f"{self.checkpoint_prefix}.{index}.") :]
        out_prefix = f"{self.checkpoint_prefix}.{new_index}."
        rules = self.rules[index]
        if relative in rules.params:
            return out_prefix + relative, [(r, self.units(r.kind)) for r in rules.params[relative]]
        match = _PER_EXPERT_KEY.match(relative)
        if match and any(p.startswith(match["head"] + ".") for p in rules.params):
            # One expert's tensor in a per-expert checkpoint (the module holds them fused).
            if any(
                r.kind != "experts"
                for p, rl in rules.params.items()
                if p.startswith(match["head"])
                for r in rl
            ):
                raise InvalidRequest(
                    f"structure: cutting the width of per-expert tensors ({name}) is not supported"
                )
            expert = int(match["index"])
            if kept is None:  # planning shapes: experts keep their numbering below experts_keep
                if expert >= self.plan.experts_keep:
                    return None
                return out_prefix + relative, []
            positions = (kept["experts"] == expert).nonzero()
            if len(positions) == 0:
                return None
            return f"{out_prefix}{match['head']}.{int(positions[0, 0])}.{match['tail']}", []
        if (
            match is None
            and self.plan.width_kinds
            and relative not in dict(self.blocks[index].named_parameters())
        ):
            raise ModelUnavailable(
                f"checkpoint tensor {name!r} is no parameter of the block; cannot tell how it changes"
            )
        return out_prefix + relative, []

    def output_shapes(self, index: int, new_index: int) -> dict[str, tuple[int, ...]]:
        """Output name -> shape of block `index` kept as `new_index`, sorted by name (the write order)."""
        return {name: shape for name, (shape, _) in self.output_specs(index, new_index).items()}

    def output_specs(self, index: int, new_index: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Output name -> (shape, stored dtype) of block `index` kept as `new_index`, sorted by name."""
        result = {}
        for name in self.block_names(index):
            target = self._target(index, new_index, name, None)
            if target is None:
                continue
            out_name, slices = target
            shape = list(self.checkpoint.shapes[name])
            for rule, _ in slices:
                shape[rule.axis] = rule.size(self._units(rule.kind)[1])
            result[out_name] = (tuple(shape), self.checkpoint.dtypes[name])
        return dict(sorted(result.items()))

    def unit_squared_norms(self, index: int, kind: str, tensors: dict[str, Tensor]) -> Tensor:
        """Per unit of `kind`, the squared norm of every weight it owns in block `index` (the
        magnitude baseline's score). `tensors` are the block's checkpoint tensors."""
        units = self.units(kind)
        total = torch.zeros(units, dtype=torch.float64)
        prefix = f"{self.checkpoint_prefix}.{index}."
        for relative, rule_list in self.rules[index].params.items():
            tensor = tensors.get(prefix + relative)
            for rule in rule_list:
                if rule.kind != kind or tensor is None:
                    continue
                dims = [d for d in range(tensor.dim()) if d != rule.axis]
                along = tensor.float().square().sum(dim=dims) if dims else tensor.float().square()
                offset = 0
                for width in rule.segments:
                    total += (
                        along[offset : offset + units * width].reshape(units, width).sum(1).double().cpu()
                    )
                    offset += units * width
        return total.float()

    def slice_block(
        self, index: int, new_index: int, tensors: dict[str, Tensor], kept: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Block `index`'s checkpoint tensors cut to the kept units (by kind), named for `new_index`."""
        out = {}
        for name, tensor in tensors.items():
            target = self._target(index, new_index, name, kept)
            if target is None:
                continue
            out_name, slices = target
            for rule, units in slices:
                tensor = tensor.index_select(rule.axis, rule.index(kept[rule.kind], units).to(tensor.device))
            out[out_name] = tensor
        return dict(sorted(out.items()))


def _remove_blocks(node: dict[str, Any], text: Any, kept: list[int], total: int) -> None:
    """Edit a decoder config (as a dict) for only the `kept` blocks, renumbered in order."""
    renumber = {old: new for new, old in enumerate(kept)}
    node[_json_key(text, _present(text, LAYER_KEYS) or "num_hidden_layers")] = len(kept)
    sparse_step = node.get("decoder_sparse_step")
    if isinstance(sparse_step, int) and sparse_step > 1 and "mlp_only_layers" in node:
        # Which blocks are MoE was a pattern over positions: write it out as a list instead.
        dense = set(node.get("mlp_only_layers") or []) | {i for i in range(total) if (i + 1) % sparse_step}
        node["mlp_only_layers"] = sorted(dense)
        node["decoder_sparse_step"] = 1
    for key, value in list(node.items()):
        if (
            isinstance(value, list)
            and len(value) == total
            and (key.endswith(_PER_LAYER_SUFFIX) or key in _PER_LAYER_LISTS)
        ):
            node[key] = [value[i] for i in kept]
        elif key in _INDEX_LISTS and isinstance(value, list):
            node[key] = [renumber[i] for i in value if i in renumber]
        elif key in _LEADING_COUNTS and isinstance(value, int):
            node[key] = sum(1 for i in kept if i < value)


def check_kept_block_types(layout: ModelLayout, kept: list[int]) -> None:
    """Every kept block must be built as the same kind of block after renumbering (same parameters,
    same attention type): a config describing layers by position could otherwise shift them."""
    from shears.pruning.skeleton import find_blocks

    _, blocks = find_blocks(_meta_model(layout.pruned_config(kept, kinds=())), len(kept))
    for new, old in enumerate(kept):
        before, after = _signature(layout.blocks[old]), _signature(blocks[new])
        if before != after:
            raise InvalidRequest(
                f"removing blocks would turn block {old} (now {new}) into a different kind of block "
                f"({sorted(set(before.items()) ^ set(after.items()))[:4]}); the config describes blocks "
                "by position in a way Shears cannot rewrite; try structure.contiguous or fewer layers"
            )


def _signature(block: nn.Module) -> dict[str, Any]:
    signature: dict[str, Any] = {"class": type(block).__name__}
    for name, param in block.named_parameters():
        signature[name] = tuple(param.shape)
    for module_name, module in block.named_modules():
        for key, value in vars(module).items():
            if key.startswith("_") or "layer_idx" in key or key == "training":
                continue
            if isinstance(value, str | int | float | bool) or value is None:
                signature[f"{module_name}.{key}"] = value
    return signature


def verify_structure(folder: Path, layout: ModelLayout, kept_blocks: list[int]) -> None:
    """The written config builds a model whose every decoder-block parameter has its tensor on disk,
    of its shape (fused experts stored per expert: one set per expert the config counts)."""
    from transformers import AutoConfig

    from shears.pruning.skeleton import find_blocks

    config = AutoConfig.from_pretrained(folder)
    _, blocks = find_blocks(_meta_model(config), len(kept_blocks))
    written = Checkpoint(folder)
    for new, block in enumerate(blocks):
        prefix = f"{layout.checkpoint_prefix}.{new}."
        for name, param in block.named_parameters():
            stored = written.shapes.get(prefix + name)
            if stored is not None:
                if stored != tuple(param.shape):
                    raise RuntimeError(
                        f"verification: {prefix + name} on disk is {list(stored)}, the config builds "
                        f"{list(param.shape)}"
                    )
                continue
            module = prefix + name.rsplit(".", 1)[0] + "."
            experts = {
                m["index"]
                for n in written.names
                if n.startswith(module) and (m := _PER_EXPERT_KEY.match(n[len(prefix) :]))
            }
            if param.dim() != 3 or len(experts) != param.shape[0]:
                raise RuntimeError(f"verification: {prefix + name} is missing from the written checkpoint")
