"""Smoke test of the Shears-vs-llm-compressor harness (bench/peers) on a tiny model.

Runs the real Shears side (a `shears prune` child process), the shared perplexity function, the row /
ratio / JSON / markdown / chart code on the numbers it produced. The peer side runs only when the
peer venv (bench/.venv-peers, made by `make bench-peers`) exists; CI has none and checks the
"no peer" path instead.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench.peers import report
from bench.peers.measure import folder_sparsity, pruned_weight_names, run_child
from bench.peers.run import DEFAULT_PEER_PYTHON, BenchConfig, run_benchmark
from bench.peers.tools import ToolResult
from shears.pattern import Pattern
from shears.pruning.checkpoint import Checkpoint
from shears.pruning.masks import satisfies_pattern

PEER = DEFAULT_PEER_PYTHON if DEFAULT_PEER_PYTHON.is_file() else None


@pytest.fixture(scope="module")
def bench_data(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("bench-peers")
    config = BenchConfig(
        model=str(tiny_llama),
        methods=["sparsegpt"],
        patterns=["2:4"],
        samples=4,
        seqlen=32,
        eval_seqlen=32,
        eval_tokens=256,
        peer_python=PEER,
        vllm_python=None,  # vLLM has its own CI step (make vllm-check)
        work_dir=root / "work",
        results_dir=root / "results",
        tag="smoke",
        keep_outputs=True,
        scaling_widths=[64],
        scaling_layers=1,
        scaling_samples=2,
    )
    return run_benchmark(config), root


def test_run_child_measures_the_tool_not_the_harness(tmp_path: Path) -> None:
    # The test process holds torch (hundreds of MiB); a bare interpreter must not inherit that.
    bare = run_child([sys.executable, "-S", "-c", "pass"], tmp_path / "bare.log")
    assert bare.returncode == 0
    assert bare.peak_rss_mb < 64
    big = run_child(
        [sys.executable, "-S", "-c", "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096])"],
        tmp_path / "big.log",
    )
    assert 200 <= big.peak_rss_mb < 264
    failed = run_child(
        [sys.executable, "-S", "-c", "import sys; print('boom'); sys.exit(7)"], tmp_path / "f.log"
    )
    assert failed.returncode == 7 and "boom" in failed.output()


def test_shears_side_and_shared_evaluation(bench_data: tuple[dict, Path]) -> None:
    data, _ = bench_data
    assert data["evaluation"]["function"] == "shears.pruning.evaluate.perplexity_of_folder"
    windows = data["evaluation"]["windows"]
    assert 1 <= windows <= 256 // 32 and data["evaluation"]["tokens"] == windows * 31
    assert math.isfinite(data["dense"]["ppl"]) and data["dense"]["ppl"] > 1
    assert data["calibration"]["samples"] == 4 and data["calibration"]["seqlen"] == 32
    [row] = data["rows"]
    ours = row["shears"]
    assert (row["method"], row["pattern"], ours["status"]) == ("sparsegpt", "2:4", "ok"), ours["note"]
    assert ours["sparsity"] == 0.5
    assert ours["prune_s"] > 0 and ours["wall_s"] > ours["prune_s"]
    assert 100 < ours["peak_rss_mb"] < 4096
    assert math.isfinite(ours["ppl"]) and ours["ppl"] > 1 and ours["ppl"] != data["dense"]["ppl"]
    # The folder on disk holds what the row says: 2:4 in every decoder-block Linear, lm_head dense.
    out = Path(ours["out"])
    names = pruned_weight_names(out)
    assert names and not any("lm_head" in n or "embed" in n for n in names)
    assert folder_sparsity(out, names) == ours["sparsity"]
    weights = Checkpoint(out).load(names)
    assert all(satisfies_pattern(w, Pattern.parse("2:4")) for w in weights.values())
    # SparseGPT rows also carry the paper's algorithm (no re-fit of the kept weights), run the same way.
    plain = row["shears_plain"]
    assert plain["status"] == "ok" and plain["sparsity"] == 0.5 and math.isfinite(plain["ppl"])
    assert plain["details"]["argv"][-4:-2] == ["--refine-iterations", "0"]
    assert "--refine-iterations" not in ours["details"]["argv"]
    assert ours["details"]["compatibility"] == {"vllm": {"checked": False, "note": "no vLLM venv at None"}}


def test_peer_side_or_its_absence(bench_data: tuple[dict, Path]) -> None:
    data, _ = bench_data
    [row] = data["rows"]
    peer = row["peer"]
    if PEER is None:
        assert peer["status"] == "not_offered" and "peer venv missing" in peer["note"]
        assert row["ppl_ratio"] is None and row["time_ratio"] is None and row["rss_ratio"] is None
        assert row["targets"] == {"ppl": None, "time": None, "rss": None}
        return
    assert peer["status"] == "ok", peer["note"]
    assert peer["sparsity"] == 0.5
    assert row["ppl_ratio"] == round(row["shears"]["ppl"] / peer["ppl"], 4)
    assert row["time_ratio"] == round(row["shears"]["prune_s"] / peer["prune_s"], 4)
    assert data["tools"]["llm-compressor"]["version"].startswith("0.14")


def test_rows_ratios_and_targets_from_real_numbers(bench_data: tuple[dict, Path]) -> None:
    data, _ = bench_data
    ours = ToolResult(**data["rows"][0]["shears"])
    # A peer that took twice as long, used 1.5x the memory and reached 1% higher perplexity.
    slower = replace(
        ours,
        tool="llm-compressor",
        prune_s=ours.prune_s * 2,
        peak_rss_mb=ours.peak_rss_mb * 1.5,
        ppl=ours.ppl * 1.01,
        wall_s=ours.wall_s * 3,
    )
    row = report.make_row("sparsegpt", "2:4", ours, slower)
    assert row["time_ratio"] == 0.5 and row["wall_ratio"] == round(1 / 3, 4)
    assert row["rss_ratio"] == round(1 / 1.5, 4) and row["ppl_ratio"] == round(1 / 1.01, 4)
    assert row["targets"] == {"ppl": True, "time": True, "rss": False}
    # Magnitude has no time target; a peer that does not offer the pattern has no ratios.
    absent = ToolResult(tool="llm-compressor", status="not_offered", note="no N:M magnitude")
    magnitude = report.make_row("magnitude", "2:4", ours, absent)
    assert magnitude["targets"] == {"ppl": None, "time": None, "rss": None}
    assert report.summary([row, magnitude]) == {
        "ppl": {"met": 1, "of": 1, "all_met": True},
        "time": {"met": 1, "of": 1, "all_met": True},
        "rss": {"met": 0, "of": 1, "all_met": False},
    }
    text = report.markdown({**data, "rows": [row, magnitude], "summary": report.summary([row, magnitude])})
    assert f"| sparsegpt | 2:4 | {ours.ppl:.3f} | {ours.ppl * 1.01:.3f} | {1 / 1.01:.4f} |" in text
    assert "| magnitude | 2:4 |" in text and "| n/a |" in text


def test_result_files(bench_data: tuple[dict, Path]) -> None:
    data, root = bench_data
    results = root / "results"
    on_disk = json.loads((results / "peers-smoke.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(data["rows"]))
    for key in ("machine", "tools", "measures", "calibration", "evaluation", "dense", "summary"):
        assert key in on_disk
    assert "prune" in on_disk["rows"][0]["shears"]["details"]["argv"]
    markdown = (results / "peers-smoke.md").read_text()
    assert "| sparsegpt | 2:4 |" in markdown and "Time and memory vs width" in markdown
    for png in ("peers-smoke.png", "peers-smoke-scaling.png"):
        assert (results / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [point] = on_disk["scaling"]["points"]
    assert point["hidden"] == 64 and point["shears"]["status"] == "ok" and point["shears"]["sparsity"] > 0.49
