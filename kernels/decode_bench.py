"""End-to-end greedy decode speed of a model on the GPU: dense weights vs packed (SparseLinear).

Decode runs one token at a time against a StaticCache, the step captured in a CUDA graph so that Python
and launch overhead (hundreds of small kernels per token) do not hide the matmuls; if capture fails the
step runs eagerly and the result says so. Warm-up steps run eagerly first, which is also when the
dispatcher times its candidates for M = 1 (timing is impossible inside a capture).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of parameters and buffers, bytes of the dense/semi-structured copies the dispatcher made)."""
    from shears.kernels.sparse_linear import SparseLinear

    stored = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    derived = 0
    for module in model.modules():
        if isinstance(module, SparseLinear) and module._operand is not None:
            derived += module._operand.resident_bytes() - module._operand.packed.nbytes
    return stored, derived


@torch.no_grad()
def greedy_decode(
    model: nn.Module, prompt: torch.Tensor, new_tokens: int, use_graph: bool = True
) -> dict[str, Any]:
    """Decode `new_tokens` greedily after `prompt` [1, P]; tokens/s over the decode steps only.

    On the GPU the step is a CUDA graph (eager if capture fails) timed with events; elsewhere eager and
    timed with the wall clock (a functional check, not a benchmark).
    """
    from transformers import StaticCache

    device = prompt.device
    length = prompt.shape[1]
    warmup = 3
    cache = StaticCache(config=model.config, max_cache_len=length + new_tokens + warmup + 1)

    def prefill() -> torch.Tensor:
        positions = torch.arange(length, device=device)
        return model(prompt, past_key_values=cache, cache_position=positions, use_cache=True).logits[:, -1]

    static_ids = prefill().argmax(-1).view(1, 1)
    static_pos = torch.tensor([length], device=device)

    def step() -> torch.Tensor:
        return model(static_ids, past_key_values=cache, cache_position=static_pos, use_cache=True).logits[
            :, -1
        ]

    cuda = device.type == "cuda"
    # Warm-up (the dispatcher times its M = 1 candidates here), on a side stream as capture wants. The
    # cache appends at its own counter, so it is reset in place (graph addresses kept) before the run.
    stream = torch.cuda.Stream(device) if cuda else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for _ in range(warmup):
            step()
    if stream is not None:
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
    graph, graph_error, graph_out = None, None, None
    if use_graph and cuda:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graph_out = step()
        except Exception as exc:  # capture fails on data-dependent control flow: measure eagerly instead
            graph, graph_error = None, f"{type(exc).__name__}: {exc}"[:300]
            torch.cuda.synchronize(device)
    cache.reset()
    logits = prefill()
    first_logits = logits.float().clone()
    token = logits.argmax(-1)
    static_ids.copy_(token.view(1, 1))
    tokens = [int(token)]
    generated = torch.empty(new_tokens, dtype=torch.long, device=device)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    began = time.perf_counter()
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
    if cuda:
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000.0
    else:
        seconds = time.perf_counter() - began
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

    from shears.kernels.sparse_linear import load_packed_model

    started = time.perf_counter()
    dense = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    vocab = dense.config.vocab_size
    prompt = torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(
        device
    )
    dense_run = greedy_decode(dense, prompt, new_tokens)
    dense_bytes, _ = _weight_bytes(dense)
    del dense
    torch.cuda.empty_cache()
    packed = load_packed_model(folder, device=device, dtype=dtype)
    packed_run = greedy_decode(packed, prompt, new_tokens)
    packed_bytes, derived_bytes = _weight_bytes(packed)
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
        # Dense copies the dispatcher keeps where cuBLAS beat the kernels (typically prefill shapes).
        "dispatcher_copies_bytes": derived_bytes,
        "seconds": time.perf_counter() - started,
    }
