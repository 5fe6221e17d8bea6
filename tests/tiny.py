"""Tiny random causal LMs of several architectures, saved as real Hugging Face folders.

Shared by every test package: each model has 2 decoder blocks, hidden 64, intermediate 128 and a
512-token byte-level BPE tokenizer trained on a few built-in plays, so a whole prune takes seconds.
"""

from __future__ import annotations

import functools
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


@functools.cache
def _trained_tokenizer() -> str:
    """The tiny BPE tokenizer as JSON, trained once per process (training takes a second or two)."""
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
    return tokenizer.to_str()


def make_tokenizer(path: Path, *, bos: bool = False) -> PreTrainedTokenizerFast:
    """The tiny byte-level BPE tokenizer; `bos`: it starts every text with <s> (as Llama's does)."""
    tokenizer = Tokenizer.from_str(_trained_tokenizer())
    if bos:
        from tokenizers import processors

        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
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


# --- Any model type, shrunk: shared by the equivalence tests and bench/architectures.py ---------

TINY_VOCAB = 512  # the tiny tokenizer's size; multimodal special tokens get ids just above it
_SPECIAL_BASE = TINY_VOCAB
_TEXT_SIZES: dict[str, int] = {
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "dim": 64,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "n_inner": 128,
    "ffn_hidden_size": 128,
    "d_ff": 128,
    "intermediate_size_mlp": 128,
    "decoder_ffn_dim": 128,
    "encoder_ffn_dim": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "shared_experts_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_heads": 4,
    "n_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_kv_heads": 2,
    "n_kv_heads": 2,
    "multi_query_group_num": 2,
    "head_dim": 16,
    "kv_channels": 16,
    "attention_head_dim": 16,
    "max_position_embeddings": 256,
    "n_positions": 256,
    "n_ctx": 256,
    "max_seq_len": 256,
    "seq_length": 256,
    "max_sequence_length": 256,
    "sliding_window": 8,
    "sliding_window_size": 8,
    "attention_chunk_size": 8,
    "window_size": 8,
    "num_local_experts": 8,
    "num_experts": 8,
    "n_routed_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "top_k": 2,
    "n_group": 2,
    "num_expert_group": 2,
    "num_experts_per_token": 2,
    "topk_group": 1,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "qk_head_dim": 16,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "index_n_heads": 2,
    "index_head_dim": 16,
    "index_topk": 16,
    "query_pre_attn_scalar": 16,
    "rotary_dim": 8,
    "rotary_emb_base": 10000,
    "embedding_size": 64,
    "word_embed_proj_dim": 64,
    "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": TINY_VOCAB,
    "laurel_rank": 8,
    "mamba_d_state": 8,
    "mamba_n_heads": 4,
    "mamba_d_head": 16,
    "mamba_chunk_size": 16,
    "state_size": 8,
    "time_step_rank": 8,
    "conv_kernel": 4,
    "mamba_dt_rank": 8,
    "num_key_value_groups": 2,
    "swa_num_attention_heads": 4,
    "swa_head_dim": 16,
    "swa_num_key_value_heads": 2,
    "zero_expert_num": 2,
    "expert_ffn_hidden_size": 32,
}
_VISION_SIZES: dict[str, int] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "depth": 1,
    "num_layers": 1,
    "num_attention_heads": 2,
    "num_heads": 2,
    "embed_dim": 32,
    "head_dim": 16,
    "out_hidden_size": 64,
    "projection_dim": 64,
    "vision_output_dim": 64,
    "text_hidden_size": 64,
    "projector_input_dim": 64,
    "projector_output_dim": 64,
    "output_channels": 32,
}
# Sizes a default config leaves None for the model to derive or choose; a tiny one names them.
_FILL_NONE = (
    "head_dim", "num_key_value_heads", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
    "moe_intermediate_size", "num_local_experts",
)  # fmt: skip
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
_INDEX_LIST_KEYS = ("moe_layers", "mlp_only_layers", "attn_layer_indices", "full_attn_idxs", "dense_layers")


def _layer_count(config: dict) -> tuple[str, int] | None:
    for key in _LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int) and config[key] > 0:
            return key, config[key]
    return None


