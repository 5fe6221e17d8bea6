"""Architecture sweep: every model type transformers runs as a causal LM (its causal-LM auto mapping)
plus the image-text-to-text mapping's decoders, each as a tiny random model, through Shears.

For each type: build a tiny config (tests.tiny.tiny_config shrinks any config) and save the model;
check the streamed forward (what the engine runs) against the model's forward in fp32 (bf16 too
for the CI subset, tests/pruning/test_equivalence.py);
prune with Wanda 50% and SparseGPT 2:4; load the output with the class the checkpoint names;
check sparsity exactly (every pruned matrix, re-read from disk) and that the engine's pruned
stream equals a plain forward of the saved folder. A type is "exact" when all of that holds,
"refused" when Shears stops it with a clear error before any work (the row quotes it), "wrong" when
a check fails (a bug: such types get an entry in pruning/families.REFUSED), "untested" when the
sweep itself could not build a tiny model of the type.

    PYTHONPATH=$PWD nice .venv/bin/python bench/architectures.py             # the full sweep
    PYTHONPATH=$PWD .venv/bin/python bench/architectures.py --types llama,gpt2

Types run on a pool of worker processes, each with a time limit (a crash or hang is one row, not
the sweep); results accumulate in bench/results/architectures.json (a re-run skips types already
there unless --fresh) and the table is written to docs/architectures.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "architectures.json"
TABLE = ROOT / "docs" / "architectures.md"
TIMEOUT_S = 600
CHUNK = 12  # types per worker before its pool is replaced

# Not decoder-only transformers (so not counted in the decoder goal): the row still says what happens.
ENCODERS = {
    "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie",
    "megatron-bert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm",
    "xlm-roberta", "xlm-roberta-xl", "xmod", "xlnet",
}  # fmt: skip
# Recurrent, state-space or linear-attention layers (alone or mixed with attention).
STATE_SPACE = {
    "mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "recurrent_gemma", "jamba", "zamba", "zamba2",
    "bamba", "falcon_h1", "granitemoehybrid", "nemotron_h", "lfm2", "lfm2_moe", "lfm3", "qwen3_next",
    "kimi_linear", "olmo_hybrid", "bailing_hybrid", "qwen3_5", "qwen3_5_text", "qwen3_5_moe",
    "qwen3_5_moe_text",
}  # fmt: skip


def model_types() -> list[tuple[str, str]]:
    """(model type, mapping it comes from), causal LMs first."""
    from transformers.models.auto import modeling_auto

    causal = sorted(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    vlm = sorted(set(modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) - set(causal))
    return [(t, "causal-lm") for t in causal] + [(t, "image-text-to-text") for t in vlm]


def kind_of(model_type: str, mapping: str) -> str:
    from transformers import AutoConfig

    if model_type in ENCODERS:
        return "encoder"
    try:
        if getattr(AutoConfig.for_model(model_type), "is_encoder_decoder", False):
            return "encoder-decoder"
    except Exception:
        pass
    if model_type in STATE_SPACE:
        return "ssm/hybrid"
    return "vlm" if mapping == "image-text-to-text" else "decoder"


# --- one type --------------------------------------------------------------------------------


def _reason(exc: Exception, folder: Path) -> str:
    return str(exc).replace(str(folder), "<model>")[:400]


def _max_rel(a: Any, b: Any) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-6)


def check_type(model_type: str, work: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig

    from shears.calibration.windows import save_windows
    from shears.errors import ShearsError
    from shears.pruning.config import CalibrationSpec, EvaluationSpec, PruneRequest
    from shears.pruning.engine import prune
    from shears.pruning.skeleton import model_class
    from tests.tiny import make_tiny_of_type, plain_logits, streamed_logits

    row: dict[str, Any] = {"type": model_type}
    folder = work / model_type
    try:
        make_tiny_of_type(model_type, folder)
    except Exception as exc:  # the sweep's own tooling, not Shears
        return row | {"status": "untested", "reason": f"tiny model: {type(exc).__name__}: {exc}"[:300]}
    config = AutoConfig.from_pretrained(folder)
    row["class"] = (config.architectures or ["?"])[0]
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    try:
        plain32 = plain_logits(folder, ids, torch.float32)
    except Exception as exc:  # transformers cannot run it on text alone: Shears must refuse it
        try:
            streamed_logits(folder, ids, torch.float32)
        except ShearsError as refusal:
            return row | {"status": "refused", "reason": _reason(refusal, folder)}
        except Exception as other:
            return (
                row
                | {  # the tiny config itself is broken: nothing to compare against
                    "status": "untested",
                    "reason": f"transformers' own forward fails on the tiny model ({type(exc).__name__}: "
                    f"{exc}); Shears: {type(other).__name__}: {other}"[:300],
                }
            )
        return row | {"status": "untested", "reason": f"forward: {type(exc).__name__}: {exc}"[:300]}
    try:
        row["fp32_rel_error"] = _max_rel(streamed_logits(folder, ids, torch.float32), plain32)
    except ShearsError as exc:
        return row | {"status": "refused", "reason": _reason(exc, folder)}
    if row["fp32_rel_error"] > 1e-4:
        return row | {"status": "wrong", "reason": "streamed forward differs from the model's forward"}
    # Token files (no tokenisation of the built-in corpus per run): 4 calibration, 2 evaluation windows.
    generator = torch.Generator().manual_seed(1)
    save_windows(work / "calib.safetensors", torch.randint(3, 512, (4, 32), generator=generator))
    eval_ids = torch.randint(3, 512, (2, 32), generator=generator)
    save_windows(work / "eval.safetensors", eval_ids)
    for method, pattern in (("wanda", "unstructured"), ("sparsegpt", "2:4")):
        out = work / f"{model_type}-{method}"
        request = PruneRequest(
            model=str(folder),
            method=method,
            sparsity=0.5,
            pattern=pattern,
            compute_dtype="float32",
            calibration=CalibrationSpec(source=str(work / "calib.safetensors"), samples=4, seqlen=32),
            evaluation=EvaluationSpec(source=str(work / "eval.safetensors"), seqlen=32, max_tokens=64),
        )
        try:
            manifest = prune(request, out)
        except ShearsError as exc:
            return row | {"status": "refused", "reason": _reason(exc, folder)}
        problem = _check_output(out, manifest, request, model_class(config), eval_ids)
        if problem:
            return row | {"status": "wrong", "reason": f"{method} {pattern}: {problem}"}
        row[f"{method}_layers"] = len(manifest["layers"])
        row["experts"] = sum(1 for r in manifest["layers"].values() if r.get("expert") is not None)
    return row | {"status": "exact"}


def _check_output(out: Path, manifest: dict[str, Any], request: Any, cls: type, windows: Any) -> str | None:
    import torch
    import torch.nn.functional as F

    if not manifest["layers"]:
        return "no layer was pruned"
    pattern = request.pattern
    for name, layer in manifest["layers"].items():
        rows, cols = layer["shape"]
        zeros = round(layer["sparsity"] * rows * cols)
        if pattern.structured:
            expected = rows * cols // pattern.m * (pattern.m - pattern.n)
        else:
            expected = rows * round(0.5 * cols)  # Wanda: exact per row
        if zeros < expected:  # more where the random init already had zeros
            return f"{name}: {zeros} zeros, expected {expected}"
    model = cls.from_pretrained(out, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(input_ids=windows, use_cache=False).logits.float()
    nll = float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))
    if abs(nll - manifest["perplexity"]["nll_pruned"]) > 1e-4 * max(1.0, abs(nll)):
        return f"pruned stream NLL {manifest['perplexity']['nll_pruned']:.6f} != saved model's {nll:.6f}"
    return None


# --- the sweep -------------------------------------------------------------------------------


class _TimedOut(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _TimedOut


def run_one(model_type: str) -> dict[str, Any]:
    """check_type in a pool worker, with a time limit; any failure of the sweep itself is a row."""
    import signal

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as work:
            row = check_type(model_type, Path(work))
    except _TimedOut:
        row = {"type": model_type, "status": "untested", "reason": f"timed out after {TIMEOUT_S} s"}
    except Exception as exc:  # reported as a row
        traceback.print_exc()
        row = {"type": model_type, "status": "untested", "reason": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        signal.alarm(0)
    row["seconds"] = round(time.monotonic() - start, 1)
    return row


def sweep(types: list[str], rows: dict[str, dict[str, Any]], workers: int) -> None:
    """Run `types` on pools of worker processes (imports paid once per worker), a fresh pool every
    CHUNK types (a long-lived worker grows; and max_tasks_per_child can deadlock the pool when a
    worker is replaced); a worker that dies takes its type down as "crashed" and the pool is
    rebuilt for the rest."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    pending = list(types)
    context = multiprocessing.get_context("spawn")
    while pending:
        chunk = pending[: CHUNK * workers]
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(run_one, t): t for t in chunk}
            try:
                for future in as_completed(futures):
                    model_type = futures[future]
                    rows[model_type] = future.result()
                    pending.remove(model_type)
                    row = rows[model_type]
                    print(f"{model_type:32s} {row['status']:9s} {row.get('reason', '')[:120]}", flush=True)
                    RESULTS.parent.mkdir(parents=True, exist_ok=True)
                    RESULTS.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
            except BrokenProcessPool:
                crashed = next(t for f, t in futures.items() if t in pending and f.done() and f.exception())
                rows[crashed] = {
                    "type": crashed,
                    "status": "untested",
                    "reason": "crashed the Python process",
                }
                pending.remove(crashed)


