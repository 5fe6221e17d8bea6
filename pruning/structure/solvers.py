"""Pure tensor maths of structured pruning: unit scores, the re-fit of a consumer, layer distances.

A *unit* is a set of input columns of a consumer layer that leaves or stays together: one MLP
intermediate channel (columns of down_proj), or one key-value head group (the o_proj columns of
every query head that reads that group's keys and values). Scores are higher for units worth more.

Statistics come as the second moment S = E[x x^T] [K, K] and the mean E[x] [K] of the consumer's
inputs over the calibration tokens (fp32). Nothing here mutates an argument.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from shears.pruning.linalg import cholesky_inverse_
from shears.pruning.stats import ieee_fp32_matmul

DAMP_RETRIES = 4
OBS_STEPS = 32  # greedy OBS removes at most this many batches of units (1 unit per batch if fewer)


def unit_columns(units: int, width: int, device: torch.device | None = None) -> Tensor:
    """[units, width] column indices: unit u owns columns u*width .. u*width + width - 1."""
    return torch.arange(units * width, device=device).reshape(units, width)


def columns_of(kept_units: Tensor, width: int) -> Tensor:
    """The sorted column indices of the given units."""
    return (
        kept_units.sort().values[:, None] * width + torch.arange(width, device=kept_units.device)
    ).reshape(-1)


def wanda_sp_scores(weight: Tensor, second: Tensor, width: int) -> Tensor:
    """Wanda-sp: sum over a unit's columns of ||W[:, c]|| * ||X_c|| (RMS of the input)."""
    w = weight.detach().float()
    column = w.norm(dim=0) * second.diagonal().clamp_min(0).sqrt()
    return column.reshape(-1, width).sum(dim=1)


def flap_scores(weight: Tensor, second: Tensor, mean: Tensor, width: int) -> Tensor:
    """FLAP fluctuation: sum over a unit's columns of Var(X_c) * ||W[:, c]||^2.

    A channel whose input barely moves carries a constant a bias can stand in for, however large.
    """
    w = weight.detach().float()
    variance = (second.diagonal() - mean.float().square()).clamp_min(0)
    return (variance * w.square().sum(dim=0)).reshape(-1, width).sum(dim=1)


