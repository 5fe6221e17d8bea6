"""`make gpu-check` cannot rot between GPU runs: its dry run passes here as it would run on the GPU
machine (no pydantic, accelerate, fastapi, no installed Shears), a hung or crashing step is recorded
and the next one runs, and the summary judges the issue's targets from the measurements."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import Run, default_out
from bench.gpu_steps import Step
from bench.gpu_steps.report import render_markdown
from bench.gpu_steps.summary import summarize

ROOT = Path(__file__).resolve().parents[2]

# sitecustomize for the dry run's processes: the server's packages cannot be found (as on the GPU
# machine, where they are not installed), nor can the editable install of Shears, so `shears.<part>`
# must come from the checkout through the shim in shears/__init__.py.
HIDE = """
import sys

HIDDEN = ("pydantic", "accelerate", "fastapi")


class _Hide:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return self.inner.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


def _module(finder):
    return (finder if isinstance(finder, type) else type(finder)).__module__


sys.meta_path[:] = [_Hide(f) for f in sys.meta_path if not _module(f).startswith("__editable__")]
"""


def _hidden_env(tmp_path: Path) -> dict[str, str]:
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(hide), str(ROOT)])
    return env


def test_hiding_works(tmp_path: Path) -> None:
    """The hook really hides the packages and the install (else the dry-run test proves nothing), and
    what the GPU check imports of the engine needs none of them."""
    code = (
        "import importlib.util, shears.kernels, shears.pruning.streaming, shears.pruning.stats\n"
        "import shears.pruning.solvers.sparsegpt, shears.pruning.solvers.wanda\n"
        "print([importlib.util.find_spec(n) is None for n in ('pydantic', 'accelerate', 'fastapi')])\n"
        "print(shears.kernels.__path__[0])\n"
        "try:\n    import shears.pruning.config\nexcept ImportError as exc:\n    print('blocked', exc.name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_hidden_env(tmp_path), capture_output=True, text=True
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr
    assert lines == ["[True, True, True]", str(ROOT / "kernels"), "blocked pydantic"]


def test_dry_run_passes_without_the_server_packages(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(out), "--time-scale", "3"]
    done = subprocess.run(
        command, cwd=ROOT, env=_hidden_env(tmp_path), capture_output=True, text=True, timeout=800
    )
    log = (out / "gpu-check.log").read_text() if (out / "gpu-check.log").exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + log[-6000:]
    report = json.loads((out / "gpu-check.json").read_text())
    steps = report["steps"]
    assert report["schema"] == "shears.gpu-check/1" and report["mode"] == "dry" and report["dry_run"]
    assert {name: s["status"] for name, s in steps.items()} == dict.fromkeys(
        ["environment", "correctness", "kernel_speed", "decode", "pruning_speed", "summary"], "ok"
    )
    assert report["forbidden_imported"] == {} and all(not s.get("problems") for s in steps.values())

    env = steps["environment"]["result"]
    assert env["gpu"] is False and env["triton_status"] == "ok"
    assert env["absent_packages"] == {"pydantic": True, "accelerate": True, "fastapi": True}
    assert all(Path(p).is_relative_to(ROOT) for p in env["imported_from"].values())

    correctness = steps["correctness"]["result"]
    assert correctness["all_ok"] and correctness["checks"] >= 40 and correctness["failed"] == []
    assert {c["case"] for c in correctness["launches"]} == {"2:4", "bitmask 70%", "4:8"}

    speed = steps["kernel_speed"]["result"]
    assert len(speed["rows"]) == speed["planned"] > 0
    for row in speed["rows"]:
        assert row["correct"] and row["shears_us"] > 0 and row["dense_us"] > 0 and row["dispatch"], row
        assert row["speedup_dispatch"] == pytest.approx(row["dense_us"] / row["dispatch_us"])
    assert {r["layout"] for r in speed["rows"]} == {"2:4", "bitmask50", "bitmask70", "bitmask90"}

    decode = steps["decode"]["result"]
    assert decode["logits_within_tolerance"] and decode["tokens_agree"] == 1.0
    assert decode["packed_layers"] == 7 and decode["packed_weight_bytes"] < decode["dense_weight_bytes"]

    pruning = steps["pruning_speed"]["result"]
    for variant in ("wanda", "sparsegpt", "sparsegpt-paper"):
        record = pruning[variant]
        assert len(record["blocks"]) == 2 and record["extrapolated_model_s"] > record["steady_block_s"] > 0
        for block in record["blocks"]:
            assert block["layers"] == 7 and block["min_layer_sparsity"] == pytest.approx(0.5, abs=0.01)
            assert math.isfinite(block["output_error"]) and 0 < block["output_error"] < 1
    # The re-fit of kept weights lowers SparseGPT's layer error, as on the CPU engine.
    default, paper = pruning["sparsegpt"]["blocks"][0], pruning["sparsegpt-paper"]["blocks"][0]
    assert default["max_layer_error"] < paper["max_layer_error"]

    targets = {t["target"]: t for t in steps["summary"]["result"]["targets"]}
    assert targets["kernels correct"]["met"] is True and targets["2:4 decode output"]["met"] is True
    assert all(t["value"] is not None for t in targets.values())
    markdown = (out / "gpu-check.md").read_text()
    assert "DRY RUN" in markdown and "## 3. Kernel speed" in markdown and "## Problems" not in markdown
    assert report["chart"] == "gpu-check.png" and (out / "gpu-check.png").read_bytes()[:4] == b"\x89PNG"


def test_time_boxes_a_hung_step_and_goes_on(tmp_path: Path) -> None:
    """In GPU mode (these steps need no GPU): the boxes and the child environment a GPU run uses."""
    steps = [
        Step("hang", "tests.bench.gpu_check_fakes:hang", 6, 6),
        Step("crash", "tests.bench.gpu_check_fakes:crash", 60, 60),
        Step("works", "tests.bench.gpu_check_fakes:works", 60, 60),
    ]
    args = argparse.Namespace(
        dry_run=False, out=tmp_path, steps=None, budget=200, time_scale=1.0, max_configs=3
    )
    assert Run(args, steps).main() == 1  # not healthy: one step timed out, one failed
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    hang, crash, works = (report["steps"][name] for name in ("hang", "crash", "works"))
    assert (
        hang["status"] == "timeout"
        and hang["result"] == {"before_hang": True}
        and "time box" in hang["error"]
    )
    assert 6 <= hang["seconds"] < 30 and not Path(f"/proc/{hang['pid']}").exists()
    assert crash["status"] == "failed" and crash["result"]["partial"] == 1 and "boom" in crash["error"]
    assert works["status"] == "ok" and works["result"] == {"mode": "gpu", "interpreter": None}
    assert report["steps"]["summary"]["status"] == "ok" and report["finished"] and report["mode"] == "gpu"
    assert "| hang | timeout | " in (tmp_path / "gpu-check.md").read_text()


def test_budget_spent_skips_the_rest(tmp_path: Path) -> None:
    steps = [Step("works", "tests.bench.gpu_check_fakes:works", 60, 60)]
    args = argparse.Namespace(dry_run=True, out=tmp_path, steps=None, budget=1, time_scale=1.0, max_configs=3)
    assert Run(args, steps).main() == 1
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["steps"]["works"]["status"] == "skipped" and report["steps"]["summary"]["status"] == "ok"
    assert (
        default_out("dry").name.endswith("-dry") and default_out("dry").parent == ROOT / "bench" / "results"
    )
    assert re.fullmatch(r"gpu-check-\d{4}-\d\d-\d\d-[a-z0-9-]+", default_out("gpu").name)


def _row(layout: str, m: int, shears: float, dispatch: float) -> dict:
    return {
        "shape_name": "qo",
        "shape": [4096, 4096],
        "layout": layout,
        "m": m,
        "dense_us": 10.0,
        "shears_us": 10.0 / shears,
        "speedup_shears": shears,
        "dispatch_us": 10.0 / dispatch,
        "speedup_dispatch": dispatch,
        "correct": True,
    }


def test_summary_judges_the_targets() -> None:
    rows = [
        _row("2:4", 1, 1.9, 1.9),
        _row("2:4", 16, 1.7, 1.7),
        _row("2:4", 512, 0.7, 0.98),  # within timing noise of dense
        _row("2:4", 2048, 0.6, 0.9),  # the dispatcher picked something slower than dense
        _row("bitmask70", 1, 2.4, 2.4),
        _row("bitmask90", 1, 3.1, 3.1),
    ]
    block = {"seconds": 3.0, "statistics_s": 1.0, "solve_s": 1.5, "propagate_s": 0.5, "output_error": 0.01}

    def pruning(model_s: float) -> dict:
        return {
            "variant": "v",
            "blocks": [block],
            "steady_block_s": 3.0,
            "extrapolated_model_s": model_s,
            "extrapolation": "capture + 32 x ...",
            "peak_gpu_bytes": 6 << 30,
        }

    steps = {
        "correctness": {"status": "ok", "result": {"all_ok": True, "checks": 50, "failed": []}},
        "kernel_speed": {"status": "ok", "result": {"rows": rows, "planned": 5}},
        "pruning_speed": {
            "status": "ok",
            "result": {
                "wanda": pruning(25.0),
                "sparsegpt": pruning(130.0),
                "sparsegpt-paper": pruning(100.0),
            },
        },
        "decode": {"status": "timeout", "result": {}},
    }
    targets = {t["target"]: t for t in summarize(steps)["targets"]}
    met = {name: t["met"] for name, t in targets.items()}
    assert met == {
        "kernels correct": True,
        "2:4 bf16 decode vs cuBLAS": True,
        "dispatch vs cuBLAS": False,
        "bitmask 70% M=1": True,
        "bitmask 90% M=1": False,
        "2:4 decode output": None,
        "2:4 decode speed": None,
        "SparseGPT 7B model (default)": False,
        "SparseGPT 7B model (paper)": True,
        "Wanda 7B model": True,
    }
    assert targets["2:4 bf16 decode vs cuBLAS"]["value"] == 1.7
    assert targets["dispatch vs cuBLAS"]["value"] == 0.9
    assert targets["2:4 decode output"]["detail"] == "not measured"
    device = {"name": "NVIDIA H200", "capability": [9, 0], "sms": 132, "memory_bytes": 150 << 30}
    device["nvidia_smi"] = {"driver_version": "580.159.03"}
    environment = {"gpu": True, "device": device, "versions": {"torch": "2.11.0"}, "triton_status": "ok"}
    environment["baselines"] = {"bf16_matmul_side": 8192, "bf16_matmul_tflops": 780.0, "copy_mib": 1024}
    environment["baselines"]["copy_gb_per_s"] = 4300.0
    report = {
        "mode": "gpu",
        "started": "2026-12-01T00:00:00+00:00",
        "command": "python3 bench/gpu_check.py",
        "device": device,
        "steps": {
            "environment": {"status": "ok", "result": environment},
            **steps,
            "summary": {"status": "ok", "result": summarize(steps)},
        },
    }
    markdown = render_markdown(report)
    assert "- device: NVIDIA H200, capability [9, 0], 132 SMs, 150.0 GiB; driver 580.159.03" in markdown
    assert "bf16 matmul 8192^3 780.0 TFLOP/s; device copy 1024 MiB 4300 GB/s" in markdown
    assert "| decode | timeout |" in markdown
    line = next(line for line in markdown.splitlines() if line.startswith("| dispatch vs cuBLAS |"))
    assert line.endswith("| 0.90 | MISSED | min 0.90, median 1.80, max 3.10 over 6 rows |"), line
    assert "EXTRAPOLATED" in markdown and "cannot render" not in markdown


def test_step_defaults_follow_the_request_and_engine() -> None:
    """The pruning step cannot import the request model on the GPU machine, so it copies its defaults."""
    from bench.gpu_steps.pruning_speed import ERROR_SAMPLE_TOKENS, SPARSEGPT_DEFAULTS, Sizes
    from shears.pruning import engine
    from shears.pruning.config import PruneRequest

    request = PruneRequest(model="m", method="sparsegpt", sparsity=0.5)
    assert request.model_dump()["sparsegpt"] == SPARSEGPT_DEFAULTS
    assert ERROR_SAMPLE_TOKENS == engine.ERROR_SAMPLE_TOKENS
    gpu = __import__("bench.gpu_steps.pruning_speed", fromlist=["SIZES"]).SIZES["gpu"]
    assert isinstance(gpu, Sizes) and gpu.batch_size == request.calibration.batch_size


def test_tuning_space_restricted_per_kernel() -> None:
    """`--max-configs`: the first N launches of each kernel (GEMV, tl.dot), in the tuned order."""
    from shears.kernels.configs import candidate_configs
    from shears.kernels.registry import FORMATS

    for m, layout in ((1, "nm"), (1, "bitmask"), (16, "nm"), (2048, "nm")):
        pattern, launches = (2, 4) if layout == "nm" else (0, 0), FORMATS[layout].launches
        full = candidate_configs(4096, 14336, m, launches, 132, pattern)
        cut = candidate_configs(4096, 14336, m, launches, 132, pattern, per_kernel=2)
        gemv, dot = [c for c in full if c.gemv], [c for c in full if not c.gemv]
        assert cut == gemv[:2] + dot[:2] and len(cut) < len(full)
