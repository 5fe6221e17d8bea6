from __future__ import annotations

import pytest
import torch

from shears.pruning.stats import HessianAccumulator, InputNormAccumulator, ieee_fp32_matmul

K = 48


def batches() -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(0)
    out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for batch, seq in [(2, 7), (3, 5), (1, 11)]:
        x = torch.randn(batch, seq, K, generator=gen) * 3
        x[..., 5] *= 40  # an outlier feature
        mask = torch.rand(batch, seq, generator=gen) > 0.3
        out.append((x, mask))
    out.append((torch.randn(4, K, generator=gen), None))  # already flat, no padding
    return out


def real_tokens() -> torch.Tensor:
    return torch.cat([x[mask] if mask is not None else x for x, mask in batches()]).double()


def test_hessian_is_two_over_n_xtx_without_padding() -> None:
    acc = HessianAccumulator(K, "cpu")
    for x, mask in batches():
        acc.add(x, mask)
    tokens = real_tokens()
    expected = 2.0 / tokens.shape[0] * tokens.T @ tokens
    assert acc.tokens == tokens.shape[0]
    assert acc.hessian.dtype == torch.float32
    torch.testing.assert_close(acc.hessian.double(), expected, rtol=1e-5, atol=1e-3)
    # With the padding included the statistic would differ: the mask really excludes tokens.
    everything = torch.cat([x.reshape(-1, K) for x, _ in batches()]).double()
    assert not torch.allclose(acc.hessian.double(), 2.0 / everything.shape[0] * everything.T @ everything)


def test_input_norm_is_sum_of_squares_without_padding() -> None:
    acc = InputNormAccumulator(K, "cpu")
    for x, mask in batches():
        acc.add(x, mask)
    tokens = real_tokens()
    assert acc.tokens == tokens.shape[0]
    assert acc.sq_norm.dtype == torch.float32
    torch.testing.assert_close(acc.sq_norm.double(), (tokens**2).sum(0), rtol=1e-5, atol=1e-3)


def test_bf16_inputs_are_accumulated_in_fp32() -> None:
    x = torch.randn(3, 9, K, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    hess, norm = HessianAccumulator(K, "cpu"), InputNormAccumulator(K, "cpu")
    hess.add(x)
    norm.add(x)
    flat = x.reshape(-1, K).double()
    torch.testing.assert_close(hess.hessian.double(), 2.0 / 27 * flat.T @ flat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.sq_norm.double(), (flat**2).sum(0), rtol=1e-5, atol=1e-5)


def test_all_padding_batch_changes_nothing() -> None:
    acc = HessianAccumulator(K, "cpu")
    x = torch.randn(2, 4, K)
    acc.add(x, torch.zeros(2, 4, dtype=torch.bool))
    assert acc.tokens == 0 and not bool(acc.hessian.any())
    acc.add(x, torch.ones(2, 4, dtype=torch.bool))
    flat = x.reshape(-1, K).double()
    torch.testing.assert_close(acc.hessian.double(), 2.0 / 8 * flat.T @ flat, rtol=1e-5, atol=1e-5)


def test_input_is_not_modified() -> None:
    x = torch.randn(2, 4, K)
    before = x.clone()
    HessianAccumulator(K, "cpu").add(x)
    InputNormAccumulator(K, "cpu").add(x)
    assert torch.equal(x, before)


def test_shape_mismatches_are_refused() -> None:
    acc = HessianAccumulator(K, "cpu")
    with pytest.raises(ValueError, match="features"):
        acc.add(torch.randn(2, K + 1))
    with pytest.raises(ValueError, match="token_mask"):
        acc.add(torch.randn(2, 3, K), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="features"):
        InputNormAccumulator(K, "cpu").add(torch.randn(2, K - 1))


def test_tf32_setting_is_restored() -> None:
    matmul = torch.backends.cuda.matmul
    original = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with ieee_fp32_matmul():
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
        HessianAccumulator(K, "cpu").add(torch.randn(4, K))
        assert matmul.fp32_precision == "tf32"
        with pytest.raises(KeyError), ieee_fp32_matmul():
            raise KeyError("restored on errors too")
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = original


def test_hessian_over_panels_is_the_full_product_and_exactly_symmetric() -> None:
    """The lower-triangle panel updates (PANEL columns) give x^T x across panel edges, every batch."""
    from shears.pruning.stats import PANEL

    columns = PANEL + 37  # a partial last panel
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, columns, generator=g, dtype=torch.float64).float() for n in (50, 7, 120)]
    acc = HessianAccumulator(columns, "cpu")
    for i, x in enumerate(batches):
        acc.add(x)
        if i == 0:
            first = acc.hessian.clone()  # read between batches: the mirror, then more lower updates
    every = torch.cat(batches).double()
    expected = (2.0 / every.shape[0]) * every.T @ every
    torch.testing.assert_close(acc.hessian.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(acc.hessian, acc.hessian.T)
    x0 = batches[0].double()
    torch.testing.assert_close(first.double(), (2.0 / 50) * x0.T @ x0, rtol=1e-5, atol=1e-5)


def test_bf16_products_round_only_each_batch_sum() -> None:
    gen = torch.Generator().manual_seed(2)
    xs = [(torch.randn(64, K, generator=gen) * 3).to(torch.bfloat16) for _ in range(4)]
    fast, exact = HessianAccumulator(K, "cpu", bf16_products=True), HessianAccumulator(K, "cpu")
    for x in xs:
        fast.add(x)
        exact.add(x)
    flat = torch.cat(xs).double()
    expected = 2.0 / flat.shape[0] * flat.T @ flat
    torch.testing.assert_close(exact.hessian.double(), expected, rtol=1e-5, atol=1e-5)
    # bf16 products: within bf16's rounding of each batch's sum, and really taken in bf16.
    torch.testing.assert_close(
        fast.hessian.double(), expected, rtol=8e-3, atol=8e-3 * float(expected.abs().max())
    )
    assert not torch.equal(fast.hessian, exact.hessian)
    assert torch.equal(fast.hessian, fast.hessian.T)
    # fp32 inputs are always multiplied in fp32.
    fp32 = HessianAccumulator(K, "cpu", bf16_products=True)
    for x in xs:
        fp32.add(x.float())
    assert torch.equal(fp32.hessian, exact.hessian)
