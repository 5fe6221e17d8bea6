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
from bench.peers.run import DEFAULT_PEER_PYTHON, VARIANTS, BenchConfig, run_benchmark
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
        variants=["paper"],  # one variant is enough to check how they run; each costs a job
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
        scaling_runs=["sparsegpt:unstructured", "sparsegpt:unstructured:paper"],
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
    assert data["domains"] == ["shakespeare", "gsm8k"]
    for domain in data["domains"]:
        evaluation, calibration = data["evaluation"][domain], data["calibration"][domain]
        assert evaluation["function"] == "shears.pruning.evaluate.perplexity_of_folder"
        assert 1 <= evaluation["windows"] <= 256 // 32 and evaluation["tokens"] == evaluation["windows"] * 31
        assert math.isfinite(data["dense"][domain]["ppl"]) and data["dense"][domain]["ppl"] > 1
        assert calibration["samples"] == 4 and calibration["seqlen"] == 32
        assert domain in calibration["source"].lower() or "held" in evaluation["source"]
    # Different text, different ids: the two calibrations really are two domains.
    assert data["calibration"]["shakespeare"]["sha256"] != data["calibration"]["gsm8k"]["sha256"]
    assert data["dense"]["shakespeare"]["ppl"] != data["dense"]["gsm8k"]["ppl"]
    assert [row["calibration"] for row in data["rows"]] == ["shakespeare", "gsm8k"]
    for row in data["rows"]:
        ours = row["shears"]
        assert (row["method"], row["pattern"], ours["status"]) == ("sparsegpt", "2:4", "ok"), ours["note"]
        assert ours["sparsity"] == 0.5
        assert ours["prune_s"] > 0 and ours["wall_s"] > ours["prune_s"]
        assert 100 < ours["peak_rss_mb"] < 4096
        assert set(ours["ppl"]) == {"shakespeare", "gsm8k"}
        for domain, ppl in ours["ppl"].items():
            assert math.isfinite(ppl) and ppl > 1 and ppl != data["dense"][domain]["ppl"]
        # The folder on disk holds what the row says: 2:4 in every decoder-block Linear, lm_head dense.
        out = Path(ours["out"])
        names = pruned_weight_names(out)
        assert names and not any("lm_head" in n or "embed" in n for n in names)
        assert folder_sparsity(out, names) == ours["sparsity"]
        weights = Checkpoint(out).load(names)
        assert all(satisfies_pattern(w, Pattern.parse("2:4")) for w in weights.values())
        # SparseGPT rows also carry the paper's algorithm, run the same way with its flags.
        paper = row["variants"]["paper"]["result"]
        assert paper["status"] == "ok" and paper["sparsity"] == 0.5
        assert set(paper["ppl"]) == {"shakespeare", "gsm8k"}
        flags = list(VARIANTS["sparsegpt"]["paper"])
        assert paper["details"]["argv"][-2 - len(flags) : -2] == flags
        assert flags[0] not in ours["details"]["argv"]
        unchecked = {"vllm": {"checked": False, "note": "no vLLM venv at None"}}
        assert ours["details"]["compatibility"] == unchecked
    # Same job, other calibration: the pruned weights differ.
    first, second = (Checkpoint(Path(row["shears"]["out"])) for row in data["rows"])
    name = pruned_weight_names(Path(data["rows"][0]["shears"]["out"]))[0]
    assert not first.load([name])[name].equal(second.load([name])[name])


def test_peer_side_or_its_absence(bench_data: tuple[dict, Path]) -> None:
    data, _ = bench_data
    for row in data["rows"]:
        peer = row["peer"]
        if PEER is None:
            assert peer["status"] == "not_offered" and "peer venv missing" in peer["note"]
            assert row["ppl_ratio"] == {"shakespeare": None, "gsm8k": None}
            assert (
                row["other_domain_ratio"] is None and row["time_ratio"] is None and row["rss_ratio"] is None
            )
            assert row["targets"] == {"ppl": None, "time": None, "rss": None}
            continue
        assert peer["status"] == "ok", peer["note"]
        assert peer["sparsity"] == 0.5
        other = "gsm8k" if row["calibration"] == "shakespeare" else "shakespeare"
        assert row["other_domain_ratio"] == round(row["shears"]["ppl"][other] / peer["ppl"][other], 4)
        assert row["time_ratio"] == round(row["shears"]["prune_s"] / peer["prune_s"], 4)
    if PEER is not None:
        assert data["tools"]["llm-compressor"]["version"].startswith("0.14")


