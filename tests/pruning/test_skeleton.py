"""The weightless model skeleton: outside weights loaded once, released when no phase needs them."""

from __future__ import annotations

from pathlib import Path

import torch

from shears.pruning.skeleton import build_skeleton
from tests.tiny import make_tiny_model


def test_release_outside_drops_tied_head_and_embeddings(tmp_path: Path) -> None:
    make_tiny_model("llama", tmp_path, tie_word_embeddings=True)
    skeleton = build_skeleton(tmp_path, device=torch.device("cpu"), dtype=torch.float32)
    model = skeleton.model
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.lm_head.weight.is_meta

    skeleton.release_outside()

    outside = [
        (name, p)
        for name, p in model.named_parameters(remove_duplicate=False)
        if not name.startswith(skeleton.blocks_prefix + ".")
    ]
    expected = {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"}
    assert {name for name, _ in outside} >= expected
    assert all(p.is_meta for _, p in outside), [name for name, p in outside if not p.is_meta]
    block = skeleton.materialize_block(1)  # blocks still load from the checkpoint
    assert not any(p.is_meta for p in block.parameters())
