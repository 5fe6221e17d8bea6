"""`make bench-memory`: does every method prune a model inside a memory cgroup of half its size?

The engine promises one decoder block in memory at a time; this holds it to a number. A random-weight
Llama (default: hidden 2048, 12 layers, intermediate 5632, 717 M parameters, 2.87 GB in fp32) is
pruned by `shears prune` with each method, pattern and variant, each run a child process moved into
its own cgroup v1 memory controller (/sys/fs/cgroup/memory/<name>) whose memory.limit_in_bytes is
`--fraction` (default 0.5) of the checkpoint's bytes. A run fits if it exits 0; the kernel's OOM
killer ends one that does not (exit -9 / 137, memory.failcnt > 0). Three numbers per run:
- peak anonymous MiB: the largest `total_rss` of the cgroup's memory.stat, sampled every 0.2 s: the
  process's own heap and tensors, what the limit really bounds;
- cgroup max usage: memory.max_usage_in_bytes, anonymous memory plus the page cache of the
  checkpoint reads (reclaimed before any OOM kill, so it sits at the limit without deciding anything);
- peak RSS: the child's ru_maxrss (bench.peers.measure.run_child). It can exceed the limit: it also
  counts the mapped pages of torch's shared libraries, which are charged to the cgroup of the process
  that first read them (the harness), not to this one.

Needs root and the cgroup v1 memory hierarchy (mkdir under /sys/fs/cgroup/memory/, write
memory.limit_in_bytes, move the process into cgroup.procs). Results: bench/results/memory-<tag>.json, .md.

Usage: python -m bench.memory_cgroup [--hidden 2048 --layers 12 --intermediate 5632] [--runs ...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.peers.measure import parameter_count, run_child
from bench.peers.tools import child_env, shears_command

REPO = Path(__file__).resolve().parents[1]
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
# method:pattern[:variant flags...]; the defaults are what each method runs without options.
DEFAULT_RUNS = [
    "sparsegpt:2:4",
    "sparsegpt:unstructured",
    "wanda:2:4",
    "wanda:unstructured",
    "magnitude:unstructured",
    "sparsegpt:2:4:--variant=paper",
    "wanda:2:4:--variant=paper",
]


def cgroup_available(root: Path = CGROUP_ROOT) -> bool:
    return (root / "memory.limit_in_bytes").is_file() and os.access(root, os.W_OK)


@contextmanager
def memory_cgroup(name: str, limit_bytes: int, root: Path = CGROUP_ROOT) -> Iterator[Path]:
    """A fresh cgroup v1 memory group with a hard limit (and no swap beyond it), removed after."""
    group = root / name
    if group.exists():
        group.rmdir()
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        memsw = group / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(limit_bytes))
        yield group
    finally:
        for _ in range(50):  # the killed child may take a moment to leave
            try:
                group.rmdir()
                break
            except OSError:
                import time

                time.sleep(0.1)


def in_cgroup(group: Path, argv: list[str]) -> list[str]:
    """argv run by a shell that first moves itself into `group` (so only the tool is charged)."""
    return ["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$@"', "sh", *argv]


def anonymous_bytes(memory_stat: str) -> int:
    """The cgroup's anonymous memory (and its children's) from a cgroup v1 memory.stat text."""
    for line in memory_stat.splitlines():
        key, _, value = line.partition(" ")
        if key == "total_rss":
            return int(value)
    raise ValueError("memory.stat has no total_rss line (not a cgroup v1 memory controller?)")


class AnonymousPeak:
    """Samples a cgroup's anonymous memory every `interval` seconds in a thread; `peak` is the largest."""

    def __init__(self, group: Path, interval: float = 0.2) -> None:
        self.stat = group / "memory.stat"
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            try:
                self.peak = max(self.peak, anonymous_bytes(self.stat.read_text()))
            except OSError:  # the group is going away
                return
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> AnonymousPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def oom_kills(group: Path) -> int:
    """How many processes the kernel's OOM killer ended in `group` (-1: a kernel before 4.13 does not
    count them in memory.oom_control)."""
    fields = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
    return int(fields.get("oom_kill", -1))


def checkpoint_bytes(folder: Path) -> int:
    from shears.pruning.checkpoint import Checkpoint

    checkpoint = Checkpoint(folder)
    total = 0
    for name, shape in checkpoint.shapes.items():
        numel = 1
        for size in shape:
            numel *= size
        total += numel * checkpoint.dtypes[name].itemsize
    return total


def parse_run(spec: str) -> tuple[str, str, list[str]]:
    """'method:pattern[:flag=value...]' -> (method, pattern, extra flags); N:M patterns hold a ':'."""
    method, _, rest = spec.partition(":")
    parts = rest.split(":")
    pattern, flags = (f"{parts[0]}:{parts[1]}", parts[2:]) if parts[0].isdigit() else (parts[0], parts[1:])
    extra = [token for flag in flags for token in flag.split("=", 1)]
    return method, pattern, extra


