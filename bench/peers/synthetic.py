"""A random-weight Llama-style model of a chosen width, to see how time and memory grow with size.

Weights are random (seeded), so perplexity means nothing there: only prune time and peak RSS are
compared. The tokenizer is copied from a real model folder so both tools load it the usual way, and
the vocabulary matches the real calibration ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
HEAD_DIM = 64
STAMP = "synthetic.json"


def synthetic_llama(
    path: Path, *, hidden: int, intermediate: int, layers: int, tokenizer_from: Path, seed: int = 0
) -> Path:
    """Write (once) an fp32 Llama folder of these sizes, tied embeddings, `tokenizer_from`'s tokenizer."""
    spec = {"hidden": hidden, "intermediate": intermediate, "layers": layers, "seed": seed}
    stamp = path / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return path
    if path.exists():
        shutil.rmtree(path)
    source = json.loads((tokenizer_from / "config.json").read_text())
    heads = max(1, hidden // HEAD_DIM)
    config = LlamaConfig(
        vocab_size=source["vocab_size"],
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(2048, source.get("max_position_embeddings", 2048)),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=source.get("bos_token_id"),
        eos_token_id=source.get("eos_token_id"),
        pad_token_id=source.get("pad_token_id"),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    del model
    for name in _TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, path / name)
    stamp.write_text(json.dumps(spec) + "\n")
    return path
