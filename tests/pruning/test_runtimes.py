"""Runtime checks: refused unless configured, run outside the engine's process, judged on tokens and logits.

vLLM itself runs in CI's `make vllm-check` (its own venv); here a Python without vLLM stands in for a
misconfigured one, and the verdicts are checked on hand-made probe results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import get_args

import pytest
import transformers

from shears.cli import main
from shears.pruning.config import EngineOptions, EvaluationSpec, PruneRequest, RuntimeName
from shears.pruning.engine import prune
from shears.pruning.output import check_layout
from shears.pruning.runtimes import RUNTIMES, RuntimeUnavailable, compare, runtime_python
from tests.pruning.test_engine import fast_request


def _probe(tokens: list[int], steps: list[dict[int, float]]) -> dict:
    logprobs = [{str(t): lp for t, lp in step.items()} for step in steps]
    return {"loaded": True, "tokens": [tokens], "logprobs": [logprobs], "reference_logprobs": [logprobs]}


def test_every_runtime_a_request_may_name_has_an_entry() -> None:
    assert set(get_args(RuntimeName)) == set(RUNTIMES)


def test_a_relative_python_is_taken_from_here_not_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    venv_python = Path(sys.executable)  # a venv's bin/python: a symlink that must stay one
    monkeypatch.chdir(venv_python.parent)
    found = runtime_python("vllm", {"vllm": venv_python.name})
    assert found == Path.cwd() / venv_python.name and found.is_absolute()
    assert found.is_symlink() == venv_python.is_symlink()


def test_equal_tokens_and_logits_pass() -> None:
    ref = _probe([5, 7], [{5: -0.1, 7: -3.0}, {7: -0.2, 5: -2.0}])
    verdict = compare(ref, ref, 0.5)
    assert verdict["ok"] and verdict["tokens_equal"] and verdict["equal_prefix"] == 2
    assert verdict["max_logprob_diff"] == 0 and verdict["max_top1_gap"] == 0


def test_divergence_at_a_near_tie_passes_with_the_prefix_reported() -> None:
    """bf16 rounding flips a near-tie: the greedy paths part, the logits at the reference tokens agree."""
    ref = _probe([5, 7, 9], [{5: -0.1}, {7: -1.0, 8: -1.05}, {9: -0.3}])
    run = _probe([5, 8, 2], [{5: -0.12}, {8: -0.98, 7: -1.01}, {2: -0.5}])
    run["reference_logprobs"] = [[{"5": -0.12}, {"8": -0.98, "7": -1.01}, {"9": -0.35, "4": -0.3}]]
    verdict = compare(ref, run, 0.5)
    assert verdict["ok"] and not verdict["tokens_equal"] and verdict["equal_prefix"] == 1
    assert verdict["max_logprob_diff"] == pytest.approx(0.05) and verdict["max_top1_gap"] == pytest.approx(
        0.05
    )


def test_logits_out_of_tolerance_fail_even_with_equal_tokens() -> None:
    ref = _probe([5], [{5: -0.1, 6: -5.0}])
    run = _probe([5], [{5: -1.4, 6: -1.6}])
    verdict = compare(ref, run, 0.5)
    assert verdict["tokens_equal"] and not verdict["ok"] and verdict["max_logprob_diff"] == pytest.approx(1.3)


def test_a_reference_token_the_runtime_ranks_far_below_its_best_fails() -> None:
    ref = _probe([5], [{5: -0.7}])
    run = _probe([6], [{6: -0.1, 5: -0.7}])  # same logprob for 5, but 6 is far likelier here
    verdict = compare(ref, run, 0.5)
    assert (
        not verdict["ok"]
        and verdict["max_logprob_diff"] == 0
        and verdict["max_top1_gap"] == pytest.approx(0.6)
    )


def test_not_loaded_is_not_ok() -> None:
    ref = _probe([5], [{5: -0.1}])
    verdict = compare(ref, {"loaded": False, "error": "ValueError: nested weight"}, 0.5)
    assert verdict == {**verdict, "loaded": False, "ok": False, "error": "ValueError: nested weight"}


def _request(tiny_llama: Path, **fields: object) -> PruneRequest:
    return fast_request(tiny_llama, method="magnitude", evaluation=EvaluationSpec(enabled=False), **fields)


def test_unconfigured_runtime_is_refused_before_any_work(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(RuntimeUnavailable, match=r"SHEARS_VLLM_PYTHON .* --vllm-python") as raised:
        prune(_request(tiny_llama, verify_runtimes=["vllm"]), tmp_path / "out")
    assert raised.value.code == "runtime_unavailable"
    missing = EngineOptions(runtime_pythons={"vllm": str(tmp_path / "no-such-python")})
    with pytest.raises(RuntimeUnavailable, match="not an executable file"):
        prune(_request(tiny_llama, verify_runtimes=["vllm"]), tmp_path / "out", options=missing)
    assert list(tmp_path.iterdir()) == []  # no output, no partial folder
    monkeypatch.delenv("SHEARS_VLLM_PYTHON", raising=False)
    assert main(["verify-runtimes", str(tiny_llama)]) == 2
    assert "runtime_unavailable: verify_runtimes asks for vllm" in capsys.readouterr().err
    with pytest.raises(ValueError, match="twice"):
        _request(tiny_llama, verify_runtimes=["vllm", "vllm"])


def test_runtime_check_runs_out_of_process_and_reports_a_python_without_the_runtime(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """This test's Python has no vLLM: the job still succeeds, and its report says vLLM did not load."""
    events = []
    options = EngineOptions(runtime_pythons={"vllm": sys.executable})
    manifest = prune(
        _request(tiny_llama, verify_runtimes=["vllm"], formats=["dense", "packed"]),
        tmp_path / "out",
        reporter=events.append,
        options=options,
    )
    compatibility = manifest["compatibility"]
    reference = compatibility["reference"]
    assert reference["runtime"] == "transformers" and reference["version"] == transformers.__version__
    assert reference["error"] is None and reference["max_tokens"] == 16
    vllm = compatibility["runtimes"]["vllm"]
    assert vllm["loaded"] is False and vllm["ok"] is False
    assert "No module named 'vllm'" in vllm["error"]
    assert "vllm" not in sys.modules  # the engine never imports the runtime
    assert any(e.kind == "phase" and e.phase == "compatibility" for e in events)
    assert any("NOT LOADED" in e.message for e in events if e.phase == "compatibility")
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["compatibility"] == compatibility
    assert "manifest.json" in {p.name for p in (tmp_path / "out").iterdir()}
    assert prune(_request(tiny_llama), tmp_path / "plain")["compatibility"] is None


