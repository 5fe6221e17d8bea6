"""The pruning request: one pydantic model shared by the CLI, the engine and the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    PlainSerializer,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)

from shears.calibration.spec import CalibrationSpec, EvaluationSpec
from shears.pattern import Pattern
from shears.pruning.layer_regex import MAX_COUNT, MAX_LENGTH, compile_layer_regex
from shears.pruning.methods import METHODS, NO_METHOD
from shears.pruning.structure.spec import StructureSpec
from shears.schema import Strict

__all__ = ["CalibrationSpec", "EngineOptions", "EvaluationSpec", "PruneRequest", "StructureSpec"]

# The method names come from the registry (pruning.methods); a Literal so the schema lists them.
# ...plus NO_METHOD ("none"): only the request's structure prunes.
MethodName = Literal[(*METHODS, NO_METHOD)]  # type: ignore[valid-type]
OutputFormat = Literal["dense", "packed"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
RuntimeName = Literal["vllm"]  # runtimes a job can check its output in (pruning.runtimes.RUNTIMES)


# A pattern is parsed once, here, and travels inward as a Pattern; JSON keeps the text form.
PatternField = Annotated[
    Pattern,
    BeforeValidator(Pattern.parse),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {"type": "string", "pattern": r"^(unstructured|\d+:\d+)$", "examples": ["unstructured", "2:4"]}
    ),
]


LayerRegex = Annotated[str, Field(max_length=MAX_LENGTH)]


class OwlSpec(Strict):
    """Outlier-weighted layer-wise sparsity (Yin et al. 2024): blocks with more outliers are pruned less."""

    threshold: Annotated[float, Field(gt=0)] = 5.0
    lam: Annotated[float, Field(ge=0, lt=1)] = 0.08


def _no_schema_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


class CorrectionSpec(Strict):
    """Block-level error correction: each layer is fitted to the dense model's outputs for the same
    tokens (its inputs taken from the pruned model, after the layer groups before it were pruned and
    corrected), so errors stop compounding through depth. Applies to methods that collect the
    Hessian; it already works group by group, so true_sequential is refused beside it."""

    damp: Annotated[float, Field(gt=0, lt=10)] = Field(
        0.01,
        description="ridge towards the uncorrected target, relative to mean(diag H): how far the "
        "correction may move each layer on the calibration tokens' evidence",
    )


class _Request(Strict):
    """A pruning job: what to prune, how, and what to write."""

    model: str = Field(..., min_length=1, max_length=512, examples=["smollm2-135m"])
    revision: str | None = Field(None, max_length=128)
    method: MethodName = Field(
        ...,
        description="; ".join(f"{name}: {entry.summary}" for name, entry in METHODS.items())
        + f"; {NO_METHOD}: no weights zeroed, only the structure prunes (needs a structure)",
    )
    # Optional but with no documented default: null is valid only with an N:M pattern or method 'none'.
    sparsity: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None,
        description="fraction of weights to zero; implied by an N:M pattern; none for method 'none'",
        json_schema_extra=_no_schema_default,
    )
    # The JSON schema shows the default as written in a request (pydantic would dump the dataclass).
    pattern: PatternField = Field(Pattern(), json_schema_extra={"default": "unstructured"})
    calibration: CalibrationSpec = CalibrationSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    ignore: list[LayerRegex] = Field(
        default_factory=lambda: [r"(^|\.)lm_head$"],
        max_length=MAX_COUNT,
        description="regexes (RE2 syntax) of layer names left dense",
    )
    overrides: dict[LayerRegex, Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=dict,
        max_length=MAX_COUNT,
        description="regex (RE2 syntax) of layer name -> sparsity (unstructured only)",
    )
    owl: OwlSpec | None = None
    true_sequential: bool = False
    error_correction: CorrectionSpec | None = Field(
        None, description="block-level error correction (null: each layer fitted to its own inputs)"
    )
    dtype: DType = Field("auto", description="dtype of the output weights; 'auto' keeps the model's")
    compute_dtype: DType = Field(
        "auto", description="dtype of block forwards; 'auto' is bf16 on GPUs and on CPUs with AMX/AVX512-BF16"
    )
    device: Device = "auto"
    formats: list[OutputFormat] = Field(default_factory=lambda: ["dense"], min_length=1)
    benchmark: bool = False
    verify_runtimes: list[RuntimeName] = Field(
        default_factory=list,
        description="runtimes that must load the output and decode greedy tokens as transformers does; "
        "the result is the manifest's `compatibility` (needs the runtime installed by the operator)",
    )
    structure: StructureSpec | None = Field(
        None, description="remove layers, MLP channels, head groups or experts before the method runs"
    )

    @model_validator(mode="before")
    @classmethod
    def _implied_sparsity(cls, data: object) -> object:
        """An N:M pattern implies its sparsity (the CLIs computed it; HTTP users need not)."""
        if isinstance(data, dict) and data.get("sparsity") is None and data.get("method") != NO_METHOD:
            try:
                implied = Pattern.parse(data.get("pattern", "unstructured")).sparsity
            except ValueError:
                return data  # the pattern field reports it
            if implied is not None:
                return {**data, "sparsity": implied}
        return data

    @property
    def method_options(self) -> Strict | None:
        """The chosen method's options block, or None if the method takes none."""
        entry = METHODS.get(self.method)
        return getattr(self, self.method) if entry is not None and entry.options is not None else None

    @field_validator("ignore")
    @classmethod
    def _ignore(cls, value: list[str]) -> list[str]:
        for rx in value:
            compile_layer_regex(rx, "ignore")
        return value

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, value: dict[str, float]) -> dict[str, float]:
        for rx in value:
            compile_layer_regex(rx, "overrides")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> _Request:
        pattern = self.pattern
        if self.method == NO_METHOD:
            self._check_structure_only()
            return self
        if self.sparsity is None:
            raise ValueError(f"sparsity is required for method {self.method!r} with an unstructured pattern")
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
        if len(set(self.verify_runtimes)) != len(self.verify_runtimes):
            raise ValueError("verify_runtimes names a runtime twice")
        if self.error_correction is not None:
            self._check_correction()
        return self

    def _check_correction(self) -> None:
        """Error correction re-aims a Hessian solve: refused, not silently skipped, where none runs."""
        entry = METHODS.get(self.method)
        statistic = entry.statistic_of(self.method_options) if entry is not None else "none"
        if statistic != "hessian":
            raise ValueError(
                f"error_correction needs a method that solves with the Hessian (sparsegpt, or wanda with "
                f"its re-fit); method {self.method!r} as configured uses {statistic!r}: remove "
                "error_correction or choose such a method"
            )
        if self.true_sequential:
            raise ValueError(
                "error_correction already gathers each layer group's inputs after the groups before it "
                "were pruned (what true_sequential does): drop true_sequential"
            )

    def _check_structure_only(self) -> None:
        """method 'none': structured pruning alone, so every sparsity setting is a mistake."""
        if self.structure is None:
            raise ValueError(
                "method 'none' prunes no weights: give a structure (e.g. structure={'mlp': 0.25}) "
                "or a method (sparsegpt, wanda, magnitude)"
            )
        wrong = [
            name
            for name, given in (
                ("sparsity", self.sparsity is not None),
                ("pattern", self.pattern.structured),
                ("overrides", bool(self.overrides)),
                ("owl", self.owl is not None),
                ("true_sequential", self.true_sequential),
                ("formats 'packed'", "packed" in self.formats),
            )
            if given
        ]
        if wrong:
            raise ValueError(
                f"method 'none' zeroes no weights, so {', '.join(wrong)} cannot apply; remove them"
            )


