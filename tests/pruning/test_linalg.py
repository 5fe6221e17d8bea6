"""The in-place blocked inverse against LAPACK's (torch.cholesky_inverse), at sizes around the panel."""

from __future__ import annotations

import pytest
import torch

from shears.pruning.linalg import cholesky_inverse_, gram_of_lower_, invert_lower_


def spd(size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * size + 3, size, generator=g)
    x[:, 0] *= 100.0  # an outlier feature, as LLM activations have
    return x.T @ x / x.shape[0] + 1e-3 * torch.eye(size)


@pytest.mark.parametrize(("size", "block"), [(1, 4), (7, 4), (8, 4), (9, 4), (130, 32), (300, 512)])
def test_in_place_inverse_matches_lapack(size: int, block: int) -> None:
    matrix = spd(size, seed=size)
    lower = torch.linalg.cholesky(matrix)
    expected = torch.cholesky_inverse(lower)
    buffer = lower.clone()
    pointer = buffer.data_ptr()
    result = cholesky_inverse_(buffer, block)
    assert result.data_ptr() == pointer  # in place: no second K x K buffer
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert torch.equal(result, result.T)  # exactly symmetric: the mirror is a copy
    identity = torch.eye(size)
    torch.testing.assert_close(matrix @ result, identity, rtol=0, atol=1e-3)


def test_the_two_halves() -> None:
    lower = torch.linalg.cholesky(spd(70, seed=1))
    inverse = invert_lower_(lower.clone(), 16)
    torch.testing.assert_close(inverse, torch.linalg.inv(lower), rtol=1e-4, atol=1e-5)
    assert bool((inverse.triu(1) == 0).all())  # the upper triangle stays zero
    gram = gram_of_lower_(lower.clone(), 16)
    torch.testing.assert_close(gram, lower.T @ lower, rtol=1e-5, atol=1e-5)


def test_mirror_lower() -> None:
    from shears.pruning.linalg import mirror_lower_

    matrix = torch.randn(37, 37, generator=torch.Generator().manual_seed(2))
    lower = matrix.tril()
    out = mirror_lower_(matrix, 8)
    assert torch.equal(out.tril(), lower) and torch.equal(out, out.T)