def test_layout_check_refuses_stray_weight_files(tiny_llama: Path, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    prune(_request(tiny_llama, formats=["dense", "packed"]), folder)
    check_layout(folder)
    (folder / "sparse.safetensors").write_bytes((folder / "packed" / "sparse.safetensors").read_bytes())
    with pytest.raises(RuntimeError, match=r"2 weight files .* and no model\.safetensors\.index\.json"):
        check_layout(folder)


def test_sharded_output_has_an_index_naming_exactly_its_weight_files(
    tiny_llama: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "out"
    options = EngineOptions(max_shard_bytes=64 << 10)
    manifest = prune(_request(tiny_llama, formats=["dense", "packed"]), folder, options=options)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and manifest["weights"]["dense"] == [*shards, "model.safetensors.index.json"]
    check_layout(folder)
    transformers.AutoModelForCausalLM.from_pretrained(folder)
    (folder / "extra.safetensors").write_bytes((folder / shards[0]).read_bytes())
    with pytest.raises(RuntimeError, match="lists"):
        check_layout(folder)


def test_eos_held_back_by_both_runtimes_is_not_a_better_token() -> None:
    ref = _probe([5], [{5: -1.0, 2: -0.2}])
    ref["eos_token_ids"] = [2]
    verdict = compare(ref, _probe([5], [{5: -1.0, 2: -0.2}]), 0.5)
    assert verdict["ok"] and verdict["max_top1_gap"] == 0
