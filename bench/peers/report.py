"""Rows, ratios (Shears / llm-compressor), the results JSON, the markdown table and the charts."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from bench.peers.tools import ToolResult, parse_scaling_run

# The targets of issue 13, Shears / peer on the same machine in the same run. Quality is judged on
# held-out text of the *other* domain than the calibration (the same-domain ratio is reported too).
PPL_RATIO_MAX = {
    ("sparsegpt", "2:4"): 0.85,
    ("sparsegpt", "unstructured"): 0.92,
    ("wanda", "2:4"): 0.97,
    ("wanda", "unstructured"): 0.97,
}
PPL_RATIO_DEFAULT = 1.00  # magnitude, other patterns
TIME_RATIO_MAX = 0.5  # SparseGPT and Wanda only, in the rows and at every width of the sweep
TIME_RATIO_METHODS = ("sparsegpt", "wanda")
RSS_RATIO_MAX = 0.5

MEASURES = {
    "ppl": "perplexity, pruning.evaluate.perplexity_of_folder on the same held-out windows for every folder "
    "(exp of mean next-token NLL), one number per evaluation domain; see `evaluation` for each domain's "
    "source, window length and token count, and `calibration` for what each row was calibrated on",
    "same/other": "a row's evaluation on the held-out text of its own calibration domain (same) or of the "
    "other domain (other, the number targets are judged on)",
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
    "ratios": "Shears / llm-compressor: ppl_ratio (per evaluation domain) of ppl, time_ratio of prune_s, "
    "rss_ratio of peak_rss_mb, wall_ratio of wall_s; null where a side has no number",
}


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs == 0 or not math.isfinite(ours) or not math.isfinite(theirs):
        return None
    return round(ours / theirs, 4)


def ppl_limit(method: str, pattern: str) -> float:
    return PPL_RATIO_MAX.get((method, pattern), PPL_RATIO_DEFAULT)


def _ppl_ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float | None]:
    return {domain: ratio(value, theirs.get("ppl", {}).get(domain)) for domain, value in ours["ppl"].items()}


def _other(ratios: dict[str, float | None], calibration: str) -> float | None:
    """The ratio on the other domain(s): the geometric mean if there are several, None if none."""
    values = [v for domain, v in ratios.items() if domain != calibration]
    if not values or any(v is None for v in values):
        return None
    return round(math.exp(sum(math.log(v) for v in values) / len(values)), 4)  # type: ignore[arg-type]


def make_row(
    calibration: str, method: str, pattern: str, shears: ToolResult, peer: ToolResult
) -> dict[str, Any]:
    ratios = _ppl_ratios(shears.to_dict(), peer.to_dict())
    row: dict[str, Any] = {
        "calibration": calibration,
        "method": method,
        "pattern": pattern,
        "shears": shears.to_dict(),
        "peer": peer.to_dict(),
        "ppl_ratio": ratios,
        "same_domain_ratio": ratios.get(calibration),
        "other_domain_ratio": _other(ratios, calibration),
        "time_ratio": ratio(shears.prune_s, peer.prune_s),
        "rss_ratio": ratio(shears.peak_rss_mb, peer.peak_rss_mb),
        "wall_ratio": ratio(shears.wall_s, peer.wall_s),
        "variants": {},
    }
    row["targets"] = targets_met(row)
    return row


def add_variant(row: dict[str, Any], name: str, result: ToolResult) -> None:
    """A Shears-only variant of the row's method (for example the paper's algorithm), same job."""
    ratios = _ppl_ratios(result.to_dict(), row["peer"])
    row["variants"][name] = {
        "result": result.to_dict(),
        "ppl_ratio": ratios,
        "same_domain_ratio": ratios.get(row["calibration"]),
        "other_domain_ratio": _other(ratios, row["calibration"]),
        "time_ratio": ratio(result.prune_s, row["peer"]["prune_s"]),
    }


def targets_met(row: dict[str, Any]) -> dict[str, bool | None]:
    """Each target: True / False, or None where it does not apply or a side has no number."""

    def check(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit

    return {
        "ppl": check(row["other_domain_ratio"], ppl_limit(row["method"], row["pattern"])),
        "time": check(row["time_ratio"], TIME_RATIO_MAX) if row["method"] in TIME_RATIO_METHODS else None,
        "rss": check(row["rss_ratio"], RSS_RATIO_MAX),
    }


def summary(rows: list[dict[str, Any]], scaling: dict[str, Any] | None = None) -> dict[str, Any]:
    """How many rows (and width-sweep points, for time) meet each target, of those where it applies."""
    verdicts: dict[str, list[bool]] = {"ppl": [], "time": [], "rss": []}
    for row in rows:
        for key in verdicts:
            if row["targets"][key] is not None:
                verdicts[key].append(row["targets"][key])
    for point in (scaling or {}).get("points", []):
        default = point.get("variant", "default") == "default"  # the target is on what users get
        if default and point["method"] in TIME_RATIO_METHODS and point["time_ratio"] is not None:
            verdicts["time"].append(point["time_ratio"] <= TIME_RATIO_MAX)
    return {
        key: {"met": sum(values), "of": len(values), "all_met": bool(values) and all(values)}
        for key, values in verdicts.items()
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cells(*cells: object) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _side(result: dict[str, Any], key: str, digits: int, domain: str | None = None) -> str:
    if result["status"] == "not_offered":
        return "n/a"
    if result["status"] == "failed":
        return "failed"
    value = result.get(key) if domain is None else result.get(key, {}).get(domain)
    return _num(value, digits)


def _quality_lines(data: dict[str, Any]) -> list[str]:
    domains = data["domains"]
    header = ["calibrated on", "method", "pattern", "Shears variant"]
    for domain in domains:
        header += [f"ppl on {domain}: Shears", "peer", "ratio"]
    header += ["other-domain ratio", "target"]
    lines = [_cells(*header), "| " + " | ".join(["---"] * 4 + ["---:"] * (3 * len(domains) + 2)) + " |"]
    for row in data["rows"]:
        for name, result, ratios_of in _runs(row):
            ratios, other = ratios_of["ppl_ratio"], ratios_of["other_domain_ratio"]
            cells: list[object] = [row["calibration"], row["method"], row["pattern"], name]
            for domain in domains:
                cells += [
                    _side(result, "ppl", 3, domain),
                    _side(row["peer"], "ppl", 3, domain),
                    _num(ratios.get(domain), 4),
                ]
            limit = ppl_limit(row["method"], row["pattern"])
            verdict = "" if other is None else (" met" if other <= limit else " missed")
            cells += [_num(other, 4), f"<= {limit:.2f}{verdict}"]
            lines.append(_cells(*cells))
    return lines


def _runs(row: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """A row's Shears runs: (name, result, the record holding its ratios), the default first."""
    runs = [("default", row["shears"], row)]
    return runs + [(name, v["result"], v) for name, v in row["variants"].items()]


