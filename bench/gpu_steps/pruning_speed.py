"""Step 5: pruning speed on a LLaMA-7B-shaped random model, 128 x 2048 random calibration tokens.

Runs the engine's per-block work with the engine's own parts where they are free of the server's
packages: block 0's inputs captured by `streaming.capture_inputs`, statistics from `pruning.stats`,
solves by `pruning.solvers`, blocks run by `streaming.run_block`. Per block, as `engine._prune_blocks`
does: one forward over the calibration batches with statistics hooks (layers sharing an input share
one accumulator and one factorisation), the solve of each linear, one forward that propagates the
pruned block's outputs (and measures their error on the first 8,192 tokens). Blocks are random
(seeded) and made on the device one at a time; reading and writing checkpoint shards is not timed.

Only a few blocks run; the model time is extrapolated to 32 blocks from the steady per-block time and
is labelled so. Variants: Wanda, SparseGPT with today's defaults (re-fit of the kept weights, 10 CG
iterations) and SparseGPT as in the paper (no re-fit); 50% unstructured.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from bench.gpu_steps.common import allocated_bytes, peak_bytes, reset_peak_memory, sync
from bench.gpu_steps.context import StepContext

LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=512,
)


@dataclass(frozen=True)
class Sizes:
    model: dict[str, int]
    samples: int
    seqlen: int
    batch_size: int  # the engine's default calibration.batch_size
    blocks: int  # how many blocks each variant prunes (the model time is extrapolated from them)


SIZES = {"gpu": Sizes(LLAMA_7B, 128, 2048, 8, blocks=3), "dry": Sizes(TINY, 4, 64, 2, blocks=2)}
SPARSITY = 0.5
# Today's request defaults (PruneRequest.sparsegpt; tests/bench/test_gpu_check.py keeps them in step).
SPARSEGPT_DEFAULTS = {
    "variant": "admm",
    "block_size": 128,
    "damp": 0.01,
    "refine_iterations": 4,
    "refit_damp": 0.3,
    "refit_shrink": 0.0,
    "refit_precision": "auto",
    "admm_iterations": 8,
    "admm_rho": 1.0,
    "admm_precision": "auto",
}
VARIANTS: dict[str, dict[str, Any]] = {  # name: the method and its options (sparsegpt.solve reads them)
    "wanda": {"method": "wanda"},  # the paper's Wanda (input norms only; the request default re-fits)
    "sparsegpt": {"method": "sparsegpt", **SPARSEGPT_DEFAULTS},
    "sparsegpt-paper": {
        "method": "sparsegpt",
        **SPARSEGPT_DEFAULTS,
        "variant": "paper",
        "refine_iterations": 0,
    },
    "sparsegpt-refit": {"method": "sparsegpt", **SPARSEGPT_DEFAULTS, "variant": "refit"},
}
ERROR_SAMPLE_TOKENS = 8192  # engine.ERROR_SAMPLE_TOKENS (the engine module needs pydantic)


class Statistics:
    """Forward hooks feeding one accumulator per distinct input (block_pruner.InputStats' grouping:
    layers that receive the same tensor object on the first batch share it)."""

    def __init__(self, layers: dict[str, nn.Linear], kind: str, device: torch.device) -> None:
        from shears.pruning.stats import HessianAccumulator, InputNormAccumulator

        self.layers, self.device = layers, device
        self.make = HessianAccumulator if kind == "hessian" else InputNormAccumulator
        self.first: dict[str, torch.Tensor] | None = {}
        self.leader: dict[str, str] = {}
        self.accumulators: dict[str, Any] = {}
        self.handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.first is not None:
                self.first[name] = args[0]
            elif self.leader[name] == name:
                self.accumulators[name].add(args[0])

        return hook

    def after_batch(self) -> None:
        if self.first is None:
            return
        by_input: dict[int, str] = {}
        for name, x in self.first.items():
            leader = by_input.setdefault(id(x), name)
            self.leader[name] = leader
            if leader == name:
                self.accumulators[name] = self.make(self.layers[name].in_features, self.device)
                self.accumulators[name].add(x)
        self.first = None

    def of(self, name: str) -> Any:
        return self.accumulators[self.leader[name]]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def capture(sizes: Sizes, device: torch.device) -> tuple[Any, list[Any], float]:
    """(model config, the calibration batches on `device`: block 0's hidden states and what each of
    the first `sizes.blocks` blocks receives, seconds). The model has only those blocks (their
    weights are never used: capture replaces them by recorders)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from shears.pruning.streaming import capture_inputs

    config = LlamaConfig(
        **dict(sizes.model, num_hidden_layers=sizes.blocks),
        max_position_embeddings=sizes.seqlen,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(
        0, config.vocab_size, (sizes.samples, sizes.seqlen), generator=torch.Generator().manual_seed(0)
    )
    # What capture reads of a Skeleton (pruning.skeleton needs accelerate).
    frame = SimpleNamespace(model=model, blocks=model.model.layers, num_blocks=sizes.blocks, device=device)
    sync(device)
    start = time.perf_counter()
    batches = capture_inputs(frame, ids.split(sizes.batch_size), device)  # type: ignore[arg-type]
    sync(device)
    seconds = time.perf_counter() - start
    config = model.config
    del model, frame
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return config, batches, seconds


def make_block(config: Any, index: int, device: torch.device) -> nn.Module:
    """Decoder block `index`: random bf16 weights (std 0.02, seeded by the index) made on the device."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device(device):
        block = LlamaDecoderLayer(config, layer_idx=index).to(torch.bfloat16).eval()
    generator = torch.Generator(device=device).manual_seed(1000 + index)
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, 0.02, generator=generator)
    return block


def solve_layers(
    layers: dict[str, nn.Linear], stats: Statistics, variant: dict[str, Any]
) -> list[dict[str, Any]]:
    from shears.pattern import Pattern
    from shears.pruning.solvers import sparsegpt
    from shears.pruning.solvers.wanda import wanda_prune

    pattern = Pattern()
    prepared: dict[int, Any] = {}
    results = []
    for name, layer in layers.items():
        weight = layer.weight.data
        acc = stats.of(name)
        if variant["method"] == "wanda":
            pruned = wanda_prune(weight, acc.sq_norm, SPARSITY, pattern)
            error = None
        else:
            # The request's options model needs pydantic: the same fields as a plain namespace.
            options = SimpleNamespace(**{key: variant[key] for key in SPARSEGPT_DEFAULTS})
            if id(acc) not in prepared:
                prepared[id(acc)] = sparsegpt.prepare(acc.hessian, options, weight.device)
            pruned = sparsegpt.solve(weight, SPARSITY, pattern, acc.hessian, options, prepared[id(acc)])
            error = sparsegpt.layer_error(weight, pruned, acc.hessian)
        layer.weight.data.copy_(pruned)
        results.append({"name": name, "sparsity": float((pruned == 0).float().mean()), "error": error})
    return results


@torch.inference_mode()
def prune_one_block(
    block: nn.Module,
    index: int,
    batches: list[Any],
    dense_out: list[torch.Tensor],
    variant: dict[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    from shears.pruning.streaming import run_block

    layers = {f"model.layers.{index}.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    kind = "hessian" if variant["method"] == "sparsegpt" else "norms"
    sync(device)
    start = time.perf_counter()
    stats = Statistics(layers, kind, device)
    try:
        for position, batch in enumerate(batches):
            out = run_block(block, index, batch, device)
            stats.after_batch()
            if position < len(dense_out):
                dense_out[position].copy_(out)
    finally:
        stats.close()
    sync(device)
    collected = time.perf_counter()
    layer_results = solve_layers(layers, stats, variant)
    del stats
    sync(device)
    solved = time.perf_counter()
    squared_error = squared_norm = 0.0
    for position, batch in enumerate(batches):
        out = run_block(block, index, batch, device)
        if position < len(dense_out):
            squared_error += float(out.float().sub_(dense_out[position]).square_().sum())
            squared_norm += float(dense_out[position].float().square_().sum())
        batch.hidden.copy_(out)
        del out
    sync(device)
    done = time.perf_counter()
    errors = [r["error"] for r in layer_results if r["error"] is not None]
    return {
        "index": index,
        "seconds": done - start,
        "statistics_s": collected - start,
        "solve_s": solved - collected,
        "propagate_s": done - solved,
        "output_error": squared_error / squared_norm if squared_norm else None,
        "max_layer_error": max(errors) if errors else None,
        "min_layer_sparsity": min(r["sparsity"] for r in layer_results),
        "layers": len(layer_results),
    }


def leading_batches(batches: list[Any], tokens: int) -> int:
    """engine._leading_batches: how many leading batches hold at most `tokens` tokens (at least one)."""
    count = total = 0
    for batch in batches:
        total += batch.hidden.shape[:-1].numel()
        if count and total > tokens:
            break
        count += 1
    return count


def run_variant(
    ctx: StepContext, name: str, config: Any, calibration: list[Any], sizes: Sizes, capture_s: float
) -> None:
    device, variant = ctx.device, VARIANTS[name]
    record: dict[str, Any] = {**variant, "variant": name, "blocks": []}
    batches = [b.clone() for b in calibration]  # each variant starts from block 0's inputs
    dense_out = [torch.empty_like(b.hidden) for b in batches[: leading_batches(batches, ERROR_SAMPLE_TOKENS)]]
    baseline = allocated_bytes(device)
    working = sum(b.hidden.numel() * b.hidden.element_size() for b in batches) + sum(
        t.numel() * t.element_size() for t in dense_out
    )
    reset_peak_memory(device)
    for index in range(sizes.blocks):
        seconds = [b["seconds"] for b in record["blocks"]]
        if ctx.out_of_time(1.5 * max(seconds, default=0.0)):
            ctx.problem(f"time box: {name} stopped after {len(seconds)} of {sizes.blocks} blocks")
            break
        block = make_block(config, index, device)
        record["blocks"].append(prune_one_block(block, index, batches, dense_out, variant, device))
        del block
        ctx.set(name, record)
        print(f"[pruning_speed] {name} block {index}: {record['blocks'][-1]['seconds']:.2f} s", flush=True)
    seconds = [b["seconds"] for b in record["blocks"]]
    if seconds:
        steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
        layers = sizes.model["num_hidden_layers"]
        record |= {
            "steady_block_s": steady,
            "capture_s": capture_s,
            "model_blocks": layers,
            "extrapolated_model_s": capture_s + layers * steady,
            "extrapolation": f"capture + {layers} x the median block time after the first "
            f"(of {len(seconds)} measured); reading and writing checkpoint shards not included",
        }
    if baseline is not None:
        record["peak_gpu_bytes"] = peak_bytes(device) - baseline + working
        record["peak_kind"] = (
            "CUDA memory allocated while pruning: calibration activations, one block, its statistics"
        )
        # Blocks are pruned one at a time and freed: the whole model's peak is one block's.
        record["peak_extrapolation"] = "the same for 32 blocks (one block resident at a time)"
    else:
        record["peak_rss_bytes"] = peak_bytes(device)
        record["peak_kind"] = "process peak RSS"
    ctx.set(name, record)
    del batches, dense_out
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(ctx: StepContext) -> None:
    sizes = SIZES[ctx.mode]
    ctx.set("model", {"shape": "llama-7b" if ctx.mode == "gpu" else "tiny", **sizes.model})
    ctx.set(
        "calibration",
        {
            "samples": sizes.samples,
            "seqlen": sizes.seqlen,
            "batch_size": sizes.batch_size,
            "tokens": "random",
        },
    )
    ctx.set("sparsity", SPARSITY)
    ctx.set("pattern", "unstructured")
    config, calibration, capture_s = capture(sizes, ctx.device)
    ctx.set("capture_s", capture_s)
    for name in VARIANTS:
        if ctx.out_of_time():
            ctx.problem(f"time box: variant {name} not run")
            continue
        ctx.attempt(name, lambda name=name: run_variant(ctx, name, config, calibration, sizes, capture_s))
