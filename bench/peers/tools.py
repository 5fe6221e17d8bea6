"""One pruning run of each tool, as a child process measured the same way: a `ToolResult`.

prune_s means the same for both tools: seconds from a model in memory and calibration ids in memory
to pruned weights in memory (calibration forward passes, statistics, masks, weight updates); not
interpreter start, imports, model loading or saving.
- Shears: its manifest's `calibrating` + `pruning` phase timings (its pruning phase also writes each
  finished block to its shard, so it carries a little of the saving);
- llm-compressor: the `oneshot()` call, timed inside run_llmcompressor.py (no save in it).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bench.peers.measure import ChildRun, folder_sparsity, run_child

PEERS_DIR = Path(__file__).resolve().parent
PEER_RUNNER = PEERS_DIR / "run_llmcompressor.py"
PEER_RESULT_PREFIX = "PEER_RESULT "
PEER_NOT_OFFERED = 3  # run_llmcompressor.py's exit code for a method/pattern llm-compressor lacks
SHEARS_PRUNE_PHASES = ("calibrating", "pruning")

Status = Literal["ok", "not_offered", "failed"]


# Shears-only variants run next to each method's default (sparsegpt: admm; wanda: refit): the papers'
# algorithms (what llm-compressor runs) and the other solvers, one option away.
VARIANTS: dict[str, dict[str, tuple[str, ...]]] = {
    "sparsegpt": {"paper": ("--variant", "paper"), "refit": ("--variant", "refit")},
    "wanda": {"paper": ("--variant", "paper")},
}
VARIANT_NAMES = sorted({name for variants in VARIANTS.values() for name in variants})


def parse_scaling_run(spec: str) -> tuple[str, str, str]:
    """'method:pattern[:variant]' -> (method, pattern, variant or 'default'); N:M patterns hold a ':'."""
    method, _, rest = spec.partition(":")
    pattern, _, last = rest.rpartition(":")
    if last in VARIANTS.get(method, {}):
        return method, pattern, last
    if not rest:
        raise ValueError(f"scaling run {spec!r}: expected 'method:pattern[:variant]'")
    return method, rest, "default"


@dataclass
class ToolResult:
    tool: str
    status: Status
    prune_s: float | None = None
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    sparsity: float | None = None
    ppl: dict[str, float] = field(default_factory=dict)  # evaluation domain -> perplexity
    out: str | None = None
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Job:
    """What both tools are asked to do: the same folder, ids and settings."""

    model: Path
    calib: Path  # .safetensors with input_ids int64 [samples, seqlen]
    method: str
    pattern: str  # 'unstructured' or 'N:M'
    sparsity: float
    samples: int
    seqlen: int
    batch_size: int = 8
    shears_flags: tuple[str, ...] = ()  # extra `shears prune` flags (a Shears-only variant)
    compute_dtype: str = "auto"  # Shears' block forwards (the peer always runs fp32)


def child_env() -> dict[str, str]:
    """One environment for both children: no progress bars, no tokenizer threads, same torch threads."""
    env = dict(os.environ)
    env.update(TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    return env


def shears_command() -> list[str]:
    """The `shears` entry point of the venv running this harness (`python -m shears.cli` without one)."""
    entry = Path(sys.executable).parent / "shears"
    return [str(entry)] if entry.is_file() else [sys.executable, "-m", "shears.cli"]


def shears_argv(job: Job, out: Path) -> list[str]:
    return [
        *shears_command(),
        "prune",
        str(job.model),
        "--method",
        job.method,
        "--sparsity",
        str(job.sparsity),
        "--pattern",
        job.pattern,
        "--calib",
        str(job.calib),
        "--samples",
        str(job.samples),
        "--seqlen",
        str(job.seqlen),
        "--batch-size",
        str(job.batch_size),
        "--no-eval",
        "--device",
        "cpu",
        "--compute-dtype",
        job.compute_dtype,
        "--quiet",
        *job.shears_flags,
        "--out",
        str(out),
    ]


def peer_argv(job: Job, out: Path, peer_python: Path) -> list[str]:
    return [
        str(peer_python),
        str(PEER_RUNNER),
        "--model",
        str(job.model),
        "--calib",
        str(job.calib),
        "--method",
        job.method,
        "--sparsity",
        str(job.sparsity),
        "--pattern",
        job.pattern,
        "--samples",
        str(job.samples),
        "--seqlen",
        str(job.seqlen),
        "--batch-size",
        str(job.batch_size),
        "--out",
        str(out),
    ]


def _fresh(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)


def _measured(tool: str, run: ChildRun, out: Path, weight_names: list[str]) -> ToolResult:
    return ToolResult(
        tool=tool,
        status="ok",
        wall_s=round(run.wall_s, 3),
        peak_rss_mb=round(run.peak_rss_mb, 1),
        sparsity=folder_sparsity(out, weight_names),
        out=str(out),
        details={"argv": run.argv, "log": str(run.log)},
    )


def _failed(tool: str, run: ChildRun) -> ToolResult:
    return ToolResult(
        tool=tool,
        status="failed",
        wall_s=round(run.wall_s, 3),
        peak_rss_mb=round(run.peak_rss_mb, 1),
        note=f"exit {run.returncode}: {run.tail(8)}",
        details={"argv": run.argv, "log": str(run.log)},
    )


def run_shears(job: Job, out: Path, log: Path, weight_names: list[str]) -> ToolResult:
    _fresh(out)
    run = run_child(shears_argv(job, out), log, env=child_env())
    if run.returncode != 0:
        return _failed("shears", run)
    manifest = json.loads((out / "manifest.json").read_text())
    timings: dict[str, float] = manifest["timings"]
    result = _measured("shears", run, out, weight_names)
    result.prune_s = round(sum(timings.get(phase, 0.0) for phase in SHEARS_PRUNE_PHASES), 3)
    result.details.update(
        timings=timings,
        self_reported_sparsity=manifest["sparsity"]["achieved"],
        pruned_layers=manifest["sparsity"]["pruned_layers"],
        versions=manifest["versions"],
    )
    return result


def run_peer(job: Job, out: Path, log: Path, weight_names: list[str], peer_python: Path) -> ToolResult:
    _fresh(out)
    run = run_child(peer_argv(job, out, peer_python), log, env=child_env())
    if run.returncode == PEER_NOT_OFFERED:
        return ToolResult(
            tool="llm-compressor", status="not_offered", note=run.tail(1), details={"argv": run.argv}
        )
    if run.returncode != 0:
        return _failed("llm-compressor", run)
    lines = [line for line in run.output().splitlines() if line.startswith(PEER_RESULT_PREFIX)]
    if not lines:
        return _failed("llm-compressor", run)
    reported = json.loads(lines[-1][len(PEER_RESULT_PREFIX) :])
    result = _measured("llm-compressor", run, out, weight_names)
    result.prune_s = reported["prune_s"]
    result.details.update({k: v for k, v in reported.items() if k not in ("prune_s", "out")})
    result.details["self_reported_sparsity"] = result.details.pop("sparsity")
    return result


def import_floor(argv: list[str], log: Path) -> dict[str, float]:
    """Peak RSS and wall time of a child that only imports a tool: the floor under its numbers."""
    run = run_child(argv, log, env=child_env())
    if run.returncode != 0:
        raise RuntimeError(f"{argv}: exit {run.returncode}: {run.tail(5)}")
    return {"peak_rss_mb": round(run.peak_rss_mb, 1), "wall_s": round(run.wall_s, 3)}


def shears_import_argv(python: str = sys.executable) -> list[str]:
    return [python, "-c", "import pruning.engine, pruning.cli_prune, calibration"]


def peer_import_argv(peer_python: Path) -> list[str]:
    return [str(peer_python), "-c", "import transformers, llmcompressor; from llmcompressor import oneshot"]
