from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shears.errors import InvalidRequest
from shears.pattern import Pattern
from shears.pruning.masks import (
    EXACT_BELOW,
    achieved_sparsity,
    apply_mask,
    check_pattern,
    kth_smallest,
    lowest_k_mask,
    prune_mask,
    sample_of,
    satisfies_pattern,
)

UNSTRUCTURED = Pattern()
NM_PATTERNS = [Pattern.parse(p) for p in ("2:4", "4:8", "1:4", "3:4")]


def test_check_pattern_names_layer_and_fix() -> None:
    with pytest.raises(InvalidRequest) as info:
        check_pattern((64, 250), Pattern.parse("2:4"), "model.layers.0.mlp.down_proj")
    message = str(info.value)
    assert "model.layers.0.mlp.down_proj" in message
    assert "250" in message and "M=4" in message
    assert "ignore" in message and "unstructured" in message
    assert info.value.code == "invalid_request"


def test_check_pattern_accepts_divisible_widths_and_unstructured() -> None:
    check_pattern((64, 256), Pattern.parse("2:4"), "a")
    check_pattern((64, 256), Pattern.parse("4:8"), "a")
    check_pattern((64, 250), UNSTRUCTURED, "a")
    with pytest.raises(InvalidRequest):
        check_pattern((64, 252), Pattern.parse("4:8"), "a")


@pytest.mark.parametrize("pattern", NM_PATTERNS, ids=str)
def test_nm_mask_prunes_exactly_the_lowest_of_each_group(pattern: Pattern) -> None:
    scores = torch.rand(16, 64, generator=torch.Generator().manual_seed(0))
    mask = prune_mask(scores, 0.0, pattern)
    groups = mask.reshape(16, -1, pattern.m)
    assert bool((groups.sum(-1) == pattern.m - pattern.n).all())
    score_groups = scores.reshape(16, -1, pattern.m)
    pruned_max = torch.where(groups, score_groups, -1.0).amax(-1)
    kept_min = torch.where(groups, 2.0, score_groups).amin(-1)
    assert bool((pruned_max < kept_min).all())


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_unstructured_masks_are_exact(sparsity: float) -> None:
    scores = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    per_row = prune_mask(scores, sparsity, UNSTRUCTURED, per_row=True)
    assert per_row.sum(1).tolist() == [round(sparsity * 40)] * 24
    whole = prune_mask(scores, sparsity, UNSTRUCTURED)
    assert int(whole.sum()) == round(sparsity * scores.numel())
    if 0 < sparsity < 1:
        assert scores[whole].max() < scores[~whole].min()
        row_max = torch.where(per_row, scores, -torch.inf).amax(1)
        row_min = torch.where(per_row, torch.inf, scores).amin(1)
        assert bool((row_max < row_min).all())


def test_ties_go_to_the_lower_index() -> None:
    scores = torch.ones(3, 8)
    assert prune_mask(scores, 0.25, UNSTRUCTURED, per_row=True)[:, :2].all()
    assert int(prune_mask(scores, 0.25, UNSTRUCTURED, per_row=True).sum()) == 6
    whole = prune_mask(scores, 0.25, UNSTRUCTURED)
    assert whole.reshape(-1)[:6].all() and int(whole.sum()) == 6
    nm = prune_mask(scores, 0.5, Pattern.parse("2:4"))
    assert nm.reshape(3, 2, 4)[..., :2].all() and int(nm.sum()) == 12


def test_negative_zero_ties_with_positive_zero() -> None:
    scores = torch.tensor([[0.0, -0.0, 0.0, -0.0, 1.0, 2.0, 3.0, 4.0]])
    mask = prune_mask(scores, 0.25, UNSTRUCTURED, per_row=True)
    assert mask.tolist() == [[True, True, False, False, False, False, False, False]]


def test_nan_scores_are_pruned_last() -> None:
    scores = torch.tensor([[float("nan"), 1.0, 2.0, 3.0]])
    assert prune_mask(scores, 0.75, UNSTRUCTURED, per_row=True).tolist() == [[False, True, True, True]]


