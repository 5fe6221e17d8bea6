"""Every kind of output Shears writes loads in vLLM and decodes as transformers does (issue 17; CI step).

    python -m bench.runtimes.check [--vllm-python bench/.venv-vllm/bin/python] [--no-build-venv]

Builds bench/.venv-vllm (bench/runtimes/setup_vllm.sh) in the background while it writes one output
folder per entry of KINDS with the `shears` commands a user would type and runs the transformers
reference on them, then loads them all in one vLLM process (pruning.runtimes: the same check as a
job's verify_runtimes phase). Prints a line per kind (loaded or not, greedy tokens equal or not,
logits within tolerance, seconds) and exits non-zero if any kind fails, if a control passes, or if
vLLM cannot be installed: nothing is skipped.

Adding an output kind (structured, MoE, VLM) is one OutputKind entry.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shears.pruning.output import check_layout
from shears.pruning.runtimes import describe, run_reference, verify_folders

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "bench" / "runtimes" / "setup_vllm.sh"
VENV = ROOT / "bench" / ".venv-vllm"
WORK = ROOT / "bench" / "work" / "runtimes"
MODEL = "smollm2-135m"  # the built-in model: big enough for vLLM's CPU kernels, pruned in seconds
MAGNITUDE_24 = ("prune", MODEL, "--method", "magnitude", "--pattern", "2:4", "--no-eval", "--quiet")
# Issue 12's output: 6 of 30 blocks, a quarter of the MLP channels and 1 of 3 head groups removed.
STRUCTURED = "layers=0.2,mlp=0.25,heads=0.34,speed=false"
STRUCTURED_SHAPE = {"num_hidden_layers": 24, "intermediate_size": 1152, "num_key_value_heads": 2}


def _has(*names: str) -> Callable[[Path], str | None]:
    def check(folder: Path) -> str | None:
        missing = [name for name in names if not (folder / name).exists()]
        return f"missing {missing}" if missing else None

    return check


def _lacks(*names: str) -> Callable[[Path], str | None]:
    def check(folder: Path) -> str | None:
        present = [name for name in names if (folder / name).exists()]
        return f"unexpected {present}" if present else None

    return check


def _smaller_than_smollm2(folder: Path) -> str | None:
    """A structured output: fewer blocks, a narrower MLP and fewer heads than SmolLM2-135M's
    30 blocks, 1536 channels and 9 heads in 3 key-value groups."""
    config = json.loads((folder / "config.json").read_text())
    shape = {k: config[k] for k in ("num_hidden_layers", "intermediate_size", "num_key_value_heads")}
    return None if shape == STRUCTURED_SHAPE else f"config {shape}, expected {STRUCTURED_SHAPE}"


def _old_layout(folder: Path) -> None:
    """Packed files back at the top of the folder, where Shears wrote them before issue 17."""
    for path in sorted((folder / "packed").iterdir()):
        path.rename(folder / path.name)
    (folder / "packed").rmdir()


@dataclass(frozen=True)
class OutputKind:
    name: str
    what: str
    commands: tuple[tuple[str, ...], ...] = ()  # `shears` argv; "{out}" is the kind's folder
    source: str | None = None  # start from a copy of this kind's folder
    edit: Callable[[Path], None] | None = None  # a hand edit after the commands (controls only)
    expect: Callable[[Path], str | None] | None = None  # what the layout must show
    control: bool = False  # must FAIL: proves the check catches what it is for
    layout_checked: bool = True


KINDS: tuple[OutputKind, ...] = (
    OutputKind(
        "dense",
        "magnitude 2:4, dense weights with zeros",
        commands=((*MAGNITUDE_24, "--out", "{out}"),),
        expect=_lacks("packed", "model.safetensors.index.json"),
    ),
    OutputKind(
        "packed",
        "the same + `shears pack` (issue 17's reproduction)",
        source="dense",
        commands=(("pack", "{out}"),),
        expect=_has("packed/sparse.safetensors"),
    ),
    OutputKind(
        "sharded",
        "bf16 output in 64 MiB shards + index, packed shards + index",
        commands=(
            (
                *MAGNITUDE_24,
                "--dtype",
                "bfloat16",
                "--formats",
                "dense,packed",
                "--max-shard-bytes",
                str(64 << 20),
                "--out",
                "{out}",
            ),
        ),
        expect=_has("model.safetensors.index.json", "packed/sparse.safetensors.index.json"),
    ),
    OutputKind(
        "structured",
        "fewer blocks, a narrower MLP, fewer heads: a smaller dense model (structure, method none)",
        commands=(
            (
                "prune",
                MODEL,
                "--method",
                "none",
                "--structure",
                STRUCTURED,
                "--samples",
                "16",
                "--seqlen",
                "128",
                "--no-eval",
                "--quiet",
                "--out",
                "{out}",
            ),
        ),
        expect=_smaller_than_smollm2,
    ),
    OutputKind(
        "control-old-layout",
        "`packed` with its packed files at the top, as before issue 17: vLLM must refuse it",
        source="packed",
        edit=_old_layout,
        expect=_has("sparse.safetensors"),
        control=True,
        layout_checked=False,
    ),
)


def _shears(argv: tuple[str, ...], out: Path, log: Path) -> None:
    command = [sys.executable, "-m", "shears", *(arg.replace("{out}", str(out)) for arg in argv)]
    # One thread: pip builds the vLLM venv on the other core meanwhile, and a magnitude job is memory-
    # bound (measured here under load: 12 s of CPU with one thread, 39 s with two spinning on shared cores).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "ab") as handle:
        handle.write(f"$ {' '.join(command)}\n".encode())
        handle.flush()
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}; see {log}")


def make_kind(kind: OutputKind, work: Path) -> dict[str, Any]:
    out = work / kind.name
    start = time.perf_counter()
    if kind.source is not None:
        shutil.copytree(work / kind.source, out)
    for argv in kind.commands:
        _shears(argv, out, work / f"{kind.name}.log")
    if kind.edit is not None:
        kind.edit(out)
    if kind.layout_checked:
        check_layout(out)
    problem = kind.expect(out) if kind.expect else None
    if problem:
        raise RuntimeError(f"{kind.name}: {problem}")
    return {"folder": str(out), "make_seconds": round(time.perf_counter() - start, 1)}


def _start_venv(work: Path, python: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = work / "setup-vllm.log"
    handle = open(log, "wb")  # noqa: SIM115 - the child writes it until it ends
    return subprocess.Popen(["bash", str(SETUP), python], stdout=handle, stderr=subprocess.STDOUT), log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-python", type=Path, default=VENV / "bin" / "python")
    parser.add_argument("--no-build-venv", action="store_true", help="use --vllm-python as it is")
    parser.add_argument("--base-python", default="python3", help="Python that creates the vLLM venv")
    parser.add_argument("--kinds", help="comma list of kind names (default: all; sources come along)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    wanted = set(args.kinds.split(",")) if args.kinds else {k.name for k in KINDS}
    for kind in reversed(KINDS):  # a kind made from another one needs that one too
        if kind.name in wanted and kind.source:
            wanted.add(kind.source)
    kinds = [k for k in KINDS if k.name in wanted]
    start = time.perf_counter()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    setup = None if args.no_build_venv else _start_venv(WORK, args.base_python)
    rows: dict[str, dict[str, Any]] = {}
    try:
        for kind in kinds:
            rows[kind.name] = make_kind(kind, WORK)
            print(f"[check] made {kind.name} in {rows[kind.name]['make_seconds']} s: {kind.what}", flush=True)
        folders = [Path(rows[k.name]["folder"]) for k in kinds]
        print(f"[check] transformers reference: {len(folders)} folder(s)", flush=True)
        reference = run_reference(folders, WORK / "probe")  # meanwhile too: it needs only this venv
    except BaseException:
        if setup is not None:
            setup[0].terminate()
            setup[0].wait()
        raise
    if setup is not None:
        venv_start = time.perf_counter()
        code = setup[0].wait()
        waited = time.perf_counter() - venv_start
        tail = setup[1].read_text(errors="replace").splitlines()
        print(f"[check] vLLM venv: {tail[-1] if tail else ''} (waited {waited:.0f} s more)", flush=True)
        if code != 0:
            print("\n".join(tail[-30:]), file=sys.stderr)
            print(
                f"[check] FAILED: vLLM could not be installed (exit {code}); see {setup[1]}", file=sys.stderr
            )
            return 1
    sections = verify_folders(
        folders,
        ["vllm"],
        {"vllm": str(args.vllm_python)},
        log=lambda message: print(f"[check] {message}", flush=True),
        work=WORK / "probe",
        reference=reference,
    )
    failures = []
    header = ("kind", "loaded", "greedy 16 tokens", "max logprob diff", "result")
    print("\n{:<20} {:<7} {:<22} {:<17} {:<20} seconds".format(*header))
    for kind, section in zip(kinds, sections.values(), strict=True):
        verdict = section["runtimes"]["vllm"]
        rows[kind.name]["compatibility"] = section
        passed = verdict["ok"] != kind.control
        if not passed:
            failures.append(kind.name)
        tokens = "equal" if verdict["tokens_equal"] else f"first {verdict['equal_prefix']} equal"
        settled = " (float32)" if "float32" in verdict else ""  # bf16 drifted; fp32 decided
        result = ("refused, as it must" if kind.control else f"ok{settled}") if passed else "FAILED"
        print(
            f"{kind.name:<20} {'yes' if verdict['loaded'] else 'no':<7} "
            f"{tokens if verdict['loaded'] else '-':<22} {verdict['max_logprob_diff'] or '-'!s:<17} "
            f"{result:<20} make {rows[kind.name]['make_seconds']} + vLLM {verdict['seconds']}"
        )
        if not verdict["ok"] or settled:
            print(f"    {describe('vllm', verdict)}")
    wall = time.perf_counter() - start
    print(
        f"\nvLLM {next(iter(sections.values()))['runtimes']['vllm'].get('version')}; wall time {wall:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps({"wall_seconds": round(wall, 1), "kinds": rows}, indent=2) + "\n")
    if failures:
        print(f"FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
