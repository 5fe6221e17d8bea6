"""Per-shape choice between Shears' Triton kernels, dense torch matmul and torch's semi-structured 2:4.

On a GPU the first call of every (layout, N, K, M bucket, dtype, device, density) times each candidate
(every tuned Triton launch, dense cuBLAS from an unpacked copy, torch.sparse semi-structured where the
GPU has sparse tensor cores) and caches the fastest, so a packed layer is never slower than dense by
more than measurement noise. Dense and semi-structured need a second copy of the weight: a
PackedOperand keeps one only while some cached choice uses it (`allow_dense=False` trades prefill
speed for memory). On the CPU: the Triton kernels under TRITON_INTERPRET=1, otherwise dense torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from shears.kernels.configs import KernelConfig, candidate_configs, interpreter_config, interpreting, m_bucket
from shears.kernels.formats import PackedWeight
from shears.kernels.reference import tolerance
from shears.kernels.registry import FORMATS, format_of, reference_matmul


@functools.cache
def triton_status() -> str | None:
    """None if Shears' Triton kernels can run here, else why not."""
    try:
        for record in FORMATS.values():
            record.kernel_module()
    except Exception as exc:  # ImportError, or a triton that fails to initialise
        return f"triton unavailable: {exc}"
    return None


def semi_structured_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


class PackedOperand:
    """A packed weight on its device, plus what the dispatcher derives from it (made on first use)."""

    def __init__(self, packed: PackedWeight):
        self.packed = packed
        self.format = format_of(packed)
        self._derived: dict[str, torch.Tensor | None] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape

    def family(self) -> tuple:
        """Everything the best backend depends on except M."""
        p = self.packed
        return (p.layout, p.detail, *p.shape, str(p.dtype), str(p.device))

    def dense(self) -> torch.Tensor:
        if self._derived.get("dense") is None:
            self._derived["dense"] = self.format.unpack(self.packed)
        return self._derived["dense"]  # type: ignore[return-value]

    def semi(self) -> torch.Tensor | None:
        """torch's semi-structured 2:4 copy, or None where this GPU, dtype or shape has none."""
        if "semi" not in self._derived:
            self._derived["semi"] = None
            p = self.packed
            if (
                p.nm == (2, 4)
                and semi_structured_supported(p.device)
                and p.dtype in (torch.float16, torch.bfloat16)
            ):
                try:
                    from torch.sparse import to_sparse_semi_structured

                    self._derived["semi"] = to_sparse_semi_structured(self.format.unpack(p))
                except (RuntimeError, ValueError, NotImplementedError):
                    pass
        return self._derived["semi"]

    def kernel_state(self) -> torch.Tensor | None:
        """What the layout's kernel derives from the weight once (bitmask: chunk offsets), or None."""
        if "state" not in self._derived:
            prepare = getattr(self.format.kernel_module(), "prepare", None)
            self._derived["state"] = prepare(self.packed) if prepare is not None else None
        return self._derived["state"]

    def keep_only(self, backends: set[str]) -> None:
        """Free derived copies no cached choice uses (the kernel state stays: the kernels need it)."""
        for name in ("dense", "semi"):
            if name not in backends and self._derived.get(name) is not None:
                del self._derived[name]

    def resident_bytes(self) -> int:
        """Bytes this weight holds on its device: packed tensors plus every derived copy."""
        total = self.packed.nbytes
        for name, t in self._derived.items():
            if t is None:
                continue
            # A semi-structured tensor reports its dense numel; its storage is its inner tensors.
            parts = [getattr(t, inner) for inner in t.__tensor_flatten__()[0]] if name == "semi" else [t]
            total += sum(p.numel() * p.element_size() for p in parts if isinstance(p, torch.Tensor))
        return total


@dataclass
class Choice:
    backend: str  # "triton", "dense", "semi" or "reference"
    config: KernelConfig | None = None
    timings_us: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"triton:{self.config}" if self.backend == "triton" else self.backend

    def as_dict(self) -> dict:
        return {
            "backend": self.backend,
            "config": self.config.as_dict() if self.config else None,
            "timings_us": self.timings_us,
            "errors": self.errors,
        }


