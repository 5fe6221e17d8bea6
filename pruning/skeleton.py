"""A causal LM built without weights, whose decoder blocks are filled in and released one at a time.

Nothing here assumes `model.model.layers`: the decoder is what transformers' `get_decoder()`
returns (a VLM's language model), and its blocks are the ModuleList of the text config's
`num_hidden_layers` same-class modules inside it. Tensors are read through the checkpoint's key
map (transformers' own renames and conversions), so model names and checkpoint names may differ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from shears.errors import ModelUnavailable
from shears.pruning.checkpoint import Checkpoint
from shears.pruning.families import REFUSED
from shears.pruning.keymap import KeyMap, block_of
from shears.pruning.prunable import Prunable, find_prunables


@dataclass
class Skeleton:
    model: nn.Module
    config: PretrainedConfig
    checkpoint: Checkpoint
    keymap: KeyMap
    blocks: nn.ModuleList
    blocks_prefix: str  # e.g. "model.layers": block i's parameters are named f"{prefix}.{i}.<param>"
    device: torch.device
    dtype: torch.dtype  # compute dtype of the blocks
    keep_fp32: re.Pattern[str] | None = None  # parameters transformers keeps in fp32 at this dtype
    _prunables: dict[int, dict[str, Prunable]] = field(default_factory=dict)
    _block_keys: dict[int, list[str]] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_tensor_names(self, index: int) -> list[str]:
        """Block `index`'s parameters, and the persistent buffers its checkpoint holds, full names."""
        prefix = f"{self.blocks_prefix}.{index}."
        block = self.blocks[index]
        params = {name for name, _ in block.named_parameters()}
        return [
            prefix + name
            for name in block.state_dict(keep_vars=True)
            if name in params or self.keymap.has(prefix + name)
        ]

    def dtype_of(self, name: str, tensor: torch.Tensor) -> torch.dtype | None:
        """The dtype a tensor computes in: the compute dtype, fp32 where transformers keeps it
        (`_keep_in_fp32_modules_strict`), and integer tensors keep their own."""
        if not tensor.is_floating_point():
            return None
        if self.keep_fp32 is not None and self.keep_fp32.search(name):
            return torch.float32
        return self.dtype

    def block_keys(self, index: int) -> list[str]:
        """The checkpoint keys holding block `index`."""
        if index not in self._block_keys:
            self._block_keys[index] = self.keymap.keys_of(self.block_tensor_names(index))
        return self._block_keys[index]

    def outside_keys(self) -> list[str]:
        """Checkpoint keys outside every block (embeddings, head, a VLM's vision tower...)."""
        inside = {key for i in range(self.num_blocks) for key in self.block_keys(i)}
        return [key for key in self.checkpoint.names if key not in inside]

    def prunables(self, index: int) -> dict[str, Prunable]:
        """Block `index`'s prunable matrices by name (linears, Conv1D, each expert's matrices)."""
        if index not in self._prunables:
            self._prunables[index] = find_prunables(self.blocks[index], f"{self.blocks_prefix}.{index}.")
        return self._prunables[index]

    def materialize_block(self, index: int) -> nn.Module:
        block = self.blocks[index]
        names = self.block_tensor_names(index)
        tensors = self.keymap.load(names)
        prefix = f"{self.blocks_prefix}.{index}."
        for name in names:
            set_module_tensor_to_device(
                block,
                name[len(prefix) :],
                self.device,
                value=tensors[name],
                dtype=self.dtype_of(name, tensors[name]),
            )
        block.to(self.device)  # non-persistent buffers (rare inside blocks) follow the parameters
        return block

    def release_block(self, index: int) -> None:
        """Drop the block's weights; buffers computed at construction (not in the checkpoint) stay."""
        prefix = f"{self.blocks_prefix}.{index}."
        for name in self.block_tensor_names(index):
            set_module_tensor_to_device(self.blocks[index], name[len(prefix) :], "meta")

    def release_outside(self) -> None:
        """Drop the embeddings, final norm and head (a job with no evaluation needs them only to
        capture block 0's inputs)."""
        prefix = self.blocks_prefix + "."
        for name, param in list(self.model.named_parameters(remove_duplicate=False)):  # tied too
            if not name.startswith(prefix) and not param.is_meta:
                set_module_tensor_to_device(self.model, name, "meta")