def _cost_lines(data: dict[str, Any]) -> list[str]:
    lines = [
        "| calibrated on | method | pattern | Shears variant | prune s Shears | prune s peer | time ratio "
        "| peak RSS MiB Shears | peak RSS MiB peer | RSS ratio | sparsity Shears | sparsity peer |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in data["rows"]:
        theirs = row["peer"]
        entries = [(name, result) for name, result, _ in _runs(row)]
        for name, ours in entries:
            lines.append(
                _cells(
                    row["calibration"],
                    row["method"],
                    row["pattern"],
                    name,
                    _side(ours, "prune_s", 1),
                    _side(theirs, "prune_s", 1),
                    _num(ratio(ours.get("prune_s"), theirs.get("prune_s")), 3),
                    _side(ours, "peak_rss_mb", 0),
                    _side(theirs, "peak_rss_mb", 0),
                    _num(ratio(ours.get("peak_rss_mb"), theirs.get("peak_rss_mb")), 3),
                    _side(ours, "sparsity", 4),
                    _side(theirs, "sparsity", 4),
                )
            )
    return lines


def _setup_lines(data: dict[str, Any]) -> list[str]:
    """The quality rows' calibration and evaluation, every source named."""
    lines = ["Calibration (both tools read the same token ids):", ""]
    for domain, calibration in data["calibration"].items():
        lines.append(
            f"- {domain}: {calibration['source']}; {calibration['samples']} x {calibration['seqlen']} tokens "
            f"(sha256 {calibration['sha256'][:12]})"
        )
    lines += ["", "Evaluation (every output folder and the dense model, one function):", ""]
    for domain, evaluation in data["evaluation"].items():
        lines.append(
            f"- {domain}: {evaluation['source']}; {evaluation['windows']} windows of {evaluation['seqlen']} "
            f"tokens ({evaluation['tokens']} predicted tokens); dense perplexity "
            f"{_num(data['dense'][domain]['ppl'], 3)}"
        )
    return lines


def markdown(data: dict[str, Any]) -> str:
    """The results as a markdown report: setup with every source named, quality, cost, the sweep."""
    machine, tools, settings = data["machine"], data["tools"], data["settings"]
    lines = [
        f"# Shears vs llm-compressor on {data['model']['name']} ({data['date']})",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}, "
        f"load average at start {machine.get('loadavg_at_start')}. Tools: Shears "
        f"{tools['shears'].get('shears', '-')} (transformers {tools['shears']['transformers']}), "
        f"llm-compressor {tools['llm-compressor'].get('version', '-')} "
        f"(transformers {tools['llm-compressor'].get('transformers', '-')}). Shears block forwards: "
        f"{settings['shears_compute_dtype']}; llm-compressor: {settings['peer_compute_dtype']}.",
        "",
    ]
    if not data["rows"]:  # --no-rows: the SmolLM2 calibration and evaluation were not used
        lines += ["No quality rows in this run (`--no-rows`): the width sweep below is all it measured."]
    else:
        lines += _setup_lines(data)
        lines += ["", "## Quality: perplexity on each domain's held-out text", ""]
        lines += _quality_lines(data)
        lines += ["", "## Cost", ""]
        lines += _cost_lines(data)
    met = data["summary"]
    lines += [
        "",
        f"Targets (Shears / peer): other-domain perplexity ratio (per method and pattern, see the table): "
        f"{met['ppl']['met']}/{met['ppl']['of']}; prune time ratio <= {TIME_RATIO_MAX} (SparseGPT, Wanda, "
        f"rows and width sweep): {met['time']['met']}/{met['time']['of']}; "
        f"peak RSS ratio <= {RSS_RATIO_MAX}: {met['rss']['met']}/{met['rss']['of']}.",
        "",
    ]
    for row in data["rows"]:
        if row["peer"]["status"] != "ok":
            lines.append(
                f"- {row['calibration']} {row['method']} {row['pattern']}: llm-compressor "
                f"{row['peer']['status']}: {row['peer']['note']}"
            )
    for method, variants in settings.get("shears_variants", {}).items():
        for name, flags in variants.items():
            lines.append(f"- Shears variant `{name}` of {method}: `shears prune ... {' '.join(flags)}`")
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
            "| hidden | intermediate | parameters (M) | method | pattern | Shears variant | prune s Shears "
            "| prune s peer | time ratio | peak RSS MiB Shears | peak RSS MiB peer | RSS ratio |",
            "| ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for point in scaling["points"]:
            ours, theirs = point["shears"], point["peer"]
            lines.append(
                _cells(
                    point["hidden"],
                    point["intermediate"],
                    f"{point['parameters'] / 1e6:.0f}",
                    point["method"],
                    point["pattern"],
                    point.get("variant", "default"),
                    _side(ours, "prune_s", 1),
                    _side(theirs, "prune_s", 1),
                    _num(point["time_ratio"], 3),
                    _side(ours, "peak_rss_mb", 0),
                    _side(theirs, "peak_rss_mb", 0),
                    _num(point["rss_ratio"], 3),
                )
            )
    return "\n".join(lines) + "\n"


