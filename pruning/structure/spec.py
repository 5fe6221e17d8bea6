"""The request's `structure` block (torch-free: the API process builds its schema from it)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from shears.schema import Strict

Fraction = Annotated[float, Field(ge=0, lt=1)]
ChannelScore = Literal["obs", "wanda-sp", "flap", "magnitude"]


class StructureSpec(Strict):
    """Structured pruning: whole units removed, leaving a smaller dense model with a standard config.

    Fractions are of the units removed: decoder blocks (layers), MLP intermediate channels in each
    block (mlp), key-value head groups with their query heads in each block (heads), routed experts
    in each MoE block (experts). The same count is removed in every block.
    """

    layers: Fraction = 0.0
    mlp: Fraction = 0.0
    heads: Fraction = 0.0
    experts: Fraction = 0.0
    reconstruct: bool = Field(
        True,
        description="least-squares re-fit of down_proj / o_proj on the kept channels / heads "
        "(W' = W H[:, K] H[K, K]^-1, damped), with bias compensation where the layer has a bias",
    )
    channel_score: ChannelScore = Field(
        "obs",
        description="importance of channels and head groups: 'obs' (second-order: the output error "
        "of removing them with the re-fit, greedy), 'wanda-sp' (||W_col|| ||X_col||), 'flap' "
        "(fluctuation Var(X_col) ||W_col||^2), 'magnitude' (weight norms only, a baseline)",
    )
    granule: Annotated[int, Field(ge=1, le=4096)] = Field(
        64, description="MLP widths stay multiples of this many channels"
    )
    contiguous: bool = Field(
        False, description="layers: remove one contiguous run of blocks (least angular distance across it)"
    )
    layer_refit: bool = Field(
        False,
        description="layers: re-fit the last residual-writing layer (down_proj) before each removed run "
        "so the block's output also carries what the run added to the residual stream",
    )
    damp: Annotated[float, Field(gt=0, lt=1)] = Field(0.01, description="re-fit damping, x mean(diag H)")
    speed: bool = Field(
        True, description="measure prefill and decode tokens/s of the dense and the pruned model"
    )
