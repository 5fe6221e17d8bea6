"""Measured speed of a model folder in transformers: prefill and decode tokens per second.

Prefill: batch 4 x 512 tokens, one forward without a cache. Decode: batch 1, 128 new tokens one at
a time with the KV cache, after a 32-token prompt (the prompt's prefill is not counted). Each is
the median of `repeats` runs after one warm-up; inputs are fixed random token ids. The whole model
is loaded, so the job measures only when it fits comfortably in memory (`fits_in_memory`).
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

PREFILL_SHAPE = (4, 512)
DECODE_TOKENS = 128
DECODE_PROMPT = 32


@dataclass(frozen=True)
class Speed:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_shape: tuple[int, int]
    decode_tokens: int
    repeats: int
    dtype: str
    device: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prefill_shape": list(self.prefill_shape)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocations, kernel choice
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def measure_speed(
    folder: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int = 3,
    prefill_shape: tuple[int, int] | None = None,
    decode_tokens: int | None = None,
) -> Speed:
    """Tokens/s of the folder's model; shapes default to the module's PREFILL_SHAPE / DECODE_TOKENS."""
    from transformers import AutoModelForCausalLM

    prefill_shape = prefill_shape or PREFILL_SHAPE
    decode_tokens = decode_tokens or DECODE_TOKENS

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, vocab, prefill_shape, generator=generator).to(device)
    prompt = torch.randint(0, vocab, (1, DECODE_PROMPT), generator=generator).to(device)

    def prefill() -> None:
        model(input_ids=batch, use_cache=False)

    # transformers 5.24 renamed past_key_values to cache (the old name warns until 5.40)
    cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def decode() -> None:
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out[cache_key], out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, use_cache=True, **{cache_key: cache})
            cache, token = out[cache_key], out.logits[:, -1:].argmax(-1)
        _sync(device)
        decode_seconds.append(time.perf_counter() - start)

    prefill_seconds = _timed(prefill, device, repeats)
    decode_seconds: list[float] = []
    _timed(decode, device, repeats)
    decode_time = statistics.median(decode_seconds[1:])  # the first was the warm-up
    return Speed(
        prefill_tokens_per_s=prefill_shape[0] * prefill_shape[1] / prefill_seconds,
        decode_tokens_per_s=decode_tokens / decode_time,
        prefill_shape=prefill_shape,
        decode_tokens=decode_tokens,
        repeats=repeats,
        dtype=str(dtype).removeprefix("torch."),
        device=device.type,
    )


def fits_in_memory(weight_bytes: int, device: torch.device, factor: float = 3.0) -> bool:
    """Whether a whole model of `weight_bytes` (plus activations) fits `factor` times over."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return weight_bytes * factor < free
    try:
        import psutil

        return weight_bytes * factor < psutil.virtual_memory().available
    except ImportError:  # a bare GPU box may lack psutil: measure nothing rather than risk it
        return False


def compare_speed(
    dense: Path, pruned: Path, device: torch.device, dtype: torch.dtype, weight_bytes: int
) -> dict[str, Any]:
    """Both models timed the same way, and the pruned model's speed-ups."""
    if not fits_in_memory(weight_bytes, device):
        return {"skipped": "the whole model does not fit in memory three times over"}
    before = measure_speed(dense, device=device, dtype=dtype)
    after = measure_speed(pruned, device=device, dtype=dtype)
    return {
        "dense": before.to_dict(),
        "pruned": after.to_dict(),
        "prefill_speedup": after.prefill_tokens_per_s / before.prefill_tokens_per_s,
        "decode_speedup": after.decode_tokens_per_s / before.decode_tokens_per_s,
    }