_ABOUT = """\
Every model type in transformers' causal-LM auto mapping plus the image-text-to-text mapping's
decoders, as a tiny random model (`tests/tiny.py`'s `tiny_config`). **exact**: the streamed forward
equals the model's forward in fp32 (in bf16 too for the CI subset), Wanda 50% and SparseGPT 2:4
prune it, the output loads with the class the checkpoint names, every pruned matrix has the
requested zeros (at least: a random init may hold some already) and the N:M pattern, and the
engine's pruned stream equals a plain forward of the saved folder. **refused**: Shears stops with
the quoted error before any work. **wrong**: a check failed. **untested**: the sweep could not
build a tiny model of the type, or transformers' own forward fails on it (the row says which).
Family knowledge lives in `pruning/families.py`."""


def write_table(rows: dict[str, dict[str, Any]], kinds: dict[str, str]) -> None:
    from collections import Counter

    import transformers

    ordered = sorted(rows.values(), key=lambda r: (kinds[r["type"]], r["type"]))
    totals = Counter((kinds[r["type"]], r["status"]) for r in ordered)
    by_kind = Counter(kinds[r["type"]] for r in ordered)
    lines = [
        "# Architectures",
        "",
        f"Generated by `bench/architectures.py` (transformers {transformers.__version__}).",
        _ABOUT,
        "",
        "| kind | types | exact | refused | wrong | untested |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind in sorted(by_kind):
        lines.append(
            f"| {kind} | {by_kind[kind]} | {totals[(kind, 'exact')]} | {totals[(kind, 'refused')]} | "
            f"{totals[(kind, 'wrong')]} | {totals[(kind, 'untested')]} |"
        )
    decoders = [r for r in ordered if kinds[r["type"]] in ("decoder", "vlm")]
    exact = sum(r["status"] == "exact" for r in decoders)
    tested = sum(r["status"] != "untested" for r in decoders)
    wrong = sum(r["status"] == "wrong" for r in ordered)
    lines += [
        "",
        f"**Decoder and VLM types exact: {exact} of {len(decoders)} "
        f"({100 * exact / max(len(decoders), 1):.0f}%); of the {tested} the sweep could build and "
        f"run: {100 * exact / max(tested, 1):.0f}%. Wrong results: {wrong}.**",
        "",
        "| model type | kind | class | result | detail |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in ordered:
        detail = r.get("reason", "")
        if r["status"] == "exact":
            detail = f"{r.get('wanda_layers', 0)} matrices" + (
                f", {r['experts']} expert matrices" if r.get("experts") else ""
            )
        detail = detail.replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {r['type']} | {kinds[r['type']]} | {r.get('class', '')} | {r['status']} | {detail} |"
        )
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    TABLE.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", help="comma list (default: every type)")
    parser.add_argument("--fresh", action="store_true", help="re-run types already in the results")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    everything = model_types()
    kinds = {t: kind_of(t, mapping) for t, mapping in everything}
    wanted = args.types.split(",") if args.types else [t for t, _ in everything]
    rows: dict[str, dict[str, Any]] = {}
    if RESULTS.is_file() and not args.fresh:
        rows = json.loads(RESULTS.read_text())
    todo = [t for t in wanted if args.types or t not in rows]
    sweep(todo, rows, args.workers)
    write_table({t: r for t, r in rows.items() if t in kinds}, kinds)


if __name__ == "__main__":
    main()
