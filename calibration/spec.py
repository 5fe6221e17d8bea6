"""The calibration and evaluation parts of a job request (parsed where the request arrives)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from shears.schema import Strict


class CalibrationSpec(Strict):
    source: str = Field(
        "builtin",
        max_length=1024,
        description="'builtin', 'self', 'hf:<dataset>[:<config>[:<split>]]', 'upload:<id>' or a local "
        ".txt/.jsonl/.parquet path",
    )
    samples: Annotated[int, Field(ge=1, le=4096)] = 128
    seqlen: Annotated[int, Field(ge=8, le=32768)] = 512
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    text_column: str | None = Field(
        None, max_length=256, description="column holding the text in .jsonl/.parquet/hf sources"
    )
    batch_size: Annotated[int, Field(ge=1, le=256)] = 8


class EvaluationSpec(Strict):
    enabled: bool = True
    source: str | None = Field(
        None, max_length=1024, description="held-out text source; default: the calibration source"
    )
    seqlen: Annotated[int, Field(ge=8, le=32768)] = 512
    max_tokens: Annotated[int, Field(ge=64, le=10_000_000)] = 20480