def run_one(folder: Path, spec: str, limit: int, work: Path, *, samples: int, seqlen: int) -> dict[str, Any]:
    method, pattern, extra = parse_run(spec)
    slug = spec.replace(":", "_").replace("=", "").replace("-", "")
    out = work / "out" / slug
    if out.exists():
        import shutil

        shutil.rmtree(out)
    sparsity = "0.5"
    argv = [
        *shears_command(),
        "prune",
        str(folder),
        "--method",
        method,
        "--sparsity",
        sparsity,
        "--pattern",
        pattern,
        "--samples",
        str(samples),
        "--seqlen",
        str(seqlen),
        "--no-eval",
        "--device",
        "cpu",
        "--quiet",
        *extra,
        "--out",
        str(out),
    ]
    with memory_cgroup(f"shears-bench-{os.getpid()}-{slug}", limit) as group:
        with AnonymousPeak(group) as anonymous:
            run = run_child(in_cgroup(group, argv), work / "logs" / f"{slug}.log", env=child_env())
        failcnt = int((group / "memory.failcnt").read_text())
        kills = oom_kills(group)
        max_usage = int((group / "memory.max_usage_in_bytes").read_text())
    result = {
        "run": spec,
        "method": method,
        "pattern": pattern,
        "flags": extra,
        "fits": run.returncode == 0,
        "exit": run.returncode,
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "peak_anonymous_mb": round(anonymous.peak / 2**20, 1),
        "cgroup_max_usage_mb": round(max_usage / 2**20, 1),
        "cgroup_failcnt": failcnt,
        "oom_kills": kills,
        "wall_s": round(run.wall_s, 1),
        "argv": argv,
    }
    if run.returncode == 0:
        manifest = json.loads((out / "manifest.json").read_text())
        result["manifest_peak_rss_mb"] = manifest.get("peak_memory", {}).get("rss_mb")
        result["variant"] = manifest.get("solver")
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    else:
        result["log_tail"] = run.tail(5)
    return result


def markdown(data: dict[str, Any]) -> str:
    model = data["model"]
    lines = [
        f"# Pruning inside a memory cgroup ({data['date']})",
        "",
        f"Model: random-weight Llama, hidden {model['hidden']}, {model['layers']} layers, intermediate "
        f"{model['intermediate']}: {model['parameters'] / 1e6:.0f} M parameters, "
        f"{model['bytes'] / 1e9:.2f} GB on disk. Limit: {data['fraction']} x that = "
        f"{data['limit_bytes'] / 2**20:.0f} MiB (cgroup v1 memory.limit_in_bytes, no swap). Calibration: "
        f"{data['samples']} x {data['seqlen']} tokens of the built-in corpus. Machine: {data['machine']}.",
        "",
        "| run | variant | fits | exit | peak anonymous MiB | cgroup max usage MiB (incl. page cache) "
        "| peak RSS MiB | wall s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in data["results"]:
        anonymous = r.get("peak_anonymous_mb")  # not sampled before 2026-12-01
        lines.append(
            f"| {r['run']} | {(r.get('variant') or {}).get('variant', '')} | {'yes' if r['fits'] else 'NO'} "
            f"| {r['exit']} | {'' if anonymous is None else f'{anonymous:.0f}'} | "
            f"{r['cgroup_max_usage_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.0f} |"
        )
    lines += [
        "",
        "Peak anonymous: the cgroup's largest memory.stat total_rss, sampled every 0.2 s (the process's "
        "own memory, what the limit bounds). Cgroup max usage adds the page cache of the checkpoint "
        "reads, reclaimed before any OOM kill. Peak RSS (ru_maxrss) also counts torch's shared "
        "libraries, mapped from pages charged to the harness's cgroup, so it can exceed the limit.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-memory", description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--fraction", type=float, default=0.5, help="limit = fraction x checkpoint bytes")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="method:pattern[:--flag=value]")
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / "work" / "memory")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--tag", help="results file suffix (default: today's date)")
    args = parser.parse_args(argv)
    if not cgroup_available():
        print(
            f"bench-memory: needs root and the cgroup v1 memory controller at {CGROUP_ROOT}", file=sys.stderr
        )
        return 2
    from bench.peers.run import machine_info
    from bench.peers.synthetic import synthetic_llama
    from shears.pruning.config import EngineOptions
    from shears.pruning.models import resolve_model

    tokenizer_from = resolve_model("smollm2-135m", None, EngineOptions()).path
    folder = synthetic_llama(
        args.work_dir / f"h{args.hidden}-l{args.layers}-i{args.intermediate}",
        hidden=args.hidden,
        intermediate=args.intermediate,
        layers=args.layers,
        tokenizer_from=tokenizer_from,
    )
    size = checkpoint_bytes(folder)
    limit = int(args.fraction * size)
    data: dict[str, Any] = {
        "date": args.tag or dt.date.today().isoformat(),
        "machine": f"{machine_info()['cpu']}, {os.cpu_count()} cores, "
        f"loadavg {[round(x, 2) for x in os.getloadavg()]}",
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "intermediate": args.intermediate,
            "parameters": parameter_count(folder),
            "bytes": size,
        },
        "fraction": args.fraction,
        "limit_bytes": limit,
        "samples": args.samples,
        "seqlen": args.seqlen,
        "results": [],
    }
    path = args.results_dir / f"memory-{data['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.runs:
        print(f"[bench-memory] {spec} under {limit / 2**20:.0f} MiB", file=sys.stderr, flush=True)
        result = run_one(folder, spec, limit, args.work_dir, samples=args.samples, seqlen=args.seqlen)
        print(
            f"[bench-memory] {spec}: fits={result['fits']} peak {result['peak_rss_mb']} MiB", file=sys.stderr
        )
        data["results"].append(result)
        path.write_text(json.dumps(data, indent=2) + "\n")
        path.with_suffix(".md").write_text(markdown(data))
    return 0 if all(r["fits"] for r in data["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
