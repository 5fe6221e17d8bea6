"""`shears bench FOLDER` and the server's benchmarking phase: bench.json + bench.png in the folder.

On a GPU: for every distinct pruned linear shape and M in M_VALUES, Shears' best kernel launch, dense
cuBLAS and torch's semi-structured 2:4 (where available), timed with CUDA events after warm-up (median,
L2 flushed; see timing.py), the dispatcher's pick, and a correctness check against dense; then
end-to-end decode tokens/s with SparseLinear vs dense (decode_bench.py); and bytes on disk and in
memory. Without a GPU: says so, runs the kernels' correctness checks under the Triton interpreter on
small shapes, and reports sizes only.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from shears.kernels.configs import BITMASK_CHUNK, KernelConfig
from shears.kernels.dispatch import Dispatcher, PackedOperand, triton_status
from shears.kernels.formats import PackedBitmask, PackedWeight
from shears.kernels.registry import format_of, pack
from shears.kernels.selection import MANIFEST, guess_pattern, pattern_text, select_for_packing
from shears.kernels.sparse_file import (
    atomic_write_text,
    dense_tensor_files,
    natural_key,
    read_entries,
    read_packed,
    sparse_files,
)

M_VALUES = (1, 4, 16, 64, 512, 2048)
SCHEMA = "shears.bench/1"


def _emit(
    reporter: Any,
    kind: str,
    message: str = "",
    done: int | None = None,
    total: int | None = None,
    data: dict | None = None,
) -> None:
    if reporter is None:
        return
    from shears.progress import Event

    reporter(Event(kind=kind, phase="benchmarking", done=done, total=total, message=message, data=data or {}))


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "gpu": torch.cuda.is_available(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "triton": None,
    }
    status = triton_status()
    if status is None:
        import triton

        info["triton"] = triton.__version__
    else:
        info["triton_error"] = status
    if info["gpu"]:
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=props.name,
            capability=list(torch.cuda.get_device_capability(0)),
            sms=props.multi_processor_count,
            memory_bytes=props.total_memory,
        )
    else:
        info["name"] = "cpu"
    return info


def memory_bytes(packed: PackedWeight) -> int:
    """Bytes a packed weight occupies on the device, with what the kernels derive (bitmask offsets)."""
    if isinstance(packed, PackedBitmask):
        rows, cols = packed.shape
        return packed.nbytes + rows * -(-cols // BITMASK_CHUNK) * 4
    return packed.nbytes


def _size_row(name: str, entry: dict[str, Any], packed_bytes: int, memory: int) -> dict[str, Any]:
    rows, cols = entry["shape"]
    dense = rows * cols * getattr(torch, entry["dtype"]).itemsize
    pattern = pattern_text(entry["n"], entry["m"])
    return {
        "name": name,
        "shape": [rows, cols],
        "layout": entry["layout"],
        "pattern": pattern,
        "dtype": entry["dtype"],
        "dense_bytes": dense,
        "packed_bytes": packed_bytes,
        "memory_bytes": memory,
        "ratio": packed_bytes / dense if dense else None,
    }


def load_or_pack(
    folder: Path, pattern: tuple[int, int] | None = None, names: list[str] | None = None
) -> tuple[dict[str, PackedWeight], str]:
    """The folder's packed weights: from packed/sparse*.safetensors, else packed in memory: `names` with
    `pattern` (n, m) if given, else what its manifest names, else what fits `pattern` (or a guessed one)."""
    if sparse_files(folder):
        return read_packed(folder), "file"
    if names is None or pattern is None:
        if pattern is None and not (Path(folder) / MANIFEST).exists():
            pattern, names = guess_pattern(folder)
        else:
            pattern, names = select_for_packing(folder, pattern)
    n, m = pattern
    from safetensors import safe_open

    packed: dict[str, PackedWeight] = {}
    sources = dense_tensor_files(folder)
    for name in sorted(names, key=natural_key):
        with safe_open(str(sources[name]), framework="pt") as handle:
            packed[name] = pack(handle.get_tensor(name), n, m, name)
    return packed, "memory"


def size_report(folder: Path, packed: dict[str, PackedWeight], source: str) -> dict[str, Any]:
    from shears.kernels.sparse_file import entry_info

    entries = read_entries(folder) if source == "file" else {}
    layers = []
    for name in sorted(packed, key=natural_key):
        entry = entries.get(name) or entry_info(packed[name])
        layers.append(_size_row(name, entry, packed[name].nbytes, memory_bytes(packed[name])))
    dense = sum(r["dense_bytes"] for r in layers)
    packed_total = sum(r["packed_bytes"] for r in layers)
    files = {
        "dense_files_bytes": sum(p.stat().st_size for p in set(dense_tensor_files(folder).values())),
        "sparse_files_bytes": sum(p.stat().st_size for p in sparse_files(folder)),
    }
    return {
        "source": source,
        "layers": layers,
        "files": files,
        "total": {
            "layers": len(layers),
            "dense_bytes": dense,
            "packed_bytes": packed_total,
            "memory_bytes": sum(r["memory_bytes"] for r in layers),
            "ratio": packed_total / dense if dense else None,
        },
    }


def _family(packed: PackedWeight) -> tuple:
    return (packed.layout, packed.detail, *packed.shape, str(packed.dtype))


def distinct_shapes(packed: dict[str, PackedWeight]) -> list[tuple[str, PackedWeight]]:
    """One representative weight (the first by name) per (layout, pattern or density, shape, dtype)."""
    seen: dict[tuple, tuple[str, PackedWeight]] = {}
    for name in sorted(packed, key=natural_key):
        seen.setdefault(_family(packed[name]), (name, packed[name]))
    return list(seen.values())


def kernel_rows(
    label: str, packed: PackedWeight, m_values: tuple[int, ...], dispatcher: Dispatcher, seed: int = 0
) -> list[dict[str, Any]]:
    """Timings (us) of every candidate for `packed` (on a CUDA device) at each M, with speedups over dense."""
    from shears.kernels.dispatch import _run_triton
    from shears.kernels.reference import tolerance

    op = PackedOperand(packed)
    rows, cols = packed.shape
    generator = torch.Generator().manual_seed(seed)
    out = []
    for m in m_values:
        x = torch.randn(m, cols, generator=generator).to(packed.device, packed.dtype)
        choice = dispatcher.choose(x, op)
        timings = choice.timings_us
        shears = {k: v for k, v in timings.items() if k.startswith("triton:")}
        best = min(shears, key=shears.__getitem__) if shears else None
        dense_us, semi_us = timings.get("dense"), timings.get("semi")
        row: dict[str, Any] = {
            "layer": label,
            "shape": [rows, cols],
            "layout": packed.layout,
            "pattern": packed.pattern,
            "dtype": str(packed.dtype).removeprefix("torch."),
            "m": m,
            "shears_us": shears.get(best) if best else None,
            "shears_config": best,
            "dense_us": dense_us,
            "semi_us": semi_us,
            "dispatch": choice.label,
            "dispatch_us": timings.get(choice.label),
            "candidates": len(timings),
            "errors": choice.errors,
        }
        if isinstance(packed, PackedBitmask):
            row["density"] = packed.density
        for key, value in (
            ("speedup_shears", row["shears_us"]),
            ("speedup_semi", semi_us),
            ("speedup_dispatch", row["dispatch_us"]),
        ):
            row[key] = dense_us / value if dense_us and value else None
        if best:
            got = _run_triton(x, op, _config_from_label(best, m, packed)).float()
            want = F.linear(x.float(), op.dense().float())
            row["relative_error"] = float((got - want).abs().max()) / (float(want.abs().max()) or 1.0)
            row["correct"] = row["relative_error"] <= tolerance(packed.dtype) * 2
        out.append(row)
    op.keep_only(set())
    return out


def _config_from_label(label: str, m: int, packed: PackedWeight) -> KernelConfig:
    from shears.kernels.configs import candidate_configs

    rows, cols = packed.shape
    sms = torch.cuda.get_device_properties(packed.device).multi_processor_count
    for config in candidate_configs(rows, cols, m, format_of(packed).launches, sms, packed.nm):
        if f"triton:{config}" == label:
            return config
    raise KeyError(label)


def run_benchmark(
    folder: Path,
    reporter: Any = None,
    *,
    pattern: tuple[int, int] | None = None,
    names: list[str] | None = None,
    m_values: tuple[int, ...] = M_VALUES,
    decode_tokens: int = 64,
) -> dict[str, Any]:
    """Benchmark the folder's packed weights; write bench.json and bench.png into it; return the result.

    Without packed/sparse*.safetensors the weights are packed in memory: `names` with `pattern` (n, m)
    (the engine knows both), else as the manifest says, else the pattern is guessed from the weights.
    """
    folder = Path(folder)
    _emit(reporter, "log", "benchmarking packed weights")
    packed, source = load_or_pack(folder, pattern, names)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "device": device_info(),
        "sizes": size_report(folder, packed, source),
    }
    total = result["sizes"]["total"]
    _emit(
        reporter,
        "log",
        f"{total['layers']} packed layers: {total['packed_bytes']} bytes vs "
        f"{total['dense_bytes']} dense ({total['ratio']:.4f}x)"
        if total["ratio"]
        else "no packed layers",
    )
    gpu = torch.cuda.is_available() and triton_status() is None
    if not gpu:
        why = "no CUDA GPU" if not torch.cuda.is_available() else triton_status()
        result["message"] = (
            f"{why}: kernel timings and decode speed need a GPU; this report has sizes and the "
            "kernels' correctness checks under the Triton interpreter only"
        )
        _emit(reporter, "log", result["message"])
        from shears.kernels.selfcheck import run_checks_anywhere

        result["checks"] = run_checks_anywhere()
    else:
        result["message"] = ""
        result["kernels"] = _gpu_kernels(packed, m_values, reporter)
        try:
            from shears.kernels.decode_bench import decode_comparison

            result["decode"] = decode_comparison(folder, new_tokens=decode_tokens)
        except Exception as exc:  # the table above is still worth writing
            result["decode"] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
    write_result(result, folder / "bench.json", folder / "bench.png")
    _emit(reporter, "result", "benchmark written", data={"files": ["bench.json", "bench.png"]})
    return result


def _gpu_kernels(packed: dict[str, PackedWeight], m_values: tuple[int, ...], reporter: Any) -> list[dict]:
    dispatcher = Dispatcher(measure=True)
    shapes = distinct_shapes(packed)
    rows: list[dict] = []
    for done, (name, weight) in enumerate(shapes):
        label = name.removesuffix(".weight").split(".")[-1]
        rows += kernel_rows(label, weight.to("cuda"), m_values, dispatcher)
        _emit(reporter, "progress", name, done + 1, len(shapes))
    return rows


def write_result(result: dict[str, Any], json_path: Path, png_path: Path | None) -> None:
    from shears.kernels.chart import write_chart

    if png_path is not None:
        problem = write_chart(result, png_path)
        if problem:
            result["chart_error"] = problem
    atomic_write_text(json_path, json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
