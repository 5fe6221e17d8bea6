"""bench/gpu_prune.py runs its whole path (random model, random tokens, engine) on a toy shape."""

from __future__ import annotations

import json

import pytest

from bench.gpu_prune import main


def test_gpu_prune_tiny_runs_end_to_end(capsys: pytest.CaptureFixture) -> None:
    assert main(["--tiny", "--method", "wanda"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert set(result["phases_s"]) >= {"loading", "calibrating", "pruning", "saving", "verifying"}