def _representative_layers(config: dict, count: int, most: int) -> list[int]:
    """Indices of layers keeping one of each kind of layer (layer type, no-rope flag, MoE or not)."""
    per_layer = [
        k for k, v in config.items() if isinstance(v, list) and len(v) == count and k not in _INDEX_LIST_KEYS
    ]
    index_lists = [k for k in _INDEX_LIST_KEYS if isinstance(config.get(k), list)]
    overrides = {int(k) for k in config.get("per_layer_config") or {}}
    chosen: list[int] = []
    seen: set[tuple] = set()
    for i in range(count):
        signature = (
            tuple(str(config[k][i]) for k in per_layer)
            + tuple(i in config[k] for k in index_lists)
            + (i in overrides,)
        )
        if signature not in seen:
            seen.add(signature)
            chosen.append(i)
    for i in range(count):  # at least two blocks, so that a block's input is another's output
        if len(chosen) >= 2:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen[:most])


def _shrink_layers(config: dict, most: int = 4) -> None:
    found = _layer_count(config)
    if found is None:
        return
    key, count = found
    chosen = _representative_layers(config, count, most)
    if isinstance(config.get("per_layer_config"), dict):
        config["per_layer_config"] = {
            f"{chosen.index(int(k)):0{len(k)}d}": v
            for k, v in config["per_layer_config"].items()
            if int(k) in chosen
        }
    for name, value in list(config.items()):
        if name in _INDEX_LIST_KEYS and isinstance(value, list):
            config[name] = [chosen.index(i) for i in value if i in chosen]
        elif isinstance(value, list) and len(value) == count:
            config[name] = [value[i] for i in chosen]
    config[key] = len(chosen)
    if "first_k_dense_replace" in config and len(chosen) < 2:
        config["first_k_dense_replace"] = 0


def _shrink_ids(config: dict) -> None:
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if name in config and config[name] is not None:
            config[name] = {"bos_token_id": 1, "pad_token_id": 2}.get(name, 2)
    special = _SPECIAL_BASE
    for name, value in sorted(config.items()):
        if (
            name.endswith(("token_id", "token_index"))
            and name not in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
            and isinstance(value, int)
            and value >= TINY_VOCAB
        ):
            config[name] = special
            special += 1


def _shrink(config: dict, sizes: dict[str, int], text: bool) -> None:
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    multi_head = isinstance(heads, int) and heads == kv_heads  # MHA (and MLA): keep every head its own
    for name, value in list(config.items()):
        if isinstance(value, dict) and (name.endswith("_config") or name == "text_config"):
            sub_text = name == "text_config" or name in ("language_config", "llm_config", "decoder_config")
            _shrink(value, _TEXT_SIZES if sub_text else _VISION_SIZES, sub_text)
        elif name in sizes and isinstance(value, int) and not isinstance(value, bool) and value > sizes[name]:
            config[name] = sizes[name]
    if multi_head:
        config["num_key_value_heads"] = config["num_attention_heads"]
    _consistent_ssm(config)
    if "unpadded_vocab_size" in config and isinstance(config["unpadded_vocab_size"], int):
        config["unpadded_vocab_size"] = TINY_VOCAB + 32
    if config.get("is_decoder") is False:  # encoders in the causal-LM mapping run as decoders there
        config["is_decoder"] = True
    if text:
        for name in _FILL_NONE:
            if name in config and config[name] is None:
                config[name] = sizes[name]
        for value in (config.get("per_layer_config") or {}).values():
            if isinstance(value, dict):
                _shrink(value, sizes, False)
        if isinstance(config.get("vocab_size"), int):
            config["vocab_size"] = TINY_VOCAB + 32
        _shrink_ids(config)
        _shrink_layers(config)
        if "qk_head_dim" in config and "qk_nope_head_dim" in config:
            config["qk_head_dim"] = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
        if "kv_lora_rank" in config and "qk_rope_head_dim" in config:  # MLA: head_dim is the rope part
            config["head_dim"] = config["qk_rope_head_dim"]
        _shrink_mrope(config, config.get("head_dim") or 16)
        config["tie_word_embeddings"] = config.get("tie_word_embeddings", False)
    else:
        _shrink_layers(config, most=1)