def ratio_lines(data: dict[str, Any]) -> list[str]:
    """A console summary: one line per row and variant, one per sweep point."""
    head = ("calibrated on", "method", "pattern", "variant", "same", "other", "time")
    lines = [f"{head[0]:<13} {head[1]:<10} {head[2]:<13} {head[3]:<9} {head[4]:>7} {head[5]:>7} {head[6]:>6}"]
    for row in data["rows"]:
        for name, _, ratios_of in _runs(row):
            same, other, time_ratio = (
                ratios_of[k] for k in ("same_domain_ratio", "other_domain_ratio", "time_ratio")
            )
            lines.append(
                f"{row['calibration']:<13} {row['method']:<10} {row['pattern']:<13} {name:<9} "
                f"{_num(same, 3):>7} {_num(other, 3):>7} {_num(time_ratio, 3):>6}"
            )
    for point in (data.get("scaling") or {}).get("points", []):
        lines.append(
            f"width {point['hidden']:<5} {point['method']} {point['pattern']} "
            f"{point.get('variant', 'default')}: prune time "
            f"{_num(point['time_ratio'], 3)}, peak RSS {_num(point['rss_ratio'], 3)}"
        )
    return lines


def _labelled(rows: list[dict[str, Any]]) -> list[str]:
    return [f"{row['calibration'][:5]}\n{row['method']}\n{row['pattern']}" for row in rows]


