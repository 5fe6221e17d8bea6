"""Shears alone, one configuration, scored on both domains: how the defaults' parameters were chosen.

`bench.peers.run` compares fixed variants with llm-compressor; this runs `shears prune` exactly as it
does (same calibration ids, same child process, same evaluation windows), with any flags, and prints
one JSON line per run: its perplexity on each domain's held-out text. No peer, no results file.

    python -m bench.peers.probe --calibrate-on gsm8k --pattern 2:4 --samples 32 --eval-tokens 4096 \\
        -- --method sparsegpt --refit-damp 0.3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

from bench.peers.run import Bench, BenchConfig
from bench.peers.tools import run_shears


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-probe", description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate-on", required=True, choices=["shakespeare", "gsm8k"])
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--work-dir", type=Path, default=Path("bench/work/probe"))
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="-- then `shears prune` flags (--method ...)")
    args = parser.parse_args(argv)
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    method, rest = "sparsegpt", list(flags)
    if "--method" in rest:  # the Job names the method; the other flags pass through
        at = rest.index("--method")
        method, rest = rest[at + 1], rest[:at] + rest[at + 2 :]
    config = BenchConfig(
        sparsity=args.sparsity,
        samples=args.samples,
        eval_tokens=args.eval_tokens,
        work_dir=args.work_dir,
        results_dir=args.work_dir / "results",
        peer_python=None,
        vllm_python=None,
    )
    bench = Bench(config)
    bench.prepare()
    job = dataclasses.replace(
        bench.job(method, args.pattern, bench.dense, bench.calib_paths[args.calibrate_on], args.samples),
        shears_flags=tuple(rest),
    )
    out = args.work_dir / "out"
    result = run_shears(job, out, args.work_dir / "probe.log", bench.weight_names)
    if result.status == "ok":
        from shears.pruning.evaluate import perplexity_of_folder

        result.ppl = {d: perplexity_of_folder(out, w.evaluation).ppl for d, w in bench.windows.items()}
    shutil.rmtree(out, ignore_errors=True)
    line = {"calibrated_on": args.calibrate_on, "pattern": args.pattern, "method": method, "flags": rest}
    print(json.dumps({**line, "status": result.status, "prune_s": result.prune_s, "ppl": result.ppl}))
    return 0 if result.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
