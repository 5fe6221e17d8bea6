"""SmolLM2-135M pruned with fp32 and bf16 block forwards: the perplexities must agree within noise.

Issue 11's defect 1 (an fp32 block output squared in place while measuring the block's error) only
showed on the fp32 path; this runs Wanda 50% and SparseGPT 2:4 with `--compute-dtype float32` and
`bfloat16` on the same calibration and evaluation windows, through the `shears prune` CLI (each
job its own process), and scores every output once more with one function in fp32
(`perplexity_of_folder`), so the masks are compared, not the forward's rounding.

    PYTHONPATH=$PWD .venv/bin/python bench/compute_dtype.py  # 16 x 512 calibration, 8,192 held-out tokens
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "smollm2-compute-dtype.json"
RUNS = [("wanda", "unstructured"), ("sparsegpt", "2:4")]
DTYPES = ["float32", "bfloat16"]


def fp32_perplexity(folder: Path, windows_file: Path) -> float:
    import torch
    from safetensors.torch import load_file

    from shears.pruning.evaluate import perplexity_of_folder

    ids = load_file(windows_file)["input_ids"]
    return perplexity_of_folder(folder, ids, device=torch.device("cpu")).ppl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--methods", default="wanda,sparsegpt", help="comma list of wanda, sparsegpt")
    args = parser.parse_args()
    runs = [(method, pattern) for method, pattern in RUNS if method in args.methods.split(",")]
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as work:
        jobs = []
        for method, pattern in runs:  # the jobs run side by side, each its own process
            for dtype in DTYPES:
                out = Path(work) / f"{method}-{pattern.replace(':', '-')}-{dtype}"
                command = [
                    sys.executable, "-m", "shears", "prune", "smollm2-135m", "--out", str(out),
                    "--method", method, "--pattern", pattern, "--sparsity", "0.5",
                    "--samples", str(args.samples), "--seqlen", str(args.seqlen),
                    "--eval-seqlen", str(args.seqlen), "--eval-tokens", str(args.eval_tokens),
                    "--compute-dtype", dtype, "--quiet",
                ]  # fmt: skip
                row = {"method": method, "pattern": pattern, "compute_dtype": dtype}
                jobs.append((row, out, time.monotonic(), subprocess.Popen(command, env=env)))
        rows = []
        for row, out, start, process in jobs:
            if process.wait() != 0:
                raise SystemExit(f"{row}: shears prune exited with {process.returncode}")
            ppl = json.loads((out / "manifest.json").read_text())["perplexity"]
            row |= {"dense_ppl": ppl["dense"], "pruned_ppl": ppl["pruned"]}
            row["wall_s_side_by_side"] = round(time.monotonic() - start, 1)
            rows.append((row, out))
        # Every output scored once more by one fp32 function on the engine's own windows.
        windows = Path(work) / "eval.safetensors"
        _save_eval_windows(rows[0][1], windows)
        for row, out in rows:
            row["pruned_ppl_fp32_scored"] = fp32_perplexity(out, windows)
            print(json.dumps(row), flush=True)
    result = {
        "machine": "2-core Xeon with AMX, shared with other jobs (load average ~11), CPU only",
        "command": f"bench/compute_dtype.py --samples {args.samples} --seqlen {args.seqlen} "
        f"--eval-tokens {args.eval_tokens} --methods {args.methods}",
        "runs": [row for row, _ in rows],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


def _save_eval_windows(out: Path, path: Path) -> None:
    """The engine's evaluation windows, rebuilt from the request in the output's manifest."""
    from shears.calibration.windows import load_windows, save_windows
    from shears.pruning.config import PruneRequest
    from shears.pruning.models import LazyTokenizer

    request = PruneRequest.model_validate(json.loads((out / "manifest.json").read_text())["request"])
    windows = load_windows(request.calibration, request.evaluation, LazyTokenizer(out))
    save_windows(path, windows.evaluation)


if __name__ == "__main__":
    main()