def _consistent_ssm(config: dict) -> None:
    """Mamba heads must tile the expanded hidden size."""
    hidden = config.get("hidden_size")
    if not isinstance(hidden, int):
        return
    if isinstance(config.get("mamba_expand"), int) and isinstance(config.get("mamba_n_heads"), int):
        config["mamba_d_head"] = config["mamba_expand"] * hidden // config["mamba_n_heads"]
    if config.get("model_type") == "mamba2" and isinstance(config.get("num_heads"), int):
        config["head_dim"] = int(config.get("expand", 2) * hidden) // config["num_heads"]


def _shrink_mrope(config: dict, head_dim: int) -> None:
    """Multimodal rotary sections must add up to half the rotary dims: scale them down (Qwen-VL and
    GLM-4V text models default to a 2:3:3 split when the config names none)."""
    model_type = str(config.get("model_type", ""))
    multimodal = any(part in model_type for part in ("vl", "glm4v", "glm46v", "glm_ocr", "glmga", "omni"))
    if multimodal and isinstance(config.get("rope_parameters"), dict):
        config["rope_parameters"].setdefault("mrope_section", [2, 3, 3])
    for rope in _dicts(config.get("rope_parameters")):
        section = rope.get("mrope_section")
        factor = rope.get("partial_rotary_factor", config.get("partial_rotary_factor")) or 1.0
        half = int(head_dim * factor) // 2
        if isinstance(section, list) and section and sum(section) != half:
            scaled = [max(1, round(v * half / sum(section))) for v in section]
            scaled[-1] += half - sum(scaled)
            rope["mrope_section"] = scaled


def _dicts(value: object) -> list[dict]:
    if not isinstance(value, dict):
        return []
    nested = [v for v in value.values() if isinstance(v, dict)]
    return [value, *nested]


def tiny_config(model_type: str, **overrides: object) -> transformers.PretrainedConfig:
    """The default config of `model_type`, shrunk to a few-KB model with one block of each kind."""
    from transformers import AutoConfig

    data = AutoConfig.for_model(model_type).to_dict()
    _shrink(data, _TEXT_SIZES, True)
    _shrink_ids(data)
    data.update(overrides)
    data.pop("transformers_version", None)
    return AutoConfig.for_model(model_type, **{k: v for k, v in data.items() if k != "model_type"})


def make_tiny_of_type(
    model_type: str,
    path: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    model_class: str | None = None,
    **overrides: object,
) -> Path:
    """Save a tiny random model of any `model_type` (the class its config names, else the causal-LM
    auto class, else the image-text-to-text one) with the tiny tokenizer to `path`."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    if not hasattr(config, "pad_token_id"):
        config.pad_token_id = None  # some composite configs leave it to their text config
    cls = _model_class(config, model_class)
    model = cls._from_config(config, dtype=dtype) if hasattr(cls, "_from_config") else cls.from_config(config)
    model.save_pretrained(path)
    make_tokenizer(path)
    return path


def _model_class(config: transformers.PretrainedConfig, name: str | None) -> type:
    if name:
        return getattr(transformers, name)
    from transformers.models.auto import modeling_auto

    mappings = [
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    ]
    if hasattr(config, "vision_config"):  # a composite config: its class is the vision-language one
        mappings.reverse()
    for mapping in mappings:
        if config.model_type in mapping:
            return getattr(transformers, mapping[config.model_type])
    raise ValueError(f"{config.model_type}: no causal-LM or image-text-to-text class")


def streamed_logits(folder: Path, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Logits the way the engine computes them: capture what every block receives, run the blocks
    one at a time (each materialised from the checkpoint, then released), apply the model's head."""
    from shears.pruning.skeleton import build_skeleton
    from shears.pruning.streaming import advance, capture_inputs, head_logits

    device = torch.device("cpu")
    skeleton = build_skeleton(folder, device=device, dtype=dtype)
    (batch,) = capture_inputs(skeleton, [ids], device)
    for index in range(skeleton.num_blocks):
        block = skeleton.materialize_block(index)
        with torch.inference_mode():
            advance(block, index, batch, device)
        skeleton.release_block(index)
    return head_logits(skeleton, ids, batch.hidden).float()


def plain_logits(folder: Path, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Logits of a plain transformers forward of the folder, loaded with the class its config names."""
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = _model_class(config, (config.architectures or [None])[0])
    model = cls.from_pretrained(folder, dtype=dtype).eval()
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()
