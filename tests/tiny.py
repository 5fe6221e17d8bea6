"""Tiny random causal LMs of several architectures, saved as real Hugging Face folders.

Shared by every test package: each model has 2 decoder blocks, hidden 64, intermediate 128 and a
512-token byte-level BPE tokenizer trained on a few built-in plays, so a whole prune takes seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "opt", "phi")

_COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    tie_word_embeddings=False,
)

_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_COMMON, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(_COMMON, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(_COMMON, num_key_value_heads=2, sliding_window=None)),
    "gemma": ("GemmaConfig", dict(_COMMON, num_key_value_heads=2, head_dim=16)),
    "opt": (
        "OPTConfig",
        dict(
            vocab_size=512,
            hidden_size=64,
            ffn_dim=128,
            word_embed_proj_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=1024,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            tie_word_embeddings=False,
        ),
    ),
    "phi": ("PhiConfig", dict(_COMMON, num_key_value_heads=4, partial_rotary_factor=0.5)),
}


def _training_text() -> list[str]:
    from shears.calibration.builtin import builtin_documents

    return [doc for _, doc in zip(range(4), builtin_documents(), strict=False)]


def make_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.save_pretrained(path)
    return fast


def make_tiny_model(
    arch: str, path: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object
) -> Path:
    """Write a tiny random `arch` model with its tokenizer to `path` and return `path`.

    `overrides` replace fields of the tiny config (e.g. tie_word_embeddings=True)."""
    config_cls, kwargs = _CONFIGS[arch]
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path)
    make_tokenizer(path)
    return path
