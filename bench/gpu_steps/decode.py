"""Step 4: end-to-end greedy decode of a random-weight model of SmolLM2-135M's shape, its decoder
linears magnitude-pruned to 2:4: dense (the pruned weights, zeros included) vs packed (SparseLinear
through the measuring dispatcher), each step a CUDA graph where capture works (decode_bench).

Built on the device from a seed: nothing to carry to the GPU machine. Equality: the first step's
logits of both runs within bf16 tolerance, and how many greedy tokens agree.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bench.gpu_steps.common import pack_weight, relative_error
from bench.gpu_steps.context import StepContext

SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    tie_word_embeddings=True,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    tie_word_embeddings=True,
)
# model settings, prompt tokens, new tokens
SIZES = {"gpu": (SMOLLM2_135M, 32, 128), "dry": (TINY, 4, 2)}
# First-step logits, relative to their largest magnitude: bf16 rounding of 30 blocks of different
# accumulation orders (cuBLAS vs the Triton kernels) stays well inside this; a wrong kernel does not.
LOGIT_TOLERANCE = 5e-2


def build_model(settings: dict[str, Any], device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**settings, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


@torch.no_grad()
def prune_24(model: nn.Module) -> list[str]:
    """Keep the 2 largest-magnitude weights of every 4 in each decoder linear; their names."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            weight = module.weight
            groups = weight.view(weight.shape[0], -1, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(
                -1, groups.abs().topk(2, dim=-1).indices, True
            )
            weight.copy_(torch.where(keep, groups, 0.0).view_as(weight))
            names.append(name)
    return names


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def run(ctx: StepContext) -> None:
    from shears.kernels.decode_bench import greedy_decode
    from shears.kernels.dispatch import Dispatcher
    from shears.kernels.sparse_linear import swap_in_sparse

    settings, prompt_tokens, new_tokens = SIZES[ctx.mode]
    device = ctx.device
    ctx.set("model", {"shape": "smollm2-135m" if ctx.mode == "gpu" else "tiny", **settings})
    ctx.set("prompt_tokens", prompt_tokens)
    ctx.set("new_tokens", new_tokens)
    model = build_model(settings, device)
    names = prune_24(model)
    prompt = torch.randint(
        3, settings["vocab_size"], (1, prompt_tokens), generator=torch.Generator().manual_seed(0)
    )
    prompt = prompt.to(device)
    dense = greedy_decode(model, prompt, new_tokens)
    ctx.set("dense", {k: dense[k] for k in ("tokens_per_s", "seconds", "cuda_graph", "graph_error")})
    ctx.set("dense_weight_bytes", weight_bytes(model))
    packed = {
        f"{name}.weight": pack_weight(model.get_submodule(name).weight.detach(), (2, 4), name)
        for name in names
    }
    dispatcher = Dispatcher(measure=True, max_configs=ctx.max_configs)
    swap_in_sparse(model, packed, dispatcher)
    del packed
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ctx.set("packed_layers", len(names))
    sparse = greedy_decode(model, prompt, new_tokens)
    ctx.set("packed", {k: sparse[k] for k in ("tokens_per_s", "seconds", "cuda_graph", "graph_error")})
    ctx.set("packed_weight_bytes", weight_bytes(model))
    ctx.set("speedup", sparse["tokens_per_s"] / dense["tokens_per_s"])
    error = relative_error(sparse["first_logits"], dense["first_logits"])
    ctx.set("first_logits_relative_diff", error)
    ctx.set("logits_within_tolerance", error <= LOGIT_TOLERANCE)
    ctx.set("logit_tolerance", LOGIT_TOLERANCE)
    ctx.set(
        "tokens_agree",
        sum(a == b for a, b in zip(dense["tokens"], sparse["tokens"], strict=True)) / len(dense["tokens"]),
    )
    ctx.set("agreeing_prefix", agreeing_prefix(dense["tokens"], sparse["tokens"]))
    ctx.set(
        "dispatch",
        [
            {"key": [str(k) for k in c["key"]], "backend": c["backend"], "config": c["config"]}
            for c in dispatcher.report()
        ],
    )