def test_mask_is_deterministic() -> None:
    scores = torch.randint(0, 4, (32, 64), generator=torch.Generator().manual_seed(2)).float()
    for pattern, per_row in [(UNSTRUCTURED, False), (UNSTRUCTURED, True), (Pattern.parse("2:4"), False)]:
        first = prune_mask(scores, 0.5, pattern, per_row=per_row)
        assert torch.equal(first, prune_mask(scores.clone(), 0.5, pattern, per_row=per_row))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 6),
    m=st.sampled_from([2, 4, 8]),
    n_frac=st.floats(0.01, 0.99),
    sparsity=st.floats(0.0, 1.0),
    per_row=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_masks_exact_over_random_shapes(
    rows: int, groups: int, m: int, n_frac: float, sparsity: float, per_row: bool, seed: int
) -> None:
    n = min(m - 1, max(1, round(n_frac * m)))
    cols = groups * m
    # Few distinct values: plenty of ties.
    scores = torch.randint(0, 3, (rows, cols), generator=torch.Generator().manual_seed(seed)).float()
    nm = Pattern(n=n, m=m)
    assert bool((prune_mask(scores, 0.0, nm).reshape(rows, groups, m).sum(-1) == m - n).all())
    mask = prune_mask(scores, sparsity, UNSTRUCTURED, per_row=per_row)
    if per_row:
        assert mask.sum(1).tolist() == [round(sparsity * cols)] * rows
    else:
        assert int(mask.sum()) == round(sparsity * rows * cols)
    if mask.any() and (~mask).any() and not per_row:
        assert scores[mask].max() <= scores[~mask].min()


def test_apply_mask_leaves_no_negative_zero_and_keeps_input() -> None:
    weight = torch.tensor([[-1.0, -0.0, 2.0, -3.0], [0.5, -0.5, -0.0, 4.0]], dtype=torch.bfloat16)
    before = weight.clone()
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    out = apply_mask(weight, mask)
    assert torch.equal(weight.view(torch.int16), before.view(torch.int16))
    assert out.dtype == torch.bfloat16
    zeros = out == 0
    assert not bool(torch.signbit(out[zeros]).any())
    assert bool(zeros[mask].all())
    assert torch.equal(out[~mask & (weight != 0)], weight[~mask & (weight != 0)])


def test_achieved_sparsity_and_pattern_check() -> None:
    weight = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    assert achieved_sparsity(weight) == 0.5
    assert achieved_sparsity(torch.empty(0, 4)) == 0.0
    assert satisfies_pattern(weight, Pattern.parse("2:4"))
    assert satisfies_pattern(weight, Pattern.parse("4:8"))
    assert not satisfies_pattern(weight, Pattern.parse("1:4"))
    assert not satisfies_pattern(weight[:, :6], Pattern.parse("2:4"))
    assert satisfies_pattern(weight, UNSTRUCTURED)
    weight[0, 0] = 5.0
    assert not satisfies_pattern(weight, Pattern.parse("2:4"))
    assert not satisfies_pattern(weight, Pattern.parse("4:8"))
    lopsided = torch.tensor([[5.0, 1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 4.0]])
    assert satisfies_pattern(lopsided, Pattern.parse("4:8"))
    assert not satisfies_pattern(lopsided, Pattern.parse("2:4"))


@pytest.mark.parametrize("fraction", [1e-6, 0.3, 0.5, 0.999])
def test_kth_smallest_of_a_long_tensor_is_kthvalue(fraction: float) -> None:
    """Above EXACT_BELOW the sample-bracketed selection returns kthvalue's value, ties and infinities
    included, so a large layer's mask is the one a full selection gives."""
    generator = torch.Generator().manual_seed(5)
    values = torch.randint(0, 50_000, (EXACT_BELOW + 12_345,), generator=generator).float()  # many ties
    values[::97] = torch.inf
    k = max(1, round(fraction * values.numel()))
    assert torch.equal(kth_smallest(values, k), torch.kthvalue(values, k).values)
    mask = lowest_k_mask(values, k, dim=0)
    assert int(mask.sum()) == k
    assert float(values[mask].max()) <= float(values[~mask].min())


def test_sample_of_is_fixed_and_not_aliased_with_the_row_length() -> None:
    """A stride that divides the row length would sample one column in 11 (all of scale 1 here, the
    rest of scale 100); the uniform sample sees the columns in their proportions, every time."""
    rows, cols = 512, 5632
    scale = torch.full((cols,), 100.0)
    scale[::11] = 1.0
    flat = (torch.rand(rows, cols, generator=torch.Generator().manual_seed(6)) * scale).reshape(-1)
    assert torch.equal(sample_of(flat), sample_of(flat))
    small = float((sample_of(flat) <= 1.0).float().mean())
    assert abs(small - (1 / 11 + 10 / 11 / 100)) < 0.01
