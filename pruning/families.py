"""What the engine needs to know about model families, as data (docs/architectures.md points here).

Most knowledge comes from transformers itself: the decoder is `model.get_decoder()`, its block
count the text config's, checkpoint names go through transformers' conversion mapping, and fused
MoE experts describe their own layout (`use_experts_implementation` sets `is_transposed`,
`has_gate`, `has_bias` on them). What transformers does not say is listed here.
"""

from __future__ import annotations

from dataclasses import dataclass

# Linear layers stored [in, out] (GPT-2's Conv1D): pruned as their transpose, so masks and N:M
# groups run along the input dimension like any other layer's.
TRANSPOSED_LINEARS = frozenset({"Conv1D"})


@dataclass(frozen=True)
class ExpertsLayout:
    """Fused experts: 3-D parameters [experts, out, in] (or [experts, in, out] when transposed)."""

    up: str  # the first projection: gate and up fused, or up alone
    down: str
    transposed: bool
    has_gate: bool
    has_bias: bool


def experts_layout(module: object) -> ExpertsLayout | None:
    """The layout of a fused-experts module, as transformers' experts decorator describes it."""
    if not hasattr(module, "has_gate") or not hasattr(module, "is_transposed"):
        return EXPERTS.get(type(module).__name__)
    up = "gate_up_proj" if module.has_gate else "up_proj"
    if not hasattr(module, up) or not hasattr(module, "down_proj"):
        return None
    return ExpertsLayout(
        up, "down_proj", bool(module.is_transposed), bool(module.has_gate), bool(module.has_bias)
    )


# Fused-experts classes transformers does not describe (none needed so far).
EXPERTS: dict[str, ExpertsLayout] = {}

# Routers stay dense: a linear whose outputs are the experts' scores, next to an experts module.
ROUTER_NAMES = frozenset({"gate", "router", "router_gate", "w_gate", "switch", "gate_proj_router"})
# Scalar gates of shared experts (Qwen2-MoE): one output per token, left dense like the router.
DENSE_GATES = frozenset({"shared_expert_gate"})


@dataclass(frozen=True)
class Refusal:
    reason: str


# Model types refused before any work, with the reason the user sees. Filled from the sweep
# (bench/architectures.py): each entry is an architecture whose streamed forward is not the
# model's forward, or whose weights cannot be written back in the checkpoint's format.
REFUSED: dict[str, Refusal] = {
    "xlm": Refusal(
        "its layers are split over parallel module lists (attentions, layer_norm1, ffns, layer_norm2) "
        "that the model's forward interleaves; Shears streams one list of whole decoder blocks"
    ),
}
