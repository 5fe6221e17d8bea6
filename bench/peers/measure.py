"""Measure a child process (wall time, peak RSS) and what it wrote (sparsity of the pruned layers).

Both tools are measured by this same code, from the outside, so neither reports its own memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from shears.pruning.checkpoint import Checkpoint
from shears.pruning.skeleton import find_blocks, num_layers


@dataclass(frozen=True)
class ChildRun:
    argv: list[str]
    returncode: int
    wall_s: float  # process start to exit, everything included
    peak_rss_mb: float  # ru_maxrss from wait4: the child (or its largest reaped descendant), MiB
    log: Path  # stdout and stderr, interleaved

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


# A small process between the harness and the tool. Linux starts a child's ru_maxrss at the RSS of the
# process it was forked from (the high-water mark of the copied address space is carried over at exec),
# so forking the tool straight from the harness, which holds torch and evaluation tensors, would add
# the harness's own RSS to every measurement. Forked from this launcher (python -S, ~10 MiB), the
# carried-over floor is the same few MiB for both tools. It waits for the tool with os.wait4 and
# writes the tool's wall time and rusage as JSON to the file named by its first argument.
_LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as out:
    json.dump({"exit": os.waitstatus_to_exitcode(status), "wall_s": wall, "maxrss_kib": usage.ru_maxrss}, out)
"""


def run_child(
    argv: list[str], log: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> ChildRun:
    """Run `argv` to completion; its wall time and peak RSS as /usr/bin/time -v would report them.

    The rusage comes from os.wait4 on the tool's own process: ru_maxrss is its peak resident set,
    or that of a descendant it waited for if that one was larger (Linux reports KiB). No polling,
    so short peaks are not missed.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    usage_file = log.with_suffix(".rusage.json")
    usage_file.unlink(missing_ok=True)
    with log.open("wb") as sink:
        launcher = subprocess.run(
            [sys.executable, "-S", "-c", _LAUNCHER, str(usage_file), *argv],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            check=False,
        )
    if launcher.returncode != 0 or not usage_file.is_file():
        raise RuntimeError(f"launcher failed (exit {launcher.returncode}) for {argv[:3]}...; see {log}")
    usage = json.loads(usage_file.read_text())
    return ChildRun(argv, usage["exit"], usage["wall_s"], usage["maxrss_kib"] / 1024, log)


def pruned_weight_names(dense_folder: Path) -> list[str]:
    """The weights both tools prune: every nn.Linear inside a decoder block (not lm_head, not embeddings).

    Found the way Shears finds blocks (the ModuleList of num_hidden_layers same-class modules), on a
    model built on the meta device, so nothing is loaded.
    """
    config = AutoConfig.from_pretrained(dense_folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    prefix, blocks = find_blocks(model, num_layers(config))
    return [
        f"{prefix}.{index}.{name}.weight"
        for index, block in enumerate(blocks)
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    ]


def folder_sparsity(folder: Path, names: list[str]) -> float:
    """Fraction of exact zeros over the weights `names`, read from the folder's safetensors files."""
    checkpoint = Checkpoint(Path(folder))
    zeros = total = 0
    for name in names:
        weight = checkpoint.load([name])[name]
        zeros += int((weight == 0).sum())
        total += weight.numel()
    if total == 0:
        raise ValueError(f"{folder}: none of the {len(names)} pruned weights found")
    return zeros / total


def parameter_count(folder: Path) -> int:
    checkpoint = Checkpoint(Path(folder))
    return sum(int(torch.Size(shape).numel()) for shape in checkpoint.shapes.values())