class Dispatcher:
    def __init__(
        self,
        *,
        measure: bool = True,
        allow_dense: bool = True,
        allow_semi: bool = True,
        warmup: int = 3,
        runs: int = 20,
        max_configs: int | None = None,
    ):
        self.measure, self.allow_dense, self.allow_semi = measure, allow_dense, allow_semi
        self.warmup, self.runs = warmup, runs
        self.max_configs = max_configs  # tune over the first N launches of each kernel (None: all)
        self.choices: dict[tuple, Choice] = {}

    def matmul(self, x: torch.Tensor, op: PackedOperand) -> torch.Tensor:
        """y [M, N] = x [M, K] @ W^T by the best backend for this shape (x in the weight's dtype)."""
        return self.run(self.choose(x, op), x, op)

    def choose(self, x: torch.Tensor, op: PackedOperand) -> Choice:
        key = (*op.family(), m_bucket(x.shape[0]))
        choice = self.choices.get(key)
        if choice is None:
            choice = self._decide(x, op)
            capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            if capturing:
                return choice  # untimed fallback: decide for real on the next eager call
            self.choices[key] = choice
            op.keep_only(self._backends_for(op.family()))
        return choice

    def run(self, choice: Choice, x: torch.Tensor, op: PackedOperand) -> torch.Tensor:
        if choice.backend == "triton":
            return _run_triton(x, op, choice.config)
        if choice.backend == "dense":
            return F.linear(x, op.dense())
        if choice.backend == "semi":
            return F.linear(x, op.semi())
        return op.format.reference(x, op.packed)

    def report(self) -> list[dict]:
        return [{"key": list(key), **choice.as_dict()} for key, choice in self.choices.items()]

    def _backends_for(self, family: tuple) -> set[str]:
        return {c.backend for k, c in self.choices.items() if k[: len(family)] == family}

    def _kernel_supported(self, x: torch.Tensor, op: PackedOperand) -> bool:
        if triton_status() is not None or x.dtype != op.packed.dtype:
            return False
        return op.format.kernel_module().supports(op.packed, x.dtype)

    def _fallback(self) -> Choice:
        return Choice("dense" if self.allow_dense else "reference")

    def _decide(self, x: torch.Tensor, op: PackedOperand) -> Choice:
        rows, cols = op.shape
        m = x.shape[0]
        kernel = self._kernel_supported(x, op)
        if x.device.type != "cuda":
            if kernel and interpreting():  # `kernel`: triton loaded, so it runs interpreted
                return Choice("triton", interpreter_config(m, op.format.launches))
            return self._fallback()
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        launches = op.format.launches
        nm = op.packed.nm
        configs = candidate_configs(rows, cols, m, launches, sms, nm, self.max_configs) if kernel else []
        if not self.measure or torch.cuda.is_current_stream_capturing():
            return Choice("triton", configs[0]) if configs else self._fallback()
        return self._measure(x, op, configs)

    def _measure(self, x: torch.Tensor, op: PackedOperand, configs: list[KernelConfig]) -> Choice:
        from shears.kernels.timing import gpu_time_us

        candidates = [Choice("triton", config) for config in configs]
        if self.allow_dense or not candidates:
            candidates.append(Choice("dense"))
        if self.allow_semi and op.semi() is not None:
            candidates.append(Choice("semi"))
        timings: dict[str, float] = {}
        errors: dict[str, str] = {}
        for candidate in candidates:
            try:
                timings[candidate.label] = gpu_time_us(
                    lambda c=candidate: self.run(c, x, op), x.device, warmup=self.warmup, runs=self.runs
                )
            except Exception as exc:  # a launch that does not fit this GPU (shared memory, registers)
                errors[candidate.label] = f"{type(exc).__name__}: {exc}"[:300]
        # Fastest first; a Triton launch must also agree with the reference before it is trusted.
        for best in sorted((c for c in candidates if c.label in timings), key=lambda c: timings[c.label]):
            if best.backend != "triton" or self._agrees(best, x, op, errors):
                return Choice(best.backend, best.config, timings, errors)
        return Choice("reference", timings=timings, errors=errors)

    def _agrees(self, candidate: Choice, x: torch.Tensor, op: PackedOperand, errors: dict[str, str]) -> bool:
        got = self.run(candidate, x, op).float()
        want = reference_matmul(x.float(), op.packed)
        error = float((got - want).abs().max()) / (float(want.abs().max()) or 1.0)
        if error <= 2 * tolerance(x.dtype):
            return True
        errors[candidate.label] = f"relative error {error:.3g} against the reference: not used"
        return False


def _run_triton(x: torch.Tensor, op: PackedOperand, config: KernelConfig | None) -> torch.Tensor:
    assert config is not None
    return op.format.kernel_module().matmul(x, op.packed, config, op.kernel_state())


_DEFAULT: Dispatcher | None = None


def default_dispatcher() -> Dispatcher:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Dispatcher()
    return _DEFAULT
