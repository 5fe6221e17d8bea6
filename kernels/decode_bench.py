"""End-to-end greedy decode speed of a model on the GPU: dense weights vs packed (SparseLinear).

Decode runs one token at a time against a StaticCache, the step captured in a CUDA graph so that Python
and launch overhead (hundreds of small kernels per token) do not hide the matmuls; if capture fails the
step runs eagerly and the result says so. Warm-up steps run eagerly first, which is also when the
dispatcher times its candidates for M = 1 (timing is impossible inside a capture).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _weight_bytes(model: nn.Module) -> int:
    from kernels.sparse_linear import SparseLinear

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    for module in model.modules():
        if isinstance(module, SparseLinear) and module._operand is not None:
            total += module._operand.resident_bytes() - module._operand.packed.nbytes
    return total


@torch.no_grad()
def greedy_decode(
    model: nn.Module, prompt: torch.Tensor, new_tokens: int, use_graph: bool = True
) -> dict[str, Any]:
    """Decode `new_tokens` greedily after `prompt` [1, P]; tokens/s over the decode steps only."""
    from transformers import StaticCache

    device = prompt.device
    length = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=length + new_tokens + 2)
    logits = model(
        prompt, past_key_values=cache, cache_position=torch.arange(length, device=device), use_cache=True
    ).logits[:, -1]
    first_logits = logits.float().clone()
    token = logits.argmax(-1).view(1, 1)
    static_ids, static_pos = token.clone(), torch.tensor([length], device=device)

    def step() -> torch.Tensor:
        return model(static_ids, past_key_values=cache, cache_position=static_pos, use_cache=True).logits[
            :, -1
        ]

    for _ in range(3):  # writes the same cache slot each time: idempotent
        step()
    torch.cuda.synchronize(device)
    graph, graph_error, graph_out = None, None, None
    if use_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graph_out = step()
        except Exception as exc:  # capture fails on data-dependent control flow: measure eagerly instead
            graph, graph_error = None, f"{type(exc).__name__}: {exc}"[:300]
            torch.cuda.synchronize(device)
    tokens = [int(token)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    generated = torch.empty(new_tokens, dtype=torch.long, device=device)
    start.record()
    for i in range(new_tokens):
        static_pos.fill_(length + i)
        if graph is not None:
            graph.replay()
            out = graph_out
        else:
            out = step()
        token = out.argmax(-1)
        generated[i] = token[0]
        static_ids.copy_(token.view(1, 1))
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000.0
    tokens += generated.tolist()
    return {
        "tokens_per_s": new_tokens / seconds,
        "seconds": seconds,
        "cuda_graph": graph is not None,
        "graph_error": graph_error,
        "tokens": tokens,
        "first_logits": first_logits,
    }


def decode_comparison(
    folder: Path,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    new_tokens: int = 64,
    prompt_tokens: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Dense vs packed decode of the folder's model: tokens/s, speedup, agreement, weight bytes."""
    from transformers import AutoModelForCausalLM

    from kernels.sparse_linear import load_packed_model

    started = time.perf_counter()
    dense = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    vocab = dense.config.vocab_size
    prompt = torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(
        device
    )
    dense_run = greedy_decode(dense, prompt, new_tokens)
    dense_bytes = _weight_bytes(dense)
    del dense
    torch.cuda.empty_cache()
    packed = load_packed_model(folder, device=device, dtype=dtype)
    packed_run = greedy_decode(packed, prompt, new_tokens)
    packed_bytes = _weight_bytes(packed)
    del packed
    torch.cuda.empty_cache()
    agree = sum(a == b for a, b in zip(dense_run["tokens"], packed_run["tokens"], strict=True))
    logit_error = float((dense_run["first_logits"] - packed_run["first_logits"]).abs().max())
    return {
        "new_tokens": new_tokens,
        "prompt_tokens": prompt_tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "dense_tokens_per_s": dense_run["tokens_per_s"],
        "packed_tokens_per_s": packed_run["tokens_per_s"],
        "speedup": packed_run["tokens_per_s"] / dense_run["tokens_per_s"],
        "cuda_graph": {"dense": dense_run["cuda_graph"], "packed": packed_run["cuda_graph"]},
        "graph_errors": {
            k: r["graph_error"] for k, r in (("dense", dense_run), ("packed", packed_run)) if r["graph_error"]
        },
        "tokens_agree": agree / len(dense_run["tokens"]),
        "first_step_max_abs_logit_diff": logit_error,
        "dense_weight_bytes": dense_bytes,
        "packed_weight_bytes": packed_bytes,
        "seconds": time.perf_counter() - started,
    }
