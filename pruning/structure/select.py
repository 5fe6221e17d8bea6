"""Calibration statistics for structured pruning and the choices made from them, one block at a time.

- Channels and head groups: the second moment and mean of the consumer's inputs (down_proj,
  o_proj) give the unit scores and the least-squares re-fit (`solvers`).
- Experts: REAP (router-weighted expert activation): for each expert, the mean over the tokens
  routed to it of gate weight x ||expert output||.
- Layers: a dense pass over all blocks measuring block influence (1 - E cos(h_in, h_out)), and the
  angular distance across every run of n blocks on a sample of tokens for the contiguous option.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from shears.pruning.config import StructureSpec
from shears.pruning.skeleton import Skeleton
from shears.pruning.stats import HessianAccumulator
from shears.pruning.streaming import Batch, run_block
from shears.pruning.structure import solvers

BOUNDARY_BYTES = 512 << 20  # token sample kept at every block boundary for the contiguous option


class InputMoments:
    """E[x x^T] and E[x] of a module's input, over every token of the calibration batches (fp32)."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self._hessian = HessianAccumulator(columns, device)  # running mean of 2 x x^T
        self._sum = torch.zeros(columns, dtype=torch.float64, device=device)

    def add(self, x: Tensor) -> None:
        self._hessian.add(x)
        self._sum.add_(x.detach().reshape(-1, x.shape[-1]).to(self._sum.device, torch.float64).sum(0))

    @property
    def second(self) -> Tensor:
        return self._hessian.hessian / 2

    @property
    def mean(self) -> Tensor:
        return (self._sum / max(self._hessian.tokens, 1)).float()


@contextmanager
def input_moments(module: nn.Module, device: torch.device) -> Iterator[InputMoments]:
    columns = module.weight.shape[1]
    moments = InputMoments(columns, device)
    handle = module.register_forward_pre_hook(lambda _m, args: moments.add(args[0]))
    try:
        yield moments
    finally:
        handle.remove()


class ExpertSaliency:
    """REAP: sum over routed tokens of g_e(x) ||E_e(x)||, and the routed token count, per expert.

    Hooks a fused experts module called as experts(hidden, top_k_index, top_k_weights) (the
    transformers 5 layout); each expert's output is recomputed alone on its routed tokens.
    """

    def __init__(self, experts: int, device: torch.device) -> None:
        self.total = torch.zeros(experts, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(experts, dtype=torch.int64, device=device)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, _output: object) -> None:
        hidden, index, weights = _expert_args(args, kwargs)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index, weights = index.reshape(hidden.shape[0], -1), weights.reshape(hidden.shape[0], -1)
        for expert in index.unique().tolist():
            if not 0 <= expert < len(self.total):
                continue
            rows, slots = (index == expert).nonzero(as_tuple=True)
            one = torch.full((len(rows), 1), expert, dtype=index.dtype, device=index.device)
            out = module.forward(hidden[rows], one, torch.ones_like(weights[rows, :1]))  # no hooks
            norms = out.float().norm(dim=-1) * weights[rows, slots].float()
            self.total[expert] += norms.sum().to(self.total.dtype)
            self.tokens[expert] += len(rows)

    @property
    def scores(self) -> Tensor:
        return (self.total / self.tokens.clamp_min(1)).float()


