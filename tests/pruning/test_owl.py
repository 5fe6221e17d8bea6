from __future__ import annotations

import pytest
import torch

from shears.pruning.owl import outlier_ratio, owl_sparsities


def test_mean_is_target_and_more_outliers_means_less_sparsity() -> None:
    ratios = [0.5, 3.0, 1.2, 0.1, 2.2, 0.9]
    sparsities = owl_sparsities(ratios, target=0.7, lam=0.08)
    assert sum(sparsities) / len(sparsities) == pytest.approx(0.7, abs=1e-12)
    order_by_ratio = sorted(range(len(ratios)), key=lambda i: ratios[i])
    assert [sparsities[i] for i in order_by_ratio] == sorted(sparsities, reverse=True)
    # Min-max normalised into a spread of 2 * lam, as in the OWL code.
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)
    assert all(0 < s < 1 for s in sparsities)


def test_equal_ratios_or_no_lambda_give_uniform_sparsity() -> None:
    assert owl_sparsities([1.5, 1.5, 1.5], target=0.6, lam=0.08) == [0.6, 0.6, 0.6]
    assert owl_sparsities([1.0, 2.0], target=0.6, lam=0.0) == [0.6, 0.6]
    assert owl_sparsities([], target=0.6, lam=0.08) == []


@pytest.mark.parametrize("target", [0.02, 0.97])
def test_extreme_targets_stay_inside_zero_one_with_the_same_mean(target: float) -> None:
    ratios = [0.0, 0.0, 0.0, 10.0] if target < 0.5 else [0.0, 10.0, 10.0, 10.0]
    sparsities = owl_sparsities(ratios, target=target, lam=0.4)
    assert all(0 < s < 1 for s in sparsities)
    assert sum(sparsities) / 4 == pytest.approx(target, abs=1e-12)
    assert sparsities[0] > sparsities[-1] if target < 0.5 else sparsities[0] > sparsities[1]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        owl_sparsities([1.0, 2.0], target=1.0, lam=0.08)
    with pytest.raises(ValueError):
        owl_sparsities([1.0, float("nan")], target=0.5, lam=0.08)
    with pytest.raises(ValueError):
        outlier_ratio([], 5.0)


def test_outlier_ratio_uses_the_block_mean_of_wanda_scores() -> None:
    gen = torch.Generator().manual_seed(0)
    layers = []
    for rows, cols, scale in [(16, 32, 1.0), (8, 32, 10.0), (24, 16, 0.1)]:
        weight = torch.randn(rows, cols, generator=gen) * scale
        sq_norm = torch.rand(cols, generator=gen) * 4
        sq_norm[3] = 900.0  # an outlier input feature
        layers.append((weight, sq_norm))
    scores = torch.cat([(w.abs() * n.sqrt()).flatten() for w, n in layers]).double()
    for threshold in (2.0, 5.0):
        expected = float((scores > threshold * scores.mean()).double().mean())
        assert outlier_ratio(iter(layers), threshold) == pytest.approx(expected)
    assert 0 < outlier_ratio(layers, 5.0) < outlier_ratio(layers, 2.0)