def _keep_fp32(model: nn.Module, dtype: torch.dtype) -> re.Pattern[str] | None:
    """What from_pretrained(dtype=...) keeps in fp32, matched the way it matches it."""
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    return build_glob_alternation(list(plan))[0] if plan else None


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The decoder's config: a VLM's text_config, the config itself otherwise."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def num_layers(config: PretrainedConfig) -> int:
    text = text_config(config)
    for key in ("decoder_layers", "num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    raise ModelUnavailable(f"{config.model_type}: config names no layer count (num_hidden_layers)")


def find_blocks(model: nn.Module, count: int) -> tuple[str, nn.ModuleList]:
    """The decoder's ModuleList of `count` same-class modules holding the most parameters."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    root = next((name for name, module in model.named_modules() if module is decoder), "")
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in decoder.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != count or count == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        full = f"{root}.{name}" if root else name
        if best is None or size > best[0]:
            best = (size, full, module)
    if best is None:
        raise ModelUnavailable(f"{type(model).__name__}: found no list of {count} decoder blocks")
    return best[1], best[2]


def model_class(config: PretrainedConfig, trust_remote_code: bool = False) -> type:
    """The class the checkpoint names (config.architectures) when transformers has it as a causal LM
    or image-text-to-text model; else the causal-LM auto class; else the image-text-to-text one."""
    import transformers
    from transformers.models.auto import modeling_auto

    mappings = (
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )
    generative = {name for mapping in mappings for name in mapping.values()}
    for name in config.architectures or []:
        if name in generative and hasattr(transformers, name):
            return getattr(transformers, name)
    if hasattr(config, "vision_config"):  # a composite config: its class is the vision-language one
        mappings = mappings[::-1]
    for mapping in mappings:
        if config.model_type in mapping and hasattr(transformers, mapping[config.model_type]):
            return getattr(transformers, mapping[config.model_type])
    if trust_remote_code:
        return transformers.AutoModelForCausalLM
    raise ModelUnavailable(
        f"{config.model_type}: not a causal language model transformers knows "
        f"(architectures {config.architectures}); Shears prunes causal LMs and vision-language models"
    )


def check_supported(config: PretrainedConfig) -> None:
    """Refuse, before any work, what Shears cannot prune exactly."""
    refusal = REFUSED.get(config.model_type)
    if refusal is not None:
        raise ModelUnavailable(f"{config.model_type}: not supported: {refusal.reason}")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelUnavailable(
            f"{config.model_type}: an encoder-decoder model; Shears prunes decoder-only language models"
        )


def build_skeleton(
    folder: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    checkpoint: Checkpoint | None = None,
) -> Skeleton:
    """Load the config and every tensor outside the decoder blocks; leave the blocks on meta."""
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelUnavailable(f"{folder}: cannot read config.json: {exc}") from exc
    check_supported(config)
    config.use_cache = False
    cls = model_class(config, trust_remote_code)
    with init_empty_weights(include_buffers=False):
        try:
            # Built in the compute dtype, as from_pretrained(dtype=...) builds it: buffers made at
            # construction (GPT-1's causal mask) get that dtype, or a bf16 forward mixes dtypes.
            if hasattr(cls, "_from_config"):
                model = cls._from_config(config, dtype=dtype)
            else:
                model = cls.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise ModelUnavailable(f"{folder}: transformers cannot build {cls.__name__}: {exc}") from exc
    model.eval()
    prefix, blocks = find_blocks(model, num_layers(config))
    checkpoint = checkpoint or Checkpoint(folder)
    keymap = KeyMap(model, checkpoint)

    skeleton = Skeleton(
        model, config, checkpoint, keymap, blocks, prefix, device, dtype, _keep_fp32(model, dtype)
    )
    outside = [name for name in model.state_dict(keep_vars=True) if block_of(name, prefix) is None]
    present = [name for name in outside if keymap.has(name)]
    tensors = keymap.load(present)
    for name in present:
        set_module_tensor_to_device(
            model, name, device, value=tensors[name], dtype=skeleton.dtype_of(name, tensors[name])
        )
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta and block_of(name, prefix) is None]
    if missing:
        raise ModelUnavailable(f"{folder}: the checkpoint lacks {missing[:3]} (tensor names don't match)")
    for module_name, module in model.named_modules():
        if module_name.startswith(prefix + ".") or module_name == prefix:
            continue
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer.device != device:
                module._buffers[buffer_name] = buffer.to(device)
    for index in range(len(blocks)):
        absent = [n for n in skeleton.block_tensor_names(index) if not keymap.has(n)]
        if absent:
            raise ModelUnavailable(f"{folder}: the checkpoint lacks {absent[:3]} (tensor names don't match)")
    return skeleton
