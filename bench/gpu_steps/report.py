"""gpu-check.md: the JSON report as Markdown tables (pure Python; tolerant of partial results)."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10**-digits or value == 0 else f"{value:.2e}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def _result(report: dict[str, Any], name: str) -> dict[str, Any]:
    return report["steps"].get(name, {}).get("result") or {}


def _summary(report: dict[str, Any]) -> list[str]:
    targets = _result(report, "summary").get("targets", [])
    met = {True: "met", False: "MISSED", None: "n/a"}
    rows = [[t["target"], t["goal"], t["value"], met[t["met"]], t["detail"]] for t in targets]
    return ["## Summary against the targets", "", *_table(["target", "goal", "value", "met", "detail"], rows)]


def _header(report: dict[str, Any]) -> list[str]:
    device = report.get("device") or {}
    mode = (
        "DRY RUN (tiny shapes, CPU, Triton interpreter: timings are not measurements)"
        if report["mode"] == "dry"
        else "GPU"
    )
    lines = [
        "# Shears GPU check",
        "",
        f"- mode: {mode}" + (f"; {report['dry_reason']}" if report.get("dry_reason") else ""),
        f"- device: {device.get('name', 'unknown')}; started {report['started']} UTC; "
        f"wall {_fmt(report.get('wall_s'), 1)} s of a {_fmt(report.get('budget_s'), 0)} s budget",
        f"- command: `{report['command']}`",
    ]
    if report.get("forbidden_imported"):
        lines.append(f"- IMPORTED MODULES THE GPU MACHINE LACKS: {report['forbidden_imported']}")
    rows = [
        [
            name,
            entry.get("status"),
            entry.get("seconds"),
            entry.get("cpu_s"),
            entry.get("time_box_s"),
            len(entry.get("problems", [])),
        ]
        for name, entry in report["steps"].items()
    ]
    return [*lines, "", *_table(["step", "status", "seconds", "CPU s", "time box s", "problems"], rows)]


def _environment(report: dict[str, Any]) -> list[str]:
    result = _result(report, "environment")
    if not result:
        return []
    device = result.get("device") or {}
    smi = device.get("nvidia_smi") or {}
    lines = ["## 1. Environment", "", f"- device: {device.get('name')}"]
    if device.get("memory_bytes"):
        lines[-1] += (
            f", capability {device.get('capability')}, {device.get('sms')} SMs, "
            f"{_fmt(device['memory_bytes'] / 2**30, 1)} GiB; driver {smi.get('driver_version')}; "
            f"CUDA {device.get('torch_cuda')}; cuSPARSELt {device.get('cusparselt')}"
        )
    lines.append(f"- Shears imported from: {result.get('imported_from')}")
    versions = result.get("versions") or {}
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append(f"- triton: {result.get('triton_status')}; absent packages: {result.get('absent_packages')}")
    base = result.get("baselines") or {}
    if base:
        lines.append(
            f"- baselines: bf16 matmul {base['bf16_matmul_side']}^3 "
            f"{_fmt(base['bf16_matmul_tflops'], 1)} TFLOP/s; "
            f"device copy {base['copy_mib']} MiB {_fmt(base['copy_gb_per_s'], 0)} GB/s (read + write)"
        )
    return [*lines, ""]


def _correctness(report: dict[str, Any]) -> list[str]:
    result = _result(report, "correctness")
    if not result:
        return []
    lines = ["## 2. Kernel correctness", ""]
    parts = {k: len(result.get(k, [])) for k in ("selfcheck", "launches", "sparse_linear")}
    lines.append(
        f"- {result.get('checks', sum(parts.values()))} checks ({parts}); "
        f"all within tolerance: {_fmt(result.get('all_ok'))}"
    )
    failed = result.get("failed", [])
    if failed:
        rows = [
            [
                f.get("case"),
                f.get("dtype"),
                f.get("shape") or f.get("input_shape"),
                f.get("m"),
                f.get("config"),
                f.get("relative_error"),
                f.get("error"),
            ]
            for f in failed[:30]
        ]
        lines += ["", *_table(["case", "dtype", "shape", "M", "config", "rel. error", "error"], rows)]
    return [*lines, ""]


def _speed(report: dict[str, Any]) -> list[str]:
    result = _result(report, "kernel_speed")
    rows = result.get("rows", [])
    if not rows:
        return []
    header = [
        "shape",
        "N x K",
        "layout",
        "M",
        "Shears us",
        "launch",
        "dense us",
        "semi 2:4 us",
        "dispatch",
        "dispatch us",
        "x Shears",
        "x semi",
        "x dispatch",
        "correct",
    ]
    table = [
        [
            r["shape_name"],
            "x".join(map(str, r["shape"])),
            r["layout"],
            r["m"],
            r.get("shears_us"),
            r.get("shears_config"),
            r.get("dense_us"),
            r.get("semi_us"),
            r.get("dispatch"),
            r.get("dispatch_us"),
            r.get("speedup_shears"),
            r.get("speedup_semi"),
            r.get("speedup_dispatch"),
            r.get("correct", r.get("error")),
        ]
        for r in rows
    ]
    lines = ["## 3. Kernel speed (bf16, microseconds, median; x = dense / this)", ""]
    lines.append(
        f"- {len(rows)} of {result.get('planned', len(rows))} rows measured; "
        f"launch candidates per kernel kind: {result.get('max_configs_per_kernel')}"
    )
    return [*lines, "", *_table(header, table)]


def _decode(report: dict[str, Any]) -> list[str]:
    result = _result(report, "decode")
    if "dense" not in result:
        return []
    model = result.get("model", {})
    lines = ["## 4. End-to-end decode (2:4, bf16, greedy)", ""]
    lines.append(
        f"- model: {model.get('shape')} ({model.get('num_hidden_layers')} layers, "
        f"hidden {model.get('hidden_size')}), {result.get('prompt_tokens')} prompt tokens, "
        f"{result.get('new_tokens')} new"
    )
    rows = [
        [
            name,
            result[name].get("tokens_per_s"),
            result[name].get("cuda_graph"),
            result.get(f"{name}_weight_bytes"),
            result[name].get("graph_error"),
        ]
        for name in ("dense", "packed")
        if name in result
    ]
    lines += ["", *_table(["run", "tokens/s", "CUDA graph", "weight bytes", "graph error"], rows)]
    lines.append(
        f"- speedup {_fmt(result.get('speedup'))}; first-step logits differ by "
        f"{_fmt(result.get('first_logits_relative_diff'))} of their largest; tokens agree "
        f"{_fmt(result.get('tokens_agree'))} (first {result.get('agreeing_prefix')} in a row)"
    )
    return [*lines, ""]


def _pruning(report: dict[str, Any]) -> list[str]:
    result = _result(report, "pruning_speed")
    variants = [
        result[name]
        for name in ("wanda", "sparsegpt", "sparsegpt-paper")
        if isinstance(result.get(name), dict)
    ]
    if not variants:
        return []
    model = result.get("model", {})
    calib = result.get("calibration", {})
    lines = ["## 5. Pruning speed (50% unstructured; model time EXTRAPOLATED from the blocks measured)", ""]
    lines.append(
        f"- model: {model.get('shape')} (hidden {model.get('hidden_size')}, "
        f"{model.get('num_hidden_layers')} blocks); calibration {calib.get('samples')} x "
        f"{calib.get('seqlen')} random tokens, batches of {calib.get('batch_size')}; "
        f"capture {_fmt(result.get('capture_s'))} s"
    )
    rows = []
    for v in variants:
        blocks = v.get("blocks", [])
        peak = v.get("peak_gpu_bytes", v.get("peak_rss_bytes"))
        rows.append(
            [
                v["variant"],
                v.get("refine_iterations"),
                ", ".join(_fmt(b["seconds"]) for b in blocks),
                ", ".join(
                    f"{_fmt(b['statistics_s'])}/{_fmt(b['solve_s'])}/{_fmt(b['propagate_s'])}" for b in blocks
                ),
                v.get("steady_block_s"),
                v.get("extrapolated_model_s"),
                _fmt((peak or 0) / 2**30),
                max((b["output_error"] or 0 for b in blocks), default=None),
            ]
        )
    header = [
        "variant",
        "CG iters",
        "block s",
        "stats/solve/propagate s",
        "steady block s",
        "model s (extrapolated)",
        "peak GiB",
        "max output error",
    ]
    return [*lines, "", *_table(header, rows)]


def _problems(report: dict[str, Any]) -> list[str]:
    lines = []
    for name, entry in report["steps"].items():
        for problem in entry.get("problems", [])[:10]:
            lines.append(f"- {name}: " + problem.strip().splitlines()[0][:300])
        if entry.get("error"):
            lines.append(f"- {name}: {entry['error'][:300]}")
    return ["## Problems", "", *lines, ""] if lines else []


def render_markdown(report: dict[str, Any], summary_only: bool = False) -> str:
    parts = _header(report) + _summary(report)
    if not summary_only:
        for section in (_environment, _correctness, _speed, _decode, _pruning, _problems):
            try:
                parts += section(report)
            except Exception as exc:  # a partial result must not stop the report
                parts += [f"({section.__name__.strip('_')}: cannot render: {type(exc).__name__}: {exc})", ""]
    return "\n".join(parts) + "\n"


def write_chart(report: dict[str, Any], path: Any) -> str | None:
    """gpu-check.png: step 3's speedups over dense per shape and layout (kernels.chart), or why not."""
    rows = [r for r in _result(report, "kernel_speed").get("rows", []) if "error" not in r]
    if not rows:
        return "no kernel rows"
    from shears.kernels.chart import write_chart as draw

    kernels = [
        {**r, "layer": r["shape_name"], "pattern": "2:4" if r["layout"] == "2:4" else "unstructured"}
        for r in sorted(rows, key=lambda r: r["m"])
    ]
    name = (report.get("device") or {}).get("name", "GPU")
    return draw({"kernels": kernels, "device": {"name": name}}, path)