# The request: the fields above plus one options block per method that has options, named after it
# (`sparsegpt: {...}`), taken from METHODS. A request may carry any of them; its method reads its own.
PruneRequest = create_model(
    "PruneRequest",
    __base__=_Request,
    __module__=__name__,
    __doc__=_Request.__doc__,
    **{
        name: (entry.options, Field(default_factory=entry.options, description=f"options of {name}"))
        for name, entry in METHODS.items()
        if entry.options is not None
    },
)


class OperatorOptions(BaseModel):
    """Settings of the engine an operator chooses for every job, shared by EngineOptions and the
    server's Settings (which declares them from here: one definition, one set of bounds)."""

    allow_pickle: bool = Field(False, description="load .bin/.pt pickle checkpoints (they can run code)")
    trust_remote_code: bool = Field(False, description="run the Python code a model repository ships")
    max_shard_bytes: Annotated[int, Field(ge=1 << 12)] = Field(
        2 << 30, description="the largest weight file written; bigger outputs are sharded with an index"
    )


class EngineOptions(Strict, OperatorOptions):
    """Operator-level settings: what a job may load and where the engine keeps its files.

    Not part of a request: a user of the HTTP API cannot turn these on.
    """

    cache_dir: str | None = Field(
        None, description="model cache; default $SHEARS_HOME/models or ~/.cache/shears"
    )
    uploads_dir: str | None = Field(None, description="where 'upload:<id>' calibration files live")
    allow_local_paths: bool = Field(
        True,
        description="calibration sources may name local files (the server turns this off for HTTP users)",
    )
    runtime_pythons: dict[RuntimeName, str] = Field(
        default_factory=dict,
        description="runtime -> the Python that has it installed (vllm: bench/.venv-vllm/bin/python from "
        "`make vllm-venv`); a job's verify_runtimes phase runs each there, never in the engine's process",
    )
