"""Calibration statistics of one linear layer's inputs, accumulated batch by batch in fp32.

Padding tokens (token_mask False) never enter a statistic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from shears.pruning.linalg import mirror_lower_

PANEL = 512  # columns per lower-triangle update of a Hessian


@contextmanager
def ieee_fp32_matmul() -> Iterator[None]:
    """fp32 matmuls in full precision (no TF32) inside the block; the previous setting is restored.

    Uses the same API family (new `fp32_precision` where it exists) for saving and restoring, so a
    caller that set TF32 with either API reads back what it set.
    """
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        previous = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:  # torch < 2.9
        previous_flag = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = previous_flag


def _tokens(x: Tensor, token_mask: Tensor | None, columns: int, device: torch.device) -> Tensor:
    """The real (non-padding) tokens of `x` [..., K] as a 2-D [tokens, K] tensor on `device`."""
    if x.shape[-1] != columns:
        raise ValueError(f"input has {x.shape[-1]} features, the accumulator expects {columns}")
    x = x.detach().to(device).reshape(-1, columns)
    if token_mask is not None:
        if token_mask.numel() != x.shape[0]:
            raise ValueError(
                f"token_mask has {token_mask.numel()} entries for {x.shape[0]} tokens "
                f"(it must have the input's shape without the last dimension)"
            )
        x = x[token_mask.to(device=device, dtype=torch.bool).reshape(-1)]
    return x


class HessianAccumulator:
    """H = (2/N) sum over tokens of x x^T, kept as a running mean in fp32 (SparseGPT's statistic).

    Each batch updates the lower triangle only, in panels of PANEL columns (half the flops of the
    full product: the Hessians are a large part of a job); reading `hessian` mirrors it once.

    `bf16_products`: bf16 inputs (a block computing in bf16) are multiplied in bf16 where that is
    fast (AMX: 2.7x at K = 2048 with the panels' fp32 updates). Each product is exact and summed in
    fp32 inside the matmul; only a batch's sum is rounded to bf16 before it joins the fp32 mean
    (2^-9 relative per entry and batch). fp32 inputs are always multiplied in fp32.
    """

    def __init__(self, columns: int, device: torch.device | str, *, bf16_products: bool = False) -> None:
        self.columns = columns
        self.device = torch.device(device)
        self.bf16_products = bf16_products
        self._hessian = torch.zeros(columns, columns, dtype=torch.float32, device=self.device)
        self._tokens = 0
        self._mirrored = True

    def add(self, x: Tensor, token_mask: Tensor | None = None) -> None:
        x = _tokens(x, token_mask, self.columns, self.device)
        if not (self.bf16_products and x.dtype == torch.bfloat16):
            x = x.to(torch.float32)
        count = x.shape[0]
        if count == 0:
            return
        total = self._tokens + count
        # Running mean: rescale the old sum, then add this batch with weight 2/total (no fp32 overflow).
        beta, alpha = self._tokens / total, 2.0 / total
        with ieee_fp32_matmul():
            for start in range(0, self.columns, PANEL):
                end = min(start + PANEL, self.columns)
                panel = self._hessian[start:, start:end]
                if x.dtype == torch.float32:
                    panel.addmm_(x[:, start:].T, x[:, start:end], beta=beta, alpha=alpha)
                else:  # no bf16 x bf16 -> fp32 matmul on CPU: the bf16 product joins the fp32 mean
                    panel.mul_(beta).add_(x[:, start:].T @ x[:, start:end], alpha=alpha)
        self._tokens = total
        self._mirrored = False

    @property
    def hessian(self) -> Tensor:
        """The accumulated [K, K] Hessian, exactly symmetric (the accumulator's own tensor: do not
        modify it)."""
        if not self._mirrored:
            mirror_lower_(self._hessian, PANEL)
            self._mirrored = True
        return self._hessian

    value = hessian  # the statistic a solver receives

    @property
    def tokens(self) -> int:
        return self._tokens


class InputNormAccumulator:
    """Per input feature, the sum over tokens of x_j^2 in fp32 (Wanda's ||X_j||^2)."""

    def __init__(self, columns: int, device: torch.device | str) -> None:
        self.columns = columns
        self.device = torch.device(device)
        self._sq_norm = torch.zeros(columns, dtype=torch.float32, device=self.device)
        self._tokens = 0

    def add(self, x: Tensor, token_mask: Tensor | None = None) -> None:
        x = _tokens(x, token_mask, self.columns, self.device).to(torch.float32)
        if x.shape[0] == 0:
            return
        self._sq_norm.add_(x.square().sum(dim=0))
        self._tokens += x.shape[0]

    @property
    def sq_norm(self) -> Tensor:
        """The accumulated [K] squared input norms (the accumulator's own tensor: do not modify it)."""
        return self._sq_norm

    value = sq_norm  # the statistic a solver receives

    @property
    def tokens(self) -> int:
        return self._tokens


class CorrectionAccumulator(HessianAccumulator):
    """The Hessian of the pruned model's inputs and their cross moment with the dense model's.

    Block-level error correction fits W x~ (x~: this layer's input in the pruned model) to W0 x (x:
    the same token's input in the dense model), so later layers repair what earlier ones lost. Its
    statistics: H~ = (2/N) sum x~ x~^T (the Hessian, `value`) and C = (2/N) sum x~ x^T, running means
    in fp32 like the Hessian's.
    """

    def __init__(self, columns: int, device: torch.device | str) -> None:
        super().__init__(columns, device)
        self._cross = torch.zeros(columns, columns, dtype=torch.float32, device=self.device)
        self.paired = True  # every batch's inputs paired up: the correction applies

    def add_pair(self, pruned: Tensor, dense: Tensor) -> None:
        """One batch: `pruned` and `dense` [..., K] are the same tokens' inputs in the two models."""
        if not self.paired:  # an earlier batch did not pair up: the plain fit
            self.add(pruned)
            return
        x = _tokens(pruned, None, self.columns, self.device).to(torch.float32)
        y = _tokens(dense, None, self.columns, self.device).to(torch.float32)
        if x.shape != y.shape:
            raise ValueError(f"pruned inputs {tuple(x.shape)} and dense inputs {tuple(y.shape)} differ")
        if x.shape[0] == 0:
            return
        total = self._tokens + x.shape[0]
        with ieee_fp32_matmul():
            self._cross.addmm_(x.T, y, beta=self._tokens / total, alpha=2.0 / total)
        self.add(x)  # H~, and the token count

    def add_unpaired(self, pruned: Tensor) -> None:
        """A batch whose dense inputs do not pair up with `pruned` (a routed layer): the layer falls
        back to the plain fit on its own inputs, its Hessian the one it would have had anyway."""
        if self.paired:
            self.paired = False
            self.release_cross()
        self.add(pruned)

    @property
    def cross(self) -> Tensor:
        """The accumulated [K, K] C = (2/N) sum x~ x^T (rows: pruned-model features)."""
        return self._cross

    def release_cross(self) -> None:
        """Free C once every layer of the group has its corrected target."""
        self._cross = torch.empty(0, device=self.device)


Accumulator = HessianAccumulator | InputNormAccumulator

# The accumulator of each statistic a method may name (pruning.methods.Statistic, "none" aside).
ACCUMULATORS: dict[str, type[Accumulator]] = {"hessian": HessianAccumulator, "norms": InputNormAccumulator}
