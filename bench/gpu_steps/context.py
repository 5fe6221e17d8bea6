"""A step's context: its mode, deadline and partial results (no torch: the parent imports it too).

A step runs in its own child process (bench/gpu_check.py starts it) and records what it measures as it
goes: every `set`/`add` rewrites the step's part file atomically, so a step killed at its time box
still leaves everything it finished. Sub-items that fail are recorded as problems and the step goes on.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.gpu_steps import DEFAULT_MAX_CONFIGS, FORBIDDEN

if TYPE_CHECKING:
    import torch


@dataclass
class StepContext:
    name: str
    mode: str  # "gpu": real sizes on the CUDA device; "dry": tiny sizes, CPU, Triton interpreter
    part: Path  # where the partial result is written
    deadline: float  # time.time() after which the step should stop starting new work
    max_configs: int = DEFAULT_MAX_CONFIGS
    result: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def dry(self) -> bool:
        return self.mode == "dry"

    @property
    def device(self) -> torch.device:
        import torch

        return torch.device("cpu" if self.dry else "cuda")

    def left(self) -> float:
        """Seconds until the step's soft deadline."""
        return self.deadline - time.time()

    def out_of_time(self, needed: float = 0.0) -> bool:
        return self.left() < needed

    def set(self, key: str, value: Any) -> None:
        self.result[key] = value
        self.save()

    def add(self, key: str, item: Any) -> None:
        self.result.setdefault(key, []).append(item)
        self.save()

    def problem(self, message: str) -> None:
        self.problems.append(message[:2000])
        print(f"[{self.name}] problem: {message[:500]}", flush=True)
        self.save()

    def attempt(self, label: str, fn: Callable[[], Any]) -> Any:
        """fn(), or None with the failure recorded as a problem (the step goes on)."""
        try:
            return fn()
        except Exception as exc:
            self.problem(f"{label}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")
            return None

    def save(self) -> None:
        payload = {
            "result": self.result,
            "problems": self.problems,
            "forbidden_imported": forbidden_imported(),
            "updated": time.time(),
        }
        write_json_atomic(self.part, payload)


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def forbidden_imported() -> list[str]:
    return sorted({name.split(".")[0] for name in sys.modules} & set(FORBIDDEN))
