"""A causal LM built without weights, whose decoder blocks are filled in and released one at a time.

Nothing here assumes `model.model.layers`: the block list is found as the ModuleList of
`num_hidden_layers` identical modules, whatever the architecture calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from shears.errors import ModelUnavailable
from shears.pruning.checkpoint import Checkpoint


@dataclass
class Skeleton:
    model: nn.Module
    config: PretrainedConfig
    checkpoint: Checkpoint
    blocks: nn.ModuleList
    blocks_prefix: str  # e.g. "model.layers": block i's tensors are named f"{prefix}.{i}.<param>"
    device: torch.device
    dtype: torch.dtype  # compute dtype of the blocks

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_tensor_names(self, index: int) -> list[str]:
        prefix = f"{self.blocks_prefix}.{index}."
        return [prefix + name for name, _ in self.blocks[index].named_parameters()]

    def linear_layers(self, index: int) -> dict[str, nn.Linear]:
        """The nn.Linear modules of block `index`, by full module name, in definition order."""
        prefix = f"{self.blocks_prefix}.{index}."
        return {
            prefix + name: module
            for name, module in self.blocks[index].named_modules()
            if isinstance(module, nn.Linear)
        }

    def materialize_block(self, index: int) -> nn.Module:
        block = self.blocks[index]
        names = self.block_tensor_names(index)
        tensors = self.checkpoint.load(names)
        prefix = f"{self.blocks_prefix}.{index}."
        for name in names:
            set_module_tensor_to_device(
                block, name[len(prefix) :], self.device, value=tensors[name], dtype=self.dtype
            )
        block.to(self.device)  # buffers (rare inside blocks) follow the parameters
        return block

    def release_block(self, index: int) -> None:
        self.blocks[index].to("meta")

    def release_outside(self) -> None:
        """Drop the embeddings, final norm and head (a job with no evaluation needs them only to
        capture block 0's inputs)."""
        prefix = self.blocks_prefix + "."
        for name, param in list(self.model.named_parameters(remove_duplicate=False)):  # tied too
            if not name.startswith(prefix) and not param.is_meta:
                set_module_tensor_to_device(self.model, name, "meta")


def _num_layers(config: PretrainedConfig) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ModelUnavailable(f"{config.model_type}: config names no layer count (num_hidden_layers)")


def find_blocks(model: nn.Module, count: int) -> tuple[str, nn.ModuleList]:
    """The ModuleList of `count` same-class modules holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != count or count == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ModelUnavailable(f"{type(model).__name__}: found no list of {count} decoder blocks")
    return best[1], best[2]


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
    config.use_cache = False
    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except ValueError as exc:
            raise ModelUnavailable(
                f"{folder}: not a causal language model transformers knows: {exc}"
            ) from exc
    model.eval()
    prefix, blocks = find_blocks(model, _num_layers(config))
    checkpoint = checkpoint or Checkpoint(folder)

    outside = [name for name, _ in model.named_parameters() if not name.startswith(prefix + ".")]
    present = [name for name in outside if name in checkpoint.file_of]
    tensors = checkpoint.load(present)
    for name in present:
        set_module_tensor_to_device(model, name, device, value=tensors[name], dtype=dtype)
    model.tie_weights()
    missing = [
        name for name, p in model.named_parameters() if p.is_meta and not name.startswith(prefix + ".")
    ]
    if missing:
        raise ModelUnavailable(f"{folder}: the checkpoint lacks {missing[:3]} (tensor names don't match)")
    for module_name, module in model.named_modules():
        if module_name.startswith(prefix + ".") or module_name == prefix:
            continue
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer.device != device:
                module._buffers[buffer_name] = buffer.to(device)
    skeleton = Skeleton(model, config, checkpoint, blocks, prefix, device, dtype)
    for index in range(len(blocks)):
        absent = [n for n in skeleton.block_tensor_names(index) if n not in checkpoint.file_of]
        if absent:
            raise ModelUnavailable(f"{folder}: the checkpoint lacks {absent[:3]} (tensor names don't match)")
    return skeleton
