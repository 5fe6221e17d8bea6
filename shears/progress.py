"""Progress events the engine emits; the CLI draws them as a bar, the server stores them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Phase = Literal[
    "loading",
    "calibrating",
    "pruning",
    "evaluating",
    "saving",
    "verifying",
    "benchmarking",
    "compatibility",  # the verify_runtimes phase (the store keeps phases in 16 characters)
]


@dataclass(frozen=True)
class Event:
    kind: Literal["phase", "progress", "log", "result", "resumed"]
    phase: Phase | None = None
    done: int | None = None
    total: int | None = None
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Reporter = Callable[[Event], None]


def silent(_: Event) -> None:
    """A reporter that drops every event."""
