"""The pure maths of structured pruning: unit scores, the consumer re-fit, layer distances."""

from __future__ import annotations

import pytest
import torch

from shears.pruning.structure import solvers


def _inputs(tokens: int = 512, columns: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=g) * 0.3 + torch.eye(columns)
    return torch.randn(tokens, columns, generator=g) @ mixing + 0.5


def test_refit_is_the_least_squares_solution_and_beats_dropping_columns() -> None:
    x = _inputs()
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    second = x.T @ x / len(x)
    keep = torch.tensor([0, 2, 3, 5, 8, 9, 12, 15])
    fitted, bias = solvers.refit_consumer(w, second, keep, damp=1e-8)
    assert bias is None
    expected = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    torch.testing.assert_close(fitted, expected, rtol=1e-3, atol=1e-3)
    dropped = solvers.output_error(w, second, w[:, keep], keep)
    refit = solvers.output_error(w, second, fitted, keep)
    assert refit < 0.7 * dropped
    assert solvers.output_error(w, second, w, torch.arange(16)) == pytest.approx(0.0, abs=1e-7)


def test_refit_with_a_bias_absorbs_the_mean_of_what_was_removed() -> None:
    x = _inputs()
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    second, mean = x.T @ x / len(x), x.mean(0)
    keep = torch.arange(0, 16, 2)
    fitted, new_bias = solvers.refit_consumer(w, second, keep, damp=1e-8, bias=b, mean=mean)
    ones = torch.ones(len(x), 1)
    expected = torch.linalg.lstsq(torch.cat([x[:, keep], ones], 1), x @ w.T + b).solution.T
    torch.testing.assert_close(fitted, expected[:, :-1], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(new_bias, expected[:, -1], rtol=1e-3, atol=1e-3)
    compensated = solvers.compensate_bias(w, b, mean, torch.arange(1, 16, 2))
    errors = [
        solvers.output_error(w, second, w[:, keep], keep, bias=b, new_bias=nb, mean=mean)
        for nb in (b, compensated)
    ]
    assert errors[1] < errors[0]  # FLAP's compensation helps without a re-fit
    with pytest.raises(ValueError, match="mean"):
        solvers.refit_consumer(w, second, keep, damp=0.01, bias=b)


def test_scores_rank_an_idle_or_weightless_unit_last() -> None:
    x = _inputs(columns=8)
    x[:, 3] = 0.0  # never fires
    second, mean = x.T @ x / len(x), x.mean(0)
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    w[:, 5] = 0.0  # reads its input but writes nothing
    for scores in (
        solvers.wanda_sp_scores(w, second, 1),
        solvers.flap_scores(w, second, mean, 1),
        solvers.obs_scores(w, second, 1, damp=0.01),
    ):
        assert set(scores.argsort()[:2].tolist()) == {3, 5}
    kept = solvers.obs_select(w, second, 1, keep=6, damp=0.01)
    assert kept.tolist() == [0, 1, 2, 4, 6, 7]


def test_obs_selection_of_groups_matches_exhaustive_search_on_a_small_case() -> None:
    """Removing one of four 2-column groups greedily is the exact optimum (one step, exact errors)."""
    x = _inputs(columns=8, seed=4)
    second = x.T @ x / len(x)
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(5))
    kept = solvers.obs_select(w, second, 2, keep=3, damp=1e-6)
    errors = {}
    for removed in range(4):
        keep_units = torch.tensor([u for u in range(4) if u != removed])
        cols = solvers.columns_of(keep_units, 2)
        fitted, _ = solvers.refit_consumer(w, second, cols, damp=1e-6)
        errors[removed] = solvers.output_error(w, second, fitted, cols)
    best = min(errors, key=errors.get)
    assert best not in kept.tolist() and len(kept) == 3


def test_layer_distances_and_choices() -> None:
    h = torch.randn(2, 5, 16)
    total, count = solvers.cosine_sum(h, h * 3)
    assert count == 10 and total == pytest.approx(10.0, abs=1e-4)
    assert solvers.angular_distance(h, -h) == pytest.approx(1.0, abs=1e-3)
    assert solvers.least_influential([0.3, 0.1, 0.2, 0.1], 2) == [1, 3]
    assert solvers.closest_run([0.5, 0.2, 0.3, 0.2]) == 3
    assert solvers.top_units(torch.tensor([1.0, 3.0, 3.0, 0.5]), 2).tolist() == [1, 2]
