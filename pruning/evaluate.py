"""Perplexity on held-out windows: exp(mean next-token NLL), window length and token count stated."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from shears.pruning.skeleton import Skeleton, build_skeleton
from shears.pruning.streaming import Batch, advance, capture_inputs, head_logits

LOGITS_BUDGET_BYTES = 64 << 20


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean NLL per predicted token, nats
    tokens: int  # predicted tokens (each window predicts seqlen - 1)
    seqlen: int
    windows: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def eval_batch_size(seqlen: int, vocab: int) -> int:
    """Windows per forward so that fp32 logits stay within LOGITS_BUDGET_BYTES."""
    return max(1, LOGITS_BUDGET_BYTES // (seqlen * vocab * 4))


class NllMeter:
    def __init__(self) -> None:
        self.total = 0.0
        self.tokens = 0
        self.windows = 0

    def add(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        ids = ids.to(logits.device)
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        self.total += float(nll)
        self.tokens += ids[:, 1:].numel()
        self.windows += ids.shape[0]

    def result(self, seqlen: int) -> Perplexity:
        mean = self.total / max(self.tokens, 1)
        return Perplexity(math.exp(mean), mean, self.tokens, seqlen, self.windows)


def split_windows(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(ids.split(batch_size))


def finish(skeleton: Skeleton, id_batches: list[torch.Tensor], hidden: list[Batch]) -> Perplexity:
    """Apply the model's head to the last block's outputs and score them."""
    meter = NllMeter()
    for ids, batch in zip(id_batches, hidden, strict=True):
        meter.add(head_logits(skeleton, ids, batch.hidden), ids)
    return meter.result(id_batches[0].shape[1])


@torch.inference_mode()
def perplexity_of_folder(
    folder: Path, eval_ids: torch.Tensor, *, device: torch.device | None = None
) -> Perplexity:
    """Perplexity of any Hugging Face folder, one decoder block in memory at a time.

    The one evaluation every tool's output goes through (the engine's before/after numbers use
    the same `finish` on the same windows).
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    skeleton = build_skeleton(Path(folder), device=device, dtype=dtype)
    vocab = skeleton.model.get_output_embeddings().out_features
    id_batches = split_windows(eval_ids, eval_batch_size(eval_ids.shape[1], vocab))
    hidden = capture_inputs(skeleton, id_batches, device)
    for index in range(skeleton.num_blocks):
        block = skeleton.materialize_block(index)
        for batch in hidden:
            advance(block, index, batch, device)
        skeleton.release_block(index)
    return finish(skeleton, id_batches, hidden)
