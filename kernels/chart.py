"""bench.png: speedup over dense vs M per shape (GPU), or packed vs dense bytes per layer shape (no GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_chart(result: dict[str, Any], path: Path) -> str | None:
    """Draw the chart for a benchmark result; returns why not if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no chart: {exc}"
    rows = result.get("kernels") or []
    if rows:
        figure = _speedup_chart(plt, rows, result.get("device", {}).get("name", "GPU"))
    else:
        figure = _size_chart(plt, result.get("sizes", {}).get("layers", []))
    tmp = path.with_name(f".{path.name}.tmp")
    # No Software tag (matplotlib writes no date either): the bytes depend on the numbers only.
    figure.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(figure)
    tmp.replace(path)
    return None


def _speedup_chart(plt: Any, rows: list[dict[str, Any]], device: str) -> Any:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        density = row.get("density")
        kind = row["pattern"] if density is None else f"bitmask {round((1 - density) * 100)}%"
        groups.setdefault(f"{row['layer']} {kind} {row['shape'][0]}x{row['shape'][1]}", []).append(row)
    cols = min(3, len(groups))
    lines = -(-len(groups) // cols)
    figure, axes = plt.subplots(lines, cols, figsize=(5 * cols, 3.4 * lines), squeeze=False)
    for ax, (title, group) in zip(axes.flat, groups.items(), strict=False):
        ms = [r["m"] for r in group]
        for key, label, style in (
            ("speedup_shears", "Shears kernel", "o-"),
            ("speedup_semi", "torch 2:4", "s--"),
            ("speedup_dispatch", "dispatch", "^:"),
        ):
            values = [r.get(key) for r in group]
            if any(v is not None for v in values):
                ax.plot(ms, [v if v is not None else float("nan") for v in values], style, label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speedup vs dense")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    figure.suptitle(f"Sparse matmul speedup over dense cuBLAS ({device})", fontsize=11)
    figure.tight_layout()
    return figure


def _size_chart(plt: Any, layers: list[dict[str, Any]]) -> Any:
    shapes: dict[str, list[int]] = {}
    for layer in layers:
        key = f"{layer['shape'][0]}x{layer['shape'][1]} {layer['pattern']}"
        totals = shapes.setdefault(key, [0, 0])
        totals[0] += layer["dense_bytes"]
        totals[1] += layer["packed_bytes"]
    figure, ax = plt.subplots(figsize=(max(5, 1.2 * len(shapes) + 2), 3.6))
    names = list(shapes)
    positions = range(len(names))
    ax.bar([p - 0.2 for p in positions], [shapes[n][0] / 2**20 for n in names], 0.4, label="dense")
    ax.bar([p + 0.2 for p in positions], [shapes[n][1] / 2**20 for n in names], 0.4, label="packed")
    ax.set_xticks(list(positions), names, rotation=20, fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title("Pruned layers: dense vs packed bytes (no GPU: sizes only)", fontsize=10)
    ax.legend()
    figure.tight_layout()
    return figure