def chart(data: dict[str, Any], path: Path) -> None:
    """Other-domain perplexity, prune time and peak RSS per row, both tools side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]

    def other_ppl(row: dict[str, Any], side: str) -> float | None:
        result = row[side]
        values = [v for d, v in result.get("ppl", {}).items() if d != row["calibration"]]
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None

    panels = [
        ("other", "perplexity on the other domain (log, lower is better)"),
        ("prune_s", "prune time, s"),
        ("peak_rss_mb", "peak RSS, MiB"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5))
    positions = range(len(rows))
    width = 0.38
    for axis, (key, title) in zip(axes, panels, strict=True):
        for offset, (side, label, colour) in enumerate(
            (("shears", "Shears", "#1f77b4"), ("peer", "llm-compressor 0.14", "#ff7f0e"))
        ):
            values = [
                (other_ppl(row, side) if key == "other" else row[side].get(key))
                if row[side]["status"] == "ok"
                else None
                for row in rows
            ]
            xs = [x + (offset - 0.5) * width for x in positions]
            axis.bar(xs, [v if v is not None else 0 for v in values], width, label=label, color=colour)
            for x, value in zip(xs, values, strict=True):
                axis.annotate(
                    "n/a" if value is None else f"{value:.3g}",
                    (x, value or 0),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
        if key == "other":
            axis.set_yscale("log")
        axis.set_xticks(list(positions), _labelled(rows), fontsize=6)
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=8)
    first = next(iter(data["calibration"].values()))
    fig.suptitle(
        f"{data['model']['name']}: Shears vs llm-compressor, {first['samples']} x {first['seqlen']} "
        f"calibration tokens per domain ({', '.join(data['domains'])}), {data['machine']['cores']}-core CPU",
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
        for run in scaling["runs"]:
            method, pattern, variant = parse_scaling_run(run)
            mine = [
                p
                for p in points
                if (p["method"], p["pattern"], p.get("variant", "default")) == (method, pattern, variant)
            ]
            sides = (("shears", "Shears", "-"), ("peer", "llm-compressor 0.14", "--"))
            for side, label, style in sides if variant == "default" else sides[:1]:
                done = [p for p in mine if p[side]["status"] == "ok"]
                xs = [p["parameters"] / 1e6 for p in done]
                ys = [p[side][key] for p in done]
                axis.plot(xs, ys, marker="o", linestyle=style, label=f"{label} {run}")
                for x, y, p in zip(xs, ys, done, strict=True):
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
