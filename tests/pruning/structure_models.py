"""Tiny random models for the structured-pruning tests: Llama, Gemma 3 text with sliding and full
layers, Qwen3-MoE and a Gemma 3 vision-language model, saved as real Hugging Face folders."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.tiny import make_tokenizer

_TEXT = dict(
    vocab_size=512,
    hidden_size=64,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=16,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    tie_word_embeddings=False,
)
_GEMMA_LAYERS = ["sliding_attention", "full_attention"] * 2 + ["sliding_attention", "full_attention"]


def _configs() -> dict[str, transformers.PretrainedConfig]:
    return {
        "llama": transformers.LlamaConfig(**_TEXT, intermediate_size=256, num_hidden_layers=4),
        "gemma3": transformers.Gemma3TextConfig(
            **_TEXT, intermediate_size=256, num_hidden_layers=6, sliding_window=8, layer_types=_GEMMA_LAYERS
        ),
        "qwen3_moe": transformers.Qwen3MoeConfig(
            **_TEXT,
            intermediate_size=256,
            moe_intermediate_size=32,
            num_hidden_layers=4,
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=2,  # blocks 1 and 3 are MoE, 0 and 2 dense
        ),
        "gemma3_vlm": transformers.Gemma3Config(
            text_config=dict(
                _TEXT, intermediate_size=256, num_hidden_layers=6, sliding_window=8, layer_types=_GEMMA_LAYERS
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
            tie_word_embeddings=False,
        ),
    }


FAMILIES = tuple(_configs())


def make_structure_model(family: str, path: Path, seed: int = 0) -> Path:
    config = _configs()[family]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms, so a wrong slice of them shows in the logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.1)
    model.save_pretrained(path)
    make_tokenizer(path)
    return path


_PER_EXPERT = re.compile(r"^(?P<head>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


def fuse_experts(folder: Path) -> None:
    """Rewrite a saved MoE folder's per-expert tensors as the fused module parameters
    (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]), as some checkpoints ship."""
    tensors = load_file(folder / "model.safetensors")
    fused: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _PER_EXPERT.match(name)
        if match is None:
            fused[name] = tensor
        else:
            experts.setdefault(match["head"], {})[int(match["expert"]), match["proj"]] = tensor
    for head, weights in experts.items():
        count = 1 + max(expert for expert, _ in weights)
        gate_up = [torch.cat([weights[e, "gate"], weights[e, "up"]]) for e in range(count)]
        fused[f"{head}.gate_up_proj"] = torch.stack(gate_up)
        fused[f"{head}.down_proj"] = torch.stack([weights[e, "down"] for e in range(count)])
    save_file(fused, folder / "model.safetensors", metadata={"format": "pt"})
