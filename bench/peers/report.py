"""Rows, ratios (Shears / llm-compressor), the results JSON, the markdown table and the charts."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from bench.peers.tools import ToolResult

# The targets, Shears / peer on the same machine in the same run.
PPL_RATIO_MAX = 1.00
TIME_RATIO_MAX = 0.5  # SparseGPT and Wanda only
TIME_RATIO_METHODS = ("sparsegpt", "wanda")
RSS_RATIO_MAX = 0.5

MEASURES = {
    "ppl": "perplexity, pruning.evaluate.perplexity_of_folder on the same held-out windows for every folder "
    "(exp of mean next-token NLL; see `evaluation` for window length and token count)",
    "prune_s": "seconds from a model in memory and calibration ids in memory to pruned weights in memory "
    "(calibration forward passes, statistics, masks, weight updates); no interpreter start, "
    "imports, model load or save. Shears: manifest timings calibrating + pruning (its pruning "
    "phase also writes finished blocks to disk). llm-compressor: the oneshot() call, timed in "
    "bench/peers/run_llmcompressor.py",
    "wall_s": "wall time of the tool's whole child process, start to exit (imports, load, prune, save)",
    "peak_rss_mb": "peak resident set size of the tool's child process in MiB: ru_maxrss from os.wait4, the "
    "number /usr/bin/time -v reports as 'Maximum resident set size'",
    "sparsity": "fraction of exact zeros in the decoder-block Linear weights of the output folder on disk, "
    "counted by the harness with the same code for both tools",
    "ratios": "Shears / llm-compressor: ppl_ratio of ppl, time_ratio of prune_s, rss_ratio of peak_rss_mb, "
    "wall_ratio of wall_s; null where a side has no number",
}


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs == 0 or not math.isfinite(ours) or not math.isfinite(theirs):
        return None
    return round(ours / theirs, 4)


def make_row(method: str, pattern: str, shears: ToolResult, peer: ToolResult) -> dict[str, Any]:
    row: dict[str, Any] = {
        "method": method,
        "pattern": pattern,
        "shears": shears.to_dict(),
        "peer": peer.to_dict(),
        "ppl_ratio": ratio(shears.ppl, peer.ppl),
        "time_ratio": ratio(shears.prune_s, peer.prune_s),
        "rss_ratio": ratio(shears.peak_rss_mb, peer.peak_rss_mb),
        "wall_ratio": ratio(shears.wall_s, peer.wall_s),
    }
    row["targets"] = targets_met(row)
    return row


def add_plain(row: dict[str, Any], plain: ToolResult) -> None:
    """Shears' SparseGPT without its mask re-fit (--refine-iterations 0): the paper's algorithm."""
    row["shears_plain"] = plain.to_dict()
    row["plain_ppl_ratio"] = ratio(plain.ppl, row["peer"]["ppl"])
    row["plain_time_ratio"] = ratio(plain.prune_s, row["peer"]["prune_s"])


def targets_met(row: dict[str, Any]) -> dict[str, bool | None]:
    """Each target: True / False, or None where it does not apply or a side has no number."""

    def check(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit

    return {
        "ppl": check(row["ppl_ratio"], PPL_RATIO_MAX),
        "time": check(row["time_ratio"], TIME_RATIO_MAX) if row["method"] in TIME_RATIO_METHODS else None,
        "rss": check(row["rss_ratio"], RSS_RATIO_MAX),
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How many rows meet each target, of those where it applies."""
    out: dict[str, Any] = {}
    for key in ("ppl", "time", "rss"):
        verdicts = [row["targets"][key] for row in rows if row["targets"][key] is not None]
        out[key] = {"met": sum(verdicts), "of": len(verdicts), "all_met": bool(verdicts) and all(verdicts)}
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cells(*cells: object) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _side(result: dict[str, Any], key: str, digits: int) -> str:
    if result["status"] == "not_offered":
        return "n/a"
    if result["status"] == "failed":
        return "failed"
    return _num(result.get(key), digits)


