"""What one resume checkpoint costs (pruning.resume.Checkpoints.save): the activations a job holds
between blocks written, fsynced and hashed. Default shapes: SmolLM2-135M (hidden 576) with the server's
default 128 x 512 calibration windows (CPU batches of 2) and 40 x 512 evaluation windows, in bf16.

    PYTHONPATH=$PWD .venv/bin/python -m bench.checkpoint_cost [--hidden 576] [--saves 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from shears.pruning.resume import Checkpoints, Progress
from shears.pruning.shards import ShardWriter
from shears.pruning.streaming import Batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--saves", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as root:
        checkpoints = Checkpoints.acquire(Path(root) / "checkpoints")
        assert checkpoints is not None
        shape = (2, args.seqlen, args.hidden)
        calib = [Batch(torch.randn(shape).to(torch.bfloat16), []) for _ in range(args.samples // 2)]
        evaluation = [Batch(torch.randn(shape).to(torch.bfloat16), []) for _ in range(args.eval_windows // 2)]
        streams = {"calib": calib, "dense_eval": evaluation, "pruned_eval": [b.clone() for b in evaluation]}
        writer = ShardWriter(checkpoints.work, [], hashing=True)
        seconds = []
        for block in range(1, args.saves + 1):
            start = time.perf_counter()
            checkpoints.save(block, writer, streams, Progress(0, {}, [], []), print)
            seconds.append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in (Path(root) / "checkpoints").glob("activations-*"))
        print(f"{size / 2**20:.0f} MiB per checkpoint; seconds per save: {[round(s, 2) for s in seconds]}")


if __name__ == "__main__":
    main()