def _expert_args(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
    if len(values) < 3:
        raise RuntimeError("the experts module was not called as experts(hidden, top_k_index, top_k_weights)")
    return values[0], values[1], values[2]


@contextmanager
def expert_saliency(module: nn.Module, experts: int, device: torch.device) -> Iterator[ExpertSaliency]:
    saliency = ExpertSaliency(experts, device)
    handle = module.register_forward_hook(saliency.hook, with_kwargs=True)
    try:
        yield saliency
    finally:
        handle.remove()


@torch.inference_mode()
def forward_all(
    block: nn.Module,
    index: int,
    batches: list[Batch],
    device: torch.device,
    outputs: list[Tensor] | None = None,
) -> None:
    """Run block `index` (of the dense numbering: its arguments) over every batch, hooks collecting
    what they collect; the leading batches' outputs go into `outputs` if given."""
    for position, batch in enumerate(batches):
        out = run_block(block, index, batch, device)
        if outputs is not None and position < len(outputs):
            outputs[position].copy_(out)


def unit_scores(
    score: str, weight: Tensor, moments: InputMoments, width: int, damp: float, magnitude: Tensor
) -> Tensor:
    """Scores of a consumer's units (`width` columns each) by the request's criterion."""
    if score == "wanda-sp":
        return solvers.wanda_sp_scores(weight, moments.second, width)
    if score == "flap":
        return solvers.flap_scores(weight, moments.second, moments.mean, width)
    if score == "magnitude":
        return solvers.magnitude_scores(magnitude)
    return solvers.obs_scores(weight, moments.second, width, damp)


def choose_units(
    score: str, weight: Tensor, moments: InputMoments, width: int, keep: int, damp: float, magnitude: Tensor
) -> Tensor:
    """Sorted indices of the kept units: greedy OBS (with updates) for 'obs', else the top scores."""
    if score == "obs":
        return solvers.obs_select(weight, moments.second, width, keep, damp)
    return solvers.top_units(unit_scores(score, weight, moments, width, damp, magnitude), keep)


# -- layers ------------------------------------------------------------------------------------


@dataclass
class LayerScores:
    influence: list[float]  # per block: 1 - E cos(h_in, h_out)
    run_distance: list[float] | None  # per start: angular distance across the run (contiguous)
    sample_tokens: int


@torch.inference_mode()
def score_layers(skeleton: Skeleton, calib: list[Batch], run: int | None) -> LayerScores:
    """A dense pass over every block on copies of the calibration inputs (`calib` is untouched).

    With `run` (the contiguous option), a token sample of the hidden states at every block
    boundary is kept (at most BOUNDARY_BYTES in all) to measure the distance across each run.
    """
    device = skeleton.device
    stream = [batch.clone() for batch in calib]
    hidden = stream[0].hidden.shape[-1]
    total_tokens = sum(b.hidden.shape[:-1].numel() for b in stream)
    boundaries: list[Tensor] = []
    sample = 0
    if run is not None:
        per_token = (skeleton.num_blocks + 1) * hidden * 2
        sample = int(min(total_tokens, max(256, BOUNDARY_BYTES // per_token)))
        boundaries.append(_sample(stream, sample))
    influence = []
    for index in range(skeleton.num_blocks):
        block = skeleton.materialize_block(index)
        cos_total, tokens = 0.0, 0
        for batch in stream:
            out = run_block(block, index, batch, device)
            part, count = solvers.cosine_sum(batch.hidden, out)
            cos_total, tokens = cos_total + part, tokens + count
            batch.hidden.copy_(out)
        influence.append(1.0 - cos_total / max(tokens, 1))
        if run is not None:
            boundaries.append(_sample(stream, sample))
        skeleton.release_block(index)
    distances = None
    if run is not None:
        distances = [
            solvers.angular_distance(boundaries[start], boundaries[start + run])
            for start in range(skeleton.num_blocks - run + 1)
        ]
    return LayerScores(influence, distances, sample)


def _sample(stream: list[Batch], tokens: int) -> Tensor:
    """The first `tokens` token states of the stream, in bf16 (cosines need no more)."""
    parts, have = [], 0
    for batch in stream:
        if have >= tokens:
            break
        flat = batch.hidden.reshape(-1, batch.hidden.shape[-1])[: tokens - have]
        parts.append(flat.to(torch.bfloat16))
        have += len(flat)
    return torch.cat(parts)


def removed_blocks(scores: LayerScores, count: int, spec: StructureSpec) -> list[int]:
    if spec.contiguous:
        assert scores.run_distance is not None
        start = solvers.closest_run(scores.run_distance)
        return list(range(start, start + count))
    return solvers.least_influential(scores.influence, count)