def _damped(second: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """(S + d * mean(diag S) * I, dead): dead inputs (never non-zero) get diagonal 1 first."""
    hess = second.detach().float().clone()
    dead = hess.diagonal() <= 0
    hess.diagonal().copy_(torch.where(dead, 1.0, hess.diagonal()))
    hess.diagonal().add_(damp * float(hess.diagonal().mean()))
    return hess, dead


def _cholesky(matrix: Tensor, what: str) -> Tensor:
    """Lower Cholesky factor, adding more damping (10x per try) when the matrix is not positive definite."""
    scale = float(matrix.diagonal().abs().mean()) or 1.0
    extra = 0.0
    for _ in range(DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(matrix + extra * torch.eye(len(matrix), device=matrix.device))
        if int(info) == 0:
            return lower
        extra = scale * 1e-4 if extra == 0 else extra * 10
    raise RuntimeError(f"{what}: the calibration statistics are not positive definite even after damping")


def _inverse(matrix: Tensor, what: str) -> Tensor:
    """The inverse of a positive definite matrix as L^-T L^-1, computed in L's buffer."""
    return cholesky_inverse_(_cholesky(matrix, what))


@torch.no_grad()
def obs_scores(weight: Tensor, second: Tensor, width: int, damp: float) -> Tensor:
    """One-shot second-order scores: the output error tr(W_G (H^-1_GG)^-1 W_G^T) of removing unit G
    alone with the optimal re-fit of the rest (the structured OBS of ZipLM / SlimGPT)."""
    with ieee_fp32_matmul():
        hess, dead = _damped(second, damp)
        w = weight.detach().float().masked_fill(dead[None, :], 0.0)
        hinv = _inverse(hess, "OBS scores")
        return _group_errors(w, hinv, unit_columns(w.shape[1] // width, width, w.device))


def _group_errors(w: Tensor, hinv: Tensor, groups: Tensor) -> Tensor:
    """For each row of `groups` (column indices): tr(W_G (Hinv_GG)^-1 W_G^T)."""
    if groups.shape[1] == 1:  # single columns: ||W_c||^2 / Hinv_cc (batched 1x1 solves are slow)
        columns = groups[:, 0]
        return w[:, columns].square().sum(0) / hinv.diagonal()[columns]
    blocks = hinv[groups[:, :, None], groups[:, None, :]]  # [U, w, w]
    wg = w[:, groups].permute(1, 2, 0)  # [U, w, out]
    solved = torch.linalg.solve(blocks, wg)
    return (wg * solved).sum(dim=(1, 2))


@torch.no_grad()
def obs_select(weight: Tensor, second: Tensor, width: int, keep: int, damp: float) -> Tensor:
    """Greedy OBS: remove units in up to OBS_STEPS batches, each time the ones whose removal (with
    the optimal re-fit of what remains) costs least, updating W and H^-1 after each batch.

    Returns the sorted indices of the `keep` units kept.
    """
    units = weight.shape[1] // width
    with ieee_fp32_matmul():
        hess, dead = _damped(second, damp)
        w = weight.detach().float().masked_fill(dead[None, :], 0.0)
        hinv = _inverse(hess, "OBS selection")
        alive = torch.ones(units, dtype=torch.bool, device=w.device)
        groups = unit_columns(units, width, w.device)
        to_remove = units - keep
        per_step = max(1, math.ceil(to_remove / OBS_STEPS))
        while to_remove > 0:
            candidates = alive.nonzero().flatten()
            errors = _group_errors(w, hinv, groups[candidates])
            count = min(per_step, to_remove)
            chosen = candidates[errors.topk(count, largest=False).indices]
            cols = groups[chosen].reshape(-1)
            # Remove the chosen columns optimally:
            # W -= W_S Hinv_SS^-1 Hinv_S:  and  Hinv -= Hinv_:S Hinv_SS^-1 Hinv_S:
            lower = _cholesky(hinv[cols][:, cols], "OBS update")
            rows = hinv[cols]  # [s, K]
            solved = torch.cholesky_solve(rows, lower)  # Hinv_SS^-1 Hinv_S:
            w -= w[:, cols] @ solved
            hinv -= rows.T @ solved
            w[:, cols] = 0.0
            alive[chosen] = False
            to_remove -= count
    return alive.nonzero().flatten()


def magnitude_scores(squared_norms: Tensor) -> Tensor:
    """Weights-only baseline: a unit's score is the squared norm of every weight it owns."""
    return squared_norms.float()


def top_units(scores: Tensor, keep: int) -> Tensor:
    """Sorted indices of the `keep` highest scores (ties broken by the lower index: deterministic)."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:keep].sort().values


@torch.no_grad()
def refit_consumer(
    weight: Tensor,
    second: Tensor,
    kept_columns: Tensor,
    damp: float,
    *,
    bias: Tensor | None = None,
    mean: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Least-squares re-fit of a consumer on its kept inputs: W' = W H[:, K] H[K, K]^-1, H damped.

    W' minimises E||W x + b - W' x_K - b'||^2 + d ||W' - W_K||^2 (the damping pulls toward the
    original weights). With a bias, the input is augmented with a constant 1 so b' is fitted too
    (the intercept absorbs the mean of what was removed); `mean` = E[x] is then required.
    Returns (W' [out, |K|], b' or None) in fp32.
    """
    w = weight.detach().float()
    second = second.detach().float()
    keep = kept_columns.to(w.device)
    if bias is not None:
        if mean is None:
            raise ValueError("refit_consumer: a bias needs the inputs' mean")
        size = second.shape[0]
        augmented = torch.empty(size + 1, size + 1, device=w.device)
        augmented[:size, :size] = second
        augmented[:size, size] = augmented[size, :size] = mean.float()
        augmented[size, size] = 1.0
        second = augmented
        w = torch.cat([w, bias.detach().float()[:, None]], dim=1)
        keep = torch.cat([keep, torch.tensor([size], device=w.device)])
    with ieee_fp32_matmul():
        sub = second[keep][:, keep].clone()
        regularised = torch.ones(len(keep), device=w.device)
        if bias is not None:
            regularised[-1] = 0.0  # the intercept is not pulled toward the old bias
        diag = sub.diagonal()
        damping = damp * float(diag[regularised > 0].clamp_min(0).mean()) or damp
        sub.diagonal().add_(damping * regularised)
        rhs = w @ second[:, keep] + damping * w[:, keep] * regularised
        fitted = torch.cholesky_solve(rhs.T, _cholesky(sub, "re-fit")).T
    if bias is not None:
        return fitted[:, :-1].contiguous(), fitted[:, -1].contiguous()
    return fitted, None


def compensate_bias(weight: Tensor, bias: Tensor, mean: Tensor, removed_columns: Tensor) -> Tensor:
    """FLAP's bias compensation without a re-fit: b' = b + W[:, R] E[x_R]."""
    w = weight.detach().float()
    return bias.detach().float() + w[:, removed_columns] @ mean.float()[removed_columns]


def output_error(
    weight: Tensor,
    second: Tensor,
    new_weight: Tensor,
    kept_columns: Tensor,
    *,
    bias: Tensor | None = None,
    new_bias: Tensor | None = None,
    mean: Tensor | None = None,
) -> float:
    """Relative E||(W x + b) - (W' x_K + b')||^2 / E||W x + b||^2 on the calibration inputs."""
    w = weight.detach().float()
    delta = w.clone()
    delta[:, kept_columns] -= new_weight.float()
    with ieee_fp32_matmul():
        second = second.float()
        error = float(((delta @ second) * delta).sum())
        total = float(((w @ second) * w).sum())
        if bias is not None and mean is not None:
            db = bias.float() - (new_bias.float() if new_bias is not None else 0.0)
            error += float(2 * (delta @ mean.float()) @ db + db.square().sum())
            total += float(2 * (w @ mean.float()) @ bias.float() + bias.float().square().sum())
    return error / total if total > 0 else 0.0


# -- depth: which decoder blocks to remove ----------------------------------------------------------


def cosine_sum(before: Tensor, after: Tensor) -> tuple[float, int]:
    """Sum over tokens of cos(h_before, h_after) and the token count (in fp32)."""
    a = before.reshape(-1, before.shape[-1]).float()
    b = after.reshape(-1, after.shape[-1]).float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
    return float(cos.sum()), a.shape[0]


def angular_distance(before: Tensor, after: Tensor) -> float:
    """Mean over tokens of arccos(cos(h_before, h_after)) / pi (Gromov et al. 2024)."""
    a = before.reshape(-1, before.shape[-1]).float()
    b = after.reshape(-1, after.shape[-1]).float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).clamp(-1, 1)
    return float(torch.arccos(cos).mean() / math.pi)


def least_influential(influence: list[float], remove: int) -> list[int]:
    """ShortGPT: the `remove` blocks of lowest block influence (1 - E cos(h_in, h_out)), sorted."""
    order = sorted(range(len(influence)), key=lambda i: (influence[i], i))
    return sorted(order[:remove])


def closest_run(distance_by_start: list[float]) -> int:
    """The start of the contiguous run whose input and output are closest (ties: the latest run)."""
    best = min(distance_by_start)
    return max(i for i, d in enumerate(distance_by_start) if d == best)