def markdown(data: dict[str, Any]) -> str:
    """The results as a markdown report: setup, the table, the ratios, the scaling table."""
    evaluation, calibration = data["evaluation"], data["calibration"]
    lines = [
        f"# Shears vs llm-compressor on {data['model']['name']} ({data['date']})",
        "",
        f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, torch threads "
        f"{data['machine']['torch_threads']}. Tools: Shears {data['tools']['shears'].get('shears', '-')} "
        f"(transformers {data['tools']['shears']['transformers']}), llm-compressor "
        f"{data['tools']['llm-compressor'].get('version', '-')} "
        f"(transformers {data['tools']['llm-compressor'].get('transformers', '-')}).",
        f"Calibration: the same {calibration['samples']} x {calibration['seqlen']} token ids for both "
        f"(sha256 {calibration['sha256'][:12]}). Evaluation: {evaluation['windows']} held-out windows of "
        f"{evaluation['seqlen']} tokens ({evaluation['tokens']} predicted tokens); dense perplexity "
        f"{_num(data['dense']['ppl'], 3)}.",
        "",
        "| method | pattern | ppl Shears | ppl peer | ppl ratio | prune s Shears | prune s peer | time ratio "
        "| peak RSS MiB Shears | peak RSS MiB peer | RSS ratio | sparsity Shears | sparsity peer |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in data["rows"]:
        ours, theirs = row["shears"], row["peer"]
        lines.append(
            _cells(
                row["method"],
                row["pattern"],
                _side(ours, "ppl", 3),
                _side(theirs, "ppl", 3),
                _num(row["ppl_ratio"], 4),
                _side(ours, "prune_s", 1),
                _side(theirs, "prune_s", 1),
                _num(row["time_ratio"], 3),
                _side(ours, "peak_rss_mb", 0),
                _side(theirs, "peak_rss_mb", 0),
                _num(row["rss_ratio"], 3),
                _side(ours, "sparsity", 4),
                _side(theirs, "sparsity", 4),
            )
        )
    met = data["summary"]
    lines += [
        "",
        f"Targets (Shears / peer): perplexity ratio <= {PPL_RATIO_MAX:.2f}: "
        f"{met['ppl']['met']}/{met['ppl']['of']}; "
        f"prune time ratio <= {TIME_RATIO_MAX} (SparseGPT, Wanda): {met['time']['met']}/{met['time']['of']}; "
        f"peak RSS ratio <= {RSS_RATIO_MAX}: {met['rss']['met']}/{met['rss']['of']}.",
        "",
    ]
    for row in data["rows"]:
        if row["peer"]["status"] != "ok":
            lines.append(
                f"- {row['method']} {row['pattern']}: llm-compressor {row['peer']['status']}: "
                f"{row['peer']['note']}"
            )
    for row in data["rows"]:
        if "shears_plain" in row:
            plain = row["shears_plain"]
            lines.append(
                f"- {row['method']} {row['pattern']}, Shears without the re-fit of kept weights "
                f"(`--refine-iterations 0`, the paper's algorithm): ppl {_side(plain, 'ppl', 3)} "
                f"(ratio {_num(row['plain_ppl_ratio'], 4)}), prune {_side(plain, 'prune_s', 1)} s "
                f"(ratio {_num(row['plain_time_ratio'], 3)}), peak RSS {_side(plain, 'peak_rss_mb', 0)} MiB."
            )
    floors = data.get("import_floor") or {}
    if floors:
        lines.append(
            "- Import floor (peak RSS of a process that only imports the tool): "
            + ", ".join(f"{tool} {floor['peak_rss_mb']:.0f} MiB" for tool, floor in floors.items())
            + "."
        )
    lines += ["", "What each number measures:", ""]
    lines += [f"- {key}: {text}" for key, text in MEASURES.items()]
    scaling = data.get("scaling")
    if scaling and scaling.get("points"):
        lines += [
            "",
            f"## Time and memory vs width: {scaling['description']}",
            "",
            "| hidden | intermediate | parameters (M) | prune s Shears | prune s peer | time ratio "
            "| peak RSS MiB Shears | peak RSS MiB peer | RSS ratio |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for point in scaling["points"]:
            ours, theirs = point["shears"], point["peer"]
            lines.append(
                _cells(
                    point["hidden"],
                    point["intermediate"],
                    f"{point['parameters'] / 1e6:.0f}",
                    _side(ours, "prune_s", 1),
                    _side(theirs, "prune_s", 1),
                    _num(point["time_ratio"], 3),
                    _side(ours, "peak_rss_mb", 0),
                    _side(theirs, "peak_rss_mb", 0),
                    _num(point["rss_ratio"], 3),
                )
            )
    return "\n".join(lines) + "\n"


def _labelled(rows: list[dict[str, Any]]) -> list[str]:
    return [f"{row['method']}\n{row['pattern']}" for row in rows]


def chart(data: dict[str, Any], path: Path) -> None:
    """Perplexity, prune time and peak RSS by method and pattern, both tools side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    panels = [
        ("ppl", "perplexity (log scale, lower is better)"),
        ("prune_s", "prune time, s"),
        ("peak_rss_mb", "peak RSS, MiB"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8))
    positions = range(len(rows))
    width = 0.38
    for axis, (key, title) in zip(axes, panels, strict=True):
        for offset, (side, label, colour) in enumerate(
            (("shears", "Shears", "#1f77b4"), ("peer", "llm-compressor 0.14", "#ff7f0e"))
        ):
            values = [row[side].get(key) if row[side]["status"] == "ok" else None for row in rows]
            xs = [x + (offset - 0.5) * width for x in positions]
            axis.bar(xs, [v if v is not None else 0 for v in values], width, label=label, color=colour)
            for x, value in zip(xs, values, strict=True):
                axis.annotate(
                    "n/a" if value is None else f"{value:.3g}",
                    (x, value or 0),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
        if key == "ppl":
            axis.set_yscale("log")
            dense = data["dense"]["ppl"]
            axis.axhline(dense, color="grey", linestyle="--", linewidth=1, label=f"dense {dense:.2f}")
        axis.set_xticks(list(positions), _labelled(rows), fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=8)
    fig.suptitle(
        f"{data['model']['name']}: Shears vs llm-compressor, {data['calibration']['samples']} x "
        f"{data['calibration']['seqlen']} calibration tokens, {data['machine']['cores']}-core CPU",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scaling_chart(scaling: dict[str, Any], path: Path) -> None:
    """Prune time and peak RSS against parameter count, one line per tool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = scaling["points"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, key, title in (
        (axes[0], "prune_s", "prune time, s"),
        (axes[1], "peak_rss_mb", "peak RSS, MiB"),
    ):
        for side, label, colour in (
            ("shears", "Shears", "#1f77b4"),
            ("peer", "llm-compressor 0.14", "#ff7f0e"),
        ):
            xs = [p["parameters"] / 1e6 for p in points if p[side]["status"] == "ok"]
            ys = [p[side][key] for p in points if p[side]["status"] == "ok"]
            axis.plot(xs, ys, marker="o", label=label, color=colour)
            for x, y, p in zip(xs, ys, [p for p in points if p[side]["status"] == "ok"], strict=True):
                axis.annotate(
                    f"h{p['hidden']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        axis.set_xlabel("parameters, millions")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(scaling["description"], fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
