"""`make gpu-check`: everything GPU-side of Shears measured in one command, in under 8 minutes.

Steps (bench/gpu_steps/): 1 environment, 2 kernel correctness, 3 kernel speed vs cuBLAS and torch's
2:4, 4 end-to-end decode, 5 pruning speed on a 7B-shaped model, 6 a summary against the targets.
Each of steps 1-5 runs in its own child process with its own time box: a step that fails, hangs or
breaks the CUDA context is recorded and the next one runs. Results are rewritten as they arrive (a
killed run still returns what was done) to $OUT, else bench/results/gpu-check-<date>-<gpu or dry>/:
gpu-check.json (schema: docs/gpu-check.md), gpu-check.md, gpu-check.png and gpu-check.log.

Runs from a source checkout with only Python, torch, triton, transformers, safetensors, numpy and
matplotlib (no install, no pydantic/accelerate/fastapi):

    python3 bench/gpu_check.py              # a GPU if torch sees one, else the dry run
    python3 bench/gpu_check.py --dry-run    # tiny shapes on the CPU, Triton interpreter (CI)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's folder is sys.path[0]; the checkout's root must be there instead.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from bench.gpu_steps import DEFAULT_MAX_CONFIGS, OPPORTUNISTIC, STEPS, Step  # noqa: E402
from bench.gpu_steps.report import render_markdown, write_chart  # noqa: E402
from bench.gpu_steps.summary import summarize  # noqa: E402

SCHEMA = "shears.gpu-check/1"
BUDGET_S = {"gpu": 470.0, "dry": 115.0}  # total; the device call's limit should leave room for a re-run
RESERVE_S = {"gpu": 15.0, "dry": 6.0}  # kept for each later step when a box is cut to the budget
POLL_S = {"gpu": 1.0, "dry": 0.3}


def gpu_present() -> bool:
    """Whether this machine looks like it has an NVIDIA GPU (the environment step then asks torch)."""
    return any(Path("/dev").glob("nvidia[0-9]*")) or shutil.which("nvidia-smi") is not None


def gpu_slug() -> str:
    """The first GPU's name as a file-name part ("nvidia-h200"), from nvidia-smi; "gpu" if it says none."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        name = done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout.strip() else ""
    except (OSError, subprocess.TimeoutExpired):
        name = ""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def default_out(mode: str) -> Path:
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    return ROOT / "bench" / "results" / f"gpu-check-{date}-{'dry' if mode == 'dry' else gpu_slug()}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Run:
    """The parent: starts each step's child, polls its part file, rewrites the outputs."""

    def __init__(self, args: argparse.Namespace, steps: list[Step] = STEPS) -> None:
        self.args = args
        self.steps = steps
        self.mode = "dry" if args.dry_run else "gpu"  # "gpu" until the environment step finds none
        self.forced_dry = args.dry_run
        self.dry_reason = getattr(args, "dry_reason", None)
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "gpu-check.log"
        self.log_path.write_text("")
        self.work = Path(tempfile.mkdtemp(prefix="shears-gpu-check-"))
        self.started = time.time()
        self.child: subprocess.Popen | None = None
        selected = args.steps or [s.name for s in steps]
        self.report: dict[str, Any] = {
            "schema": SCHEMA,
            "mode": self.mode,
            "dry_run": self.forced_dry,
            "dry_reason": self.dry_reason,
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "finished": None,
            "wall_s": None,
            "budget_s": self.budget(),
            "max_configs_per_kernel": args.max_configs,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "device": None,
            "forbidden_imported": {},
            "steps": {s.name: {"status": "pending" if s.name in selected else "not selected"} for s in steps},
        }
        self.report["steps"]["summary"] = {"status": "pending"}

    def budget(self) -> float:
        return (self.args.budget or BUDGET_S[self.mode]) * self.args.time_scale

    def log(self, message: str) -> None:
        line = f"[gpu-check {time.time() - self.started:6.1f}s] {message}"
        print(line, flush=True)
        with self.log_path.open("a") as handle:
            handle.write(line + "\n")

    def save(self) -> None:
        self.report["wall_s"] = round(time.time() - self.started, 2)
        self.report["mode"] = self.mode
        self.report["budget_s"] = self.budget()
        write_atomic(self.out / "gpu-check.json", json.dumps(self.report, indent=1, default=str) + "\n")
        write_atomic(self.out / "gpu-check.md", render_markdown(self.report))

    def box_for(self, index: int, step: Step) -> float:
        later = sum(1 for s in self.steps[index + 1 :] if self.report["steps"][s.name]["status"] == "pending")
        left = self.started + self.budget() - time.time() - later * RESERVE_S[self.mode]
        return min(step.box(self.mode) * self.args.time_scale, left)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        if self.mode == "dry":
            env["TRITON_INTERPRET"] = "1"
            if self.forced_dry:
                env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            env.pop("TRITON_INTERPRET", None)
        return env

    def run_step(self, index: int, step: Step) -> None:
        entry = self.report["steps"][step.name]
        box = self.box_for(index, step)
        if box < min(step.box(self.mode), RESERVE_S[self.mode] / 2):  # the budget left too little
            entry.update(status="skipped", error="no time left in the budget")
            self.log(f"{step.name}: skipped (no time left)")
            return
        part = self.work / f"{step.name}.json"
        margin = max(3.0, 0.08 * box)  # the step stops starting new work this long before its box ends
        command = [
            sys.executable,
            "-m",
            "bench.gpu_check",
            "--step",
            step.name,
            "--module",
            step.module,
            "--mode",
            self.mode,
            "--part",
            str(part),
            "--deadline",
            str(time.time() + box - margin),
            "--max-configs",
            str(self.args.max_configs),
        ]
        entry.update(
            status="running", time_box_s=round(box, 1), started_s=round(time.time() - self.started, 1)
        )
        self.log(f"{step.name}: started ({self.mode}, time box {box:.0f} s)")
        self.save()
        start, cpu = time.time(), children_cpu_s()
        seen = 0.0
        with self.log_path.open("a") as log:
            log.write(f"\n===== {step.name} ({self.mode}) =====\n")
            log.flush()
            self.child = subprocess.Popen(
                command, cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT, process_group=0
            )
            entry["pid"] = self.child.pid
            while True:
                try:
                    returncode = self.child.wait(timeout=POLL_S[self.mode])
                    break
                except subprocess.TimeoutExpired:
                    returncode = None
                seen = self.merge(step.name, part, seen)
                if time.time() - start > box:
                    self.stop_child()
                    break
        self.child = None
        self.merge(step.name, part, 0.0)
        entry["seconds"] = round(time.time() - start, 2)
        entry["cpu_s"] = round(children_cpu_s() - cpu, 2)  # user + system, the step's child
        entry["returncode"] = returncode
        if returncode is None:
            entry["status"] = "timeout"
            entry.setdefault("error", f"stopped at its time box ({box:.0f} s); the result is partial")
        elif returncode == 0:
            entry["status"] = "ok"
        else:
            entry["status"] = "failed"
            entry.setdefault("error", f"exit code {returncode}; see gpu-check.log")
        problems = len(entry.get("problems", []))
        self.log(f"{step.name}: {entry['status']} in {entry['seconds']:.1f} s, {problems} problems")
        self.save()

    def merge(self, name: str, part: Path, seen: float) -> float:
        """Copy the child's partial result into the report if it changed since `seen` (its mtime)."""
        try:
            mtime = part.stat().st_mtime
            if mtime == seen:
                return seen
            payload = json.loads(part.read_text())
        except (OSError, ValueError):
            return seen
        entry = self.report["steps"][name]
        entry["result"] = payload.get("result", {})
        entry["problems"] = payload.get("problems", [])
        if entry["result"].get("error"):
            entry["error"] = entry["result"]["error"]
        if payload.get("forbidden_imported"):
            self.report["forbidden_imported"][name] = payload["forbidden_imported"]
        self.save()
        return mtime

    def stop_child(self) -> None:
        """End the running step's process group (the child and anything it started)."""
        child = self.child
        if child is None or child.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                return
            try:
                child.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def interrupted(self, signum: int, frame: Any) -> None:
        self.stop_child()
        for entry in self.report["steps"].values():
            if entry["status"] == "running":
                entry["status"] = "interrupted"
        self.finish()
        sys.exit(128 + signum)

    def decide_mode(self) -> None:
        found = self.report["steps"]["environment"].get("result", {})
        self.report["device"] = found.get("device")
        if self.mode == "gpu" and not found.get("gpu"):
            self.mode = "dry"
            self.report["dry_run"] = True
            self.report["dry_reason"] = "torch sees no CUDA device (or the environment step failed)"
            self.log(
                "no CUDA device (or the environment step failed): the remaining steps run as the dry run"
            )

    def finish(self) -> None:
        self.report["steps"]["summary"] = {"status": "ok", "result": summarize(self.report["steps"])}
        try:
            problem = write_chart(self.report, self.out / "gpu-check.png")
        except Exception as exc:  # the chart is a convenience: never lose the report to it
            problem = f"{type(exc).__name__}: {exc}"
        self.report["chart"] = "gpu-check.png" if problem is None else None
        if problem is not None:
            self.report["chart_error"] = problem
        self.report["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.save()

    def main(self) -> int:
        previous = {sig: signal.signal(sig, self.interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.log(f"results in {self.out}")
        try:
            for index, step in enumerate(self.steps):
                if self.report["steps"][step.name]["status"] == "pending":
                    self.run_step(index, step)
                if step.name == "environment":
                    self.decide_mode()
            self.finish()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            shutil.rmtree(self.work, ignore_errors=True)
        print(render_markdown(self.report, summary_only=True), flush=True)
        self.log(f"wrote {self.out / 'gpu-check.json'} and gpu-check.md in {self.report['wall_s']:.0f} s")
        return 0 if healthy(self.report) else 1


def children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def healthy(report: dict[str, Any]) -> bool:
    """Every selected step ran to its end, the kernels were correct, nothing forbidden was imported."""
    steps = report["steps"]
    ran = all(entry["status"] in ("ok", "not selected") for entry in steps.values())
    correctness = steps.get("correctness", {"status": "not selected"})
    correct = correctness["status"] == "not selected" or bool(correctness.get("result", {}).get("all_ok"))
    imported = {name for names in report["forbidden_imported"].values() for name in names}
    return ran and correct and not imported - set(OPPORTUNISTIC)


def run_child(args: argparse.Namespace) -> int:
    """One step, in this (child) process."""
    import importlib
    import traceback

    from bench.gpu_steps.context import StepContext

    ctx = StepContext(args.step, args.mode, args.part, args.deadline, args.max_configs)
    ctx.save()
    try:
        module, _, function = args.module.partition(":")  # "package.module[:function]", default run
        getattr(importlib.import_module(module), function or "run")(ctx)
    except BaseException as exc:
        ctx.result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        ctx.problem(f"step failed: {traceback.format_exc()}")
        return 1
    ctx.save()
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    parser.add_argument("--out", type=Path, help="results folder (default: $OUT, else bench/results/...)")
    parser.add_argument("--steps", nargs="+", choices=[s.name for s in STEPS], help="only these steps")
    parser.add_argument("--budget", type=float, help="total seconds (default: 470 on a GPU, 115 dry)")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply every time box and the budget (slow machines)"
    )
    parser.add_argument(
        "--max-configs", type=int, default=DEFAULT_MAX_CONFIGS, help="launch candidates tuned per kernel kind"
    )
    # The child side (one step): started by the parent.
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--module", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["gpu", "dry"], help=argparse.SUPPRESS)
    parser.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run or os.environ.get("DRY", "") not in ("", "0"):
        args.dry_run, args.dry_reason = True, "asked for (--dry-run or DRY=1)"
    elif args.step is None and not gpu_present():
        args.dry_run, args.dry_reason = True, "no NVIDIA device on this machine"
    if args.step is None and args.out is None:
        args.out = (
            Path(os.environ["OUT"])
            if os.environ.get("OUT")
            else default_out("dry" if args.dry_run else "gpu")
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.step:
        return run_child(args)
    return Run(args).main()


if __name__ == "__main__":
    sys.exit(main())