def test_rows_ratios_and_targets_from_real_numbers(bench_data: tuple[dict, Path]) -> None:
    data, _ = bench_data
    ours = ToolResult(**data["rows"][0]["shears"])
    # A peer that took twice as long, used 1.5x the memory, reached 1% higher perplexity on
    # Shakespeare (the calibration domain here) and 10% higher on GSM8K.
    slower = replace(
        ours,
        tool="llm-compressor",
        prune_s=ours.prune_s * 2,
        peak_rss_mb=ours.peak_rss_mb * 1.5,
        ppl={"shakespeare": ours.ppl["shakespeare"] * 1.01, "gsm8k": ours.ppl["gsm8k"] * 1.1},
        wall_s=ours.wall_s * 3,
    )
    row = report.make_row("shakespeare", "sparsegpt", "2:4", ours, slower)
    assert row["time_ratio"] == 0.5 and row["wall_ratio"] == round(1 / 3, 4)
    assert row["rss_ratio"] == round(1 / 1.5, 4)
    assert row["same_domain_ratio"] == round(1 / 1.01, 4) and row["other_domain_ratio"] == round(1 / 1.1, 4)
    # 2:4 SparseGPT must reach 0.85x on the other domain: 0.909x misses it.
    assert row["targets"] == {"ppl": False, "time": True, "rss": False}
    wanda = report.make_row("shakespeare", "wanda", "2:4", ours, slower)
    assert wanda["targets"]["ppl"] is True  # 0.909 <= 0.97
    # Magnitude has no time target; a peer that does not offer the pattern has no ratios.
    absent = ToolResult(tool="llm-compressor", status="not_offered", note="no N:M magnitude")
    magnitude = report.make_row("gsm8k", "magnitude", "2:4", ours, absent)
    assert magnitude["targets"] == {"ppl": None, "time": None, "rss": None}
    assert report.summary([row, wanda, magnitude]) == {
        "ppl": {"met": 1, "of": 2, "all_met": False},
        "time": {"met": 2, "of": 2, "all_met": True},
        "rss": {"met": 0, "of": 2, "all_met": False},
    }
    rows = [row, magnitude]
    text = report.markdown({**data, "rows": rows, "summary": report.summary(rows)})
    expected = (
        f"| shakespeare | sparsegpt | 2:4 | default | {ours.ppl['shakespeare']:.3f} | "
        f"{ours.ppl['shakespeare'] * 1.01:.3f} | {1 / 1.01:.4f} | {ours.ppl['gsm8k']:.3f} | "
        f"{ours.ppl['gsm8k'] * 1.1:.3f} | {1 / 1.1:.4f} | {1 / 1.1:.4f} | <= 0.85 missed |"
    )
    assert expected in text
    assert "| gsm8k | magnitude | 2:4 |" in text and "| n/a |" in text
    for domain in ("shakespeare", "gsm8k"):  # every number's sources are named
        assert data["calibration"][domain]["source"] in text and data["evaluation"][domain]["source"] in text


def test_result_files(bench_data: tuple[dict, Path]) -> None:
    data, root = bench_data
    results = root / "results"
    on_disk = json.loads((results / "peers-smoke.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(data["rows"]))
    for key in ("machine", "tools", "measures", "calibration", "evaluation", "dense", "summary", "domains"):
        assert key in on_disk
    assert "prune" in on_disk["rows"][0]["shears"]["details"]["argv"]
    markdown = (results / "peers-smoke.md").read_text()
    assert (
        "| shakespeare | sparsegpt | 2:4 | default |" in markdown and "Time and memory vs width" in markdown
    )
    for png in ("peers-smoke.png", "peers-smoke-scaling.png"):
        assert (results / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    point, paper = on_disk["scaling"]["points"]
    assert point["hidden"] == 64 and point["shears"]["status"] == "ok" and point["shears"]["sparsity"] > 0.49
    assert (point["method"], point["pattern"], point["variant"]) == ("sparsegpt", "unstructured", "default")
    # A variant point: Shears ran the variant's flags; the peer's run at that width is reused.
    assert paper["variant"] == "paper" and paper["shears"]["status"] == "ok"
    assert "--variant" in paper["shears"]["details"]["argv"]
    assert "--variant" not in point["shears"]["details"]["argv"]
    assert paper["peer"] == point["peer"]
    assert "| sparsegpt | unstructured | paper |" in markdown
    # Only the default is judged against the time target (a variant point is not what users get). The
    # ratios are set here: without the peer venv (CI) the sweep has none to judge.
    timed = {"points": [{**point, "time_ratio": 0.5}, {**paper, "time_ratio": 0.5}]}
    assert report.summary([], timed)["time"] == {"met": 1, "of": 1, "all_met": True}
    assert report.summary([], on_disk["scaling"])["time"]["of"] == (1 if PEER else 0)
    # A sweep-only run (--no-rows) does not describe the calibration and evaluation it did not use.
    sweep_only = report.markdown({**on_disk, "rows": []})
    assert "No quality rows" in sweep_only and "## Quality" not in sweep_only
    assert "Calibration (" not in sweep_only
    assert "Time and memory vs width" in sweep_only and "Calibration (" in markdown


def test_the_variants_listed_are_the_variants_run() -> None:
    from bench.peers.run import BenchConfig, variants_run

    config = BenchConfig(
        methods=["sparsegpt", "wanda"],
        variants=["paper", "refit"],
        scaling_runs=["sparsegpt:unstructured", "wanda:2:4:paper"],
        peer_python=None,
        vllm_python=None,
    )
    assert variants_run(config, rows=False, scaling=True) == {"wanda": {"paper": ["--variant", "paper"]}}
    assert variants_run(config, rows=True, scaling=False) == {
        "sparsegpt": {"paper": ["--variant", "paper"], "refit": ["--variant", "refit"]},
        "wanda": {"paper": ["--variant", "paper"]},  # Wanda has no 'refit' variant to run
    }
