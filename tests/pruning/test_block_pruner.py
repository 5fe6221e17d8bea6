"""The block pruner's memory contract: while a block's matrices are solved, the block holds no second copy
of them (the solvers work on the storage-precision masters); after, the block computes with the solved
values. That the pruned block computes exactly what the saved folder does is test_equivalence's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shears.pruning.block_pruner import _block_tensor, _solving
from shears.pruning.prunable import find_prunables


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_the_block_holds_no_copy_while_solving_and_computes_with_the_solved_masters(
    compute: torch.dtype,
) -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).to(compute)
    layers = list(find_prunables(block, "").values())
    assert len(layers) == 2
    masters = {layer.param: _block_tensor(layer).detach().float().clone() for layer in layers}
    biases = [block[0].bias.detach().clone(), block[2].bias.detach().clone()]
    with _solving(layers, masters):
        assert all(_block_tensor(layer).numel() == 0 for layer in layers)
        for master in masters.values():  # what a solve does: prune the master in place
            master[:, ::2] = 0.0
    for layer in layers:
        param = _block_tensor(layer)
        assert param.dtype == compute and torch.equal(param, masters[layer.param].to(compute))
        # fp32: the parameter is the master itself, not a second fp32 copy
        assert (param.data_ptr() == masters[layer.param].data_ptr()) == (compute == torch.float32)
    assert torch.equal(block[0].bias, biases[0]) and torch.equal(block[2].bias, biases[1])
    x = torch.randn(3, 8, dtype=compute)
    expected = nn.functional.linear(
        torch.relu(nn.functional.linear(x, masters[layers[0].param].to(compute), biases[0])),
        masters[layers[1].param].to(compute),
        biases[1],
    )
    assert torch.equal(block(x), expected)


def test_a_failed_solve_still_leaves_the_block_whole() -> None:
    block = nn.Sequential(nn.Linear(4, 4))
    layers = list(find_prunables(block, "").values())
    masters = {layers[0].param: _block_tensor(layers[0]).detach().clone()}
    with pytest.raises(RuntimeError), _solving(layers, masters):
        raise RuntimeError("the solver failed")
    assert torch.equal(block[0].weight, masters[layers[0].param])
