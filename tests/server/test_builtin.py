"""The built-in model through the whole product: `shears demo` (server, job, events, download with
checksums, sparsity checked in transformers, report)."""

from __future__ import annotations

import pytest

from shears.client.demo import run_demo


@pytest.mark.slow
def test_demo_prunes_the_builtin_model(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_demo(model="smollm2-135m", samples=8, seqlen=128, eval_tokens=512)
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    report = out.out
    assert "succeeded" in report and "pattern 2:4" in report
    assert "perplexity on" in report and "dense" in report
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert f"  {kind}" in report
    assert "0.500 / 0.500 / 0.500  (30 layers)" in report  # 2:4 holds in every one of the 30 blocks
    assert "sha256 verified" in report
