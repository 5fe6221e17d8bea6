"""The pruning request: one pydantic model shared by the CLI, the engine and the HTTP API."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BeforeValidator,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from shears.calibration.spec import CalibrationSpec, EvaluationSpec
from shears.pattern import Pattern
from shears.schema import Strict

Method = Literal["sparsegpt", "wanda", "magnitude"]
OutputFormat = Literal["dense", "packed"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]


# A pattern is parsed once, here, and travels inward as a Pattern; JSON keeps the text form.
PatternField = Annotated[
    Pattern,
    BeforeValidator(Pattern.parse),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {"type": "string", "pattern": r"^(unstructured|\d+:\d+)$", "examples": ["unstructured", "2:4"]}
    ),
]


class OwlSpec(Strict):
    """Outlier-weighted layer-wise sparsity (Yin et al. 2024): blocks with more outliers are pruned less."""

    threshold: Annotated[float, Field(gt=0)] = 5.0
    lam: Annotated[float, Field(ge=0, lt=1)] = 0.08


class SparseGPTSpec(Strict):
    block_size: Annotated[int, Field(ge=1, le=4096)] = 128
    damp: Annotated[float, Field(gt=0, lt=1)] = 0.01
    refine_iterations: Annotated[int, Field(ge=0, le=1000)] = Field(
        10,
        description="conjugate-gradient iterations re-fitting the kept weights to the final mask "
        "(least squares under the damped Hessian); 0 gives the paper's SparseGPT",
    )


class PruneRequest(Strict):
    model: str = Field(..., min_length=1, max_length=512, examples=["smollm2-135m"])
    revision: str | None = Field(None, max_length=128)
    method: Method
    sparsity: Annotated[float, Field(gt=0, lt=1)]
    pattern: PatternField = Pattern()
    calibration: CalibrationSpec = CalibrationSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    ignore: list[str] = Field(
        default_factory=lambda: [r"(^|\.)lm_head$"], description="regexes of layer names"
    )
    overrides: dict[str, Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=dict, description="regex of layer name -> sparsity (unstructured only)"
    )
    owl: OwlSpec | None = None
    true_sequential: bool = False
    sparsegpt: SparseGPTSpec = SparseGPTSpec()
    dtype: DType = Field("auto", description="dtype of the output weights; 'auto' keeps the model's")
    compute_dtype: DType = Field(
        "auto", description="dtype of block forwards; 'auto' is bf16 on GPUs and on CPUs with AMX/AVX512-BF16"
    )
    device: Device = "auto"
    formats: list[OutputFormat] = Field(default_factory=lambda: ["dense"])
    benchmark: bool = False

    @field_validator("ignore")
    @classmethod
    def _ignore(cls, value: list[str]) -> list[str]:
        for rx in value:
            _compile(rx, "ignore")
        return value

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, value: dict[str, float]) -> dict[str, float]:
        for rx in value:
            _compile(rx, "overrides")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PruneRequest:
        pattern = self.pattern
        if pattern.structured:
            if abs(self.sparsity - pattern.sparsity) > 1e-6:
                raise ValueError(
                    f"pattern {pattern} fixes sparsity at {pattern.sparsity:g}; "
                    f"got sparsity={self.sparsity:g}"
                )
            if self.overrides:
                raise ValueError("per-layer sparsity overrides apply to unstructured patterns only")
            if self.owl is not None:
                raise ValueError("OWL layer-wise sparsity applies to unstructured patterns only")
        if not self.formats:
            raise ValueError("formats must name at least one of 'dense', 'packed'")
        return self


def _compile(rx: str, field: str) -> re.Pattern[str]:
    try:
        return re.compile(rx)
    except re.error as exc:
        raise ValueError(f"{field}: {rx!r} is not a valid regular expression ({exc})") from exc


class EngineOptions(Strict):
    """Operator-level settings: what a job may load and where the engine keeps its files.

    Not part of a request: a user of the HTTP API cannot turn these on.
    """

    cache_dir: str | None = Field(
        None, description="model cache; default $SHEARS_HOME/models or ~/.cache/shears"
    )
    uploads_dir: str | None = Field(None, description="where 'upload:<id>' calibration files live")
    allow_pickle: bool = False
    trust_remote_code: bool = False
    allow_local_paths: bool = Field(
        True,
        description="calibration sources may name local files (the server turns this off for HTTP users)",
    )
    max_shard_bytes: Annotated[int, Field(ge=1 << 12)] = 2 << 30
