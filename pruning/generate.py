"""Calibration text sampled from the model itself (`source: self`), for when no data set fits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

GENERATE_BATCH = 16


def self_sampler(
    folder: Path, device: torch.device, dtype: torch.dtype
) -> Callable[[int, int, int], torch.Tensor]:
    """A `generate(samples, seqlen, seed)` that samples full-length token windows from the model.

    This loads the whole model once (generation needs every block per token); pick another source
    for a model that does not fit in memory.
    """

    def generate(samples: int, seqlen: int, seed: int) -> torch.Tensor:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        start = model.config.bos_token_id
        if start is None:
            start = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        windows = []
        try:
            with torch.inference_mode():
                for first in range(0, samples, GENERATE_BATCH):
                    count = min(GENERATE_BATCH, samples - first)
                    prompt = torch.full((count, 1), start, dtype=torch.long, device=device)
                    out = model.generate(
                        prompt,
                        do_sample=True,
                        top_k=0,
                        top_p=1.0,
                        max_new_tokens=seqlen - 1,
                        min_new_tokens=seqlen - 1,
                        pad_token_id=start,
                    )
                    windows.append(out[:, :seqlen].cpu())
        finally:
            torch.random.set_rng_state(generator_state)
            del model
        return torch.cat(windows)

    return generate
