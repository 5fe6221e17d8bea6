"""`shears prune`, `shears eval` and `shears models`: the engine from the terminal."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from shears.progress import Event
from shears.pruning.methods import NO_METHOD


def register(sub: argparse._SubParsersAction) -> None:
    from shears.pruning.methods import METHODS

    prune = sub.add_parser("prune", help="prune a model one-shot and write a Hugging Face folder")
    prune.add_argument("model", help="built-in alias (smollm2-135m), local folder, .gguf file or hub repo id")
    prune.add_argument("--out", required=True, type=Path, help="output folder (must not exist)")
    prune.add_argument(
        "--method",
        required=True,
        choices=[*METHODS, NO_METHOD],
        help=f"'{NO_METHOD}' with --structure: structured pruning alone",
    )
    prune.add_argument(
        "--structure",
        help="remove whole units first: layers=, mlp=, heads=, experts= (fractions), e.g. "
        "'mlp=0.25,heads=0.25'; also reconstruct=, granule=, channel_score=, contiguous=, "
        "layer_refit=, speed=",
    )
    prune.add_argument(
        "--sparsity", type=float, help="fraction of weights to zero; implied by an N:M pattern"
    )
    prune.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M such as 2:4")
    prune.add_argument("--revision")
    prune.add_argument(
        "--calib", default="builtin", help="builtin | self | hf:<dataset>[:<config>[:<split>]] | path"
    )
    prune.add_argument("--text-column")
    prune.add_argument("--samples", type=int, default=128)
    prune.add_argument("--seqlen", type=int, default=512)
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--batch-size", type=int, default=8)
    prune.add_argument("--eval-source", help="held-out text source (default: held out from --calib)")
    prune.add_argument("--eval-seqlen", type=int, default=512)
    prune.add_argument("--eval-tokens", type=int, default=20480)
    prune.add_argument("--no-eval", action="store_true", help="skip perplexity before/after")
    prune.add_argument("--ignore", action="append", help="regex of layer names to leave dense (repeatable)")
    prune.add_argument("--override", action="append", default=[], metavar="REGEX=SPARSITY")
    prune.add_argument("--owl", action="store_true", help="outlier-weighted layer-wise sparsity")
    prune.add_argument(
        "--error-correction",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fit each layer to the dense model's outputs (block-level error correction)",
    )
    prune.add_argument("--correction-damp", type=float, help="ridge of the error correction (default 0.01)")
    prune.add_argument("--true-sequential", action="store_true")
    _add_method_options(prune)
    prune.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    prune.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    prune.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    prune.add_argument("--formats", default="dense", help="comma list of: dense, packed")
    prune.add_argument("--benchmark", action="store_true", help="time the pruned layers' kernels")
    prune.add_argument(
        "--verify-runtimes",
        default="",
        help="comma list of runtimes that must load the output (vllm); needs --vllm-python",
    )
    prune.add_argument(
        "--max-shard-bytes", type=int, help="split weight files above this size (default 2 GiB)"
    )
    prune.add_argument("--request", type=Path, help="a JSON job request; flags given here are ignored")
    prune.add_argument("--allow-pickle", action="store_true", help="allow loading .bin/.pt checkpoints")
    prune.add_argument("--trust-remote-code", action="store_true")
    prune.add_argument("--cache-dir")
    prune.add_argument("--quiet", action="store_true", help="no progress bar")
    _python_flags(prune)
    prune.set_defaults(func=_prune)

    verify = sub.add_parser(
        "verify-runtimes",
        help="load output folders in other runtimes (vLLM) and compare greedy tokens with transformers",
    )
    verify.add_argument("folders", type=Path, nargs="+")
    verify.add_argument("--runtimes", default="vllm", help="comma list (default vllm)")
    _python_flags(verify)
    verify.set_defaults(func=_verify_runtimes)

    evaluate = sub.add_parser("eval", help="perplexity of a model folder on held-out text")
    evaluate.add_argument("model", help="folder, .gguf, alias or hub id")
    evaluate.add_argument("--source", default="builtin")
    evaluate.add_argument("--seqlen", type=int, default=512)
    evaluate.add_argument("--tokens", type=int, default=20480)
    evaluate.add_argument("--cache-dir")
    evaluate.set_defaults(func=_eval)

    models = sub.add_parser("models", help="built-in models")
    models.add_argument("action", choices=["list", "prepare"])
    models.add_argument("name", nargs="?", default="smollm2-135m")
    models.add_argument("--cache-dir")
    models.set_defaults(func=_models)


def _method_option_fields() -> dict[str, tuple[Any, list[str]]]:
    """Every field of the methods' options models -> (its FieldInfo, the methods that take it)."""
    from shears.pruning.methods import METHODS

    fields: dict[str, tuple[Any, list[str]]] = {}
    for name, entry in METHODS.items():
        for field, info in (entry.options.model_fields if entry.options else {}).items():
            fields.setdefault(field, (info, []))[1].append(name)
    return fields


def _field_info(method: str, field: str) -> Any:
    from shears.pruning.methods import METHODS

    options = METHODS[method].options
    assert options is not None
    return options.model_fields[field]


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """One flag per option of the methods (`--refine-iterations`); it sets the chosen method's
    options block, so a flag several methods share means the same to each."""
    for field, (info, methods) in _method_option_fields().items():
        kind = info.annotation
        extra: dict[str, Any] = (
            {"action": argparse.BooleanOptionalAction}
            if kind is bool
            else {"type": kind, "metavar": field.upper()}
        )
        if get_origin(kind) is Literal:  # a choice of names (--variant paper): any method's choices
            choices = {c: None for m in methods for c in get_args(_field_info(m, field).annotation)}
            kind, extra = str, {"choices": list(choices)}
        if kind not in (bool, int, float, str):
            raise TypeError(f"option {field} of {methods}: give the command line a type for {kind}")
        parser.add_argument(
            "--" + field.replace("_", "-"),
            dest=f"option_{field}",
            default=None,
            help=f"{', '.join(methods)}: {info.description or field} (default {info.default})".replace(
                "%",
                "%%",  # argparse formats help strings with %
            ),
            **extra,
        )


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options flags given, checked against the chosen method's options model."""
    from shears.pruning.methods import METHODS

    given = {f: v for f in _method_option_fields() if (v := getattr(args, f"option_{f}")) is not None}
    entry = METHODS.get(args.method)
    options = entry.options if entry is not None else None
    stray = sorted(set(given) - set(options.model_fields if options else ()))
    if stray:
        flags = ", ".join("--" + f.replace("_", "-") for f in stray)
        raise ValueError(f"{flags}: not an option of method {args.method}")
    return given


def _python_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vllm-python",
        default=os.environ.get("SHEARS_VLLM_PYTHON"),
        help="a Python with vLLM installed (default $SHEARS_VLLM_PYTHON; `make vllm-venv` builds "
        "bench/.venv-vllm/bin/python)",
    )


def _runtime_pythons(args: argparse.Namespace) -> dict[str, str]:
    return {"vllm": args.vllm_python} if args.vllm_python else {}


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _request_from_args(args: argparse.Namespace) -> Any:
    from shears.pattern import Pattern
    from shears.pruning.config import CalibrationSpec, EvaluationSpec, PruneRequest
    from shears.structure import parse_structure

    if args.request:
        return PruneRequest.model_validate_json(args.request.read_text())
    sparsity = args.sparsity
    if sparsity is None and args.method != NO_METHOD:
        sparsity = Pattern.parse(args.pattern).sparsity
        if sparsity is None:
            raise ValueError("--sparsity is required for an unstructured pattern")
    overrides = {}
    for item in args.override:
        regex, _, value = item.rpartition("=")
        if not regex:
            raise ValueError(f"--override {item!r}: expected REGEX=SPARSITY")
        overrides[regex] = float(value)
    fields: dict[str, Any] = dict(
        model=args.model,
        revision=args.revision,
        method=args.method,
        sparsity=sparsity,
        pattern=args.pattern,
        calibration=CalibrationSpec(
            source=args.calib,
            samples=args.samples,
            seqlen=args.seqlen,
            seed=args.seed,
            text_column=args.text_column,
            batch_size=args.batch_size,
        ),
        evaluation=EvaluationSpec(
            enabled=not args.no_eval,
            source=args.eval_source,
            seqlen=args.eval_seqlen,
            max_tokens=args.eval_tokens,
        ),
        overrides=overrides,
        true_sequential=args.true_sequential,
        dtype=args.dtype,
        compute_dtype=args.compute_dtype,
        device=args.device,
        formats=[f.strip() for f in args.formats.split(",") if f.strip()],
        benchmark=args.benchmark,
        verify_runtimes=_names(args.verify_runtimes),
    )
    options = _method_options(args)
    if options:
        fields[args.method] = options
    if args.structure is not None:
        fields["structure"] = parse_structure(args.structure)
    if args.owl:
        fields["owl"] = {}
    if args.error_correction is not None or args.correction_damp is not None:
        on = args.error_correction is not False
        damp = {} if args.correction_damp is None else {"damp": args.correction_damp}
        fields["error_correction"] = damp if on else None
    if args.ignore is not None:
        fields["ignore"] = args.ignore
    return PruneRequest(**fields)


class ProgressBar:
    """Draws engine events as a tqdm bar per phase on stderr."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if event.kind == "phase":
            self.close()
            print(f"[shears] {event.message}", file=sys.stderr)
        elif event.kind == "progress" and event.total:
            if self.bar is None:
                self.bar = tqdm(total=event.total, desc=event.phase, unit="block", file=sys.stderr)
            self.bar.update((event.done or 0) - self.bar.n)
        elif event.kind == "log":
            print(f"[shears] {event.message}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _options(args: argparse.Namespace) -> Any:
    from shears.pruning.config import EngineOptions

    fields: dict[str, Any] = dict(
        cache_dir=args.cache_dir,
        allow_pickle=getattr(args, "allow_pickle", False),
        trust_remote_code=getattr(args, "trust_remote_code", False),
        runtime_pythons=_runtime_pythons(args),
    )
    if getattr(args, "max_shard_bytes", None):
        fields["max_shard_bytes"] = args.max_shard_bytes
    return EngineOptions(**fields)


def _prune(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from shears.errors import ShearsError
    from shears.pruning.engine import prune
    from shears.pruning.models import check_request_fits

    try:
        request = _request_from_args(args)
    except (ValidationError, ValueError) as exc:
        print(f"shears prune: invalid request: {exc}", file=sys.stderr)
        return 2
    bar = ProgressBar(not args.quiet)
    try:
        check_request_fits(request)  # before preparing the model (a GGUF conversion takes a while)
        manifest = prune(request, args.out, reporter=bar, options=_options(args))
    except ShearsError as exc:
        bar.close()
        print(f"shears prune: {exc.code}: {exc}", file=sys.stderr)
        return 2
    bar.close()
    print(report_text(manifest))
    print(f"wrote {args.out}")
    return 0


def report_text(manifest: dict[str, Any]) -> str:
    """A short human summary of a job's manifest."""
    request, sparsity = manifest["request"], manifest["sparsity"]
    lines = [
        f"model      {manifest['model']['spec']} ({manifest['model']['architecture']}, "
        f"{manifest['model']['num_blocks']} blocks)",
    ]
    if request["method"] != NO_METHOD:
        lines += [
            f"method     {request['method']} {request['pattern']} target {sparsity['target']:.3f}",
            f"sparsity   {sparsity['achieved']:.4f} over {sparsity['pruned_layers']} layers "
            f"({sparsity['of_all_parameters']:.4f} of all parameters)",
        ]
    if manifest.get("structure"):
        lines += _structure_lines(manifest["structure"])
    ppl = manifest.get("perplexity")
    if ppl:
        lines.append(
            f"perplexity dense {ppl['dense']:.3f} -> pruned {ppl['pruned']:.3f} "
            f"({ppl['windows']} windows x {ppl['seqlen']} tokens, {ppl['tokens']} predicted)"
        )
    from shears.pruning.runtimes import describe

    for name, verdict in ((manifest.get("compatibility") or {}).get("runtimes") or {}).items():
        lines.append(f"runtime    {describe(name, verdict)}")
    timings = " ".join(f"{k} {v:.1f}s" for k, v in manifest["timings"].items())
    lines.append(f"time       {manifest['total_seconds']:.1f}s ({timings})")
    lines.append(f"peak RSS   {max(manifest['peak_memory']['rss_mb'].values()):.0f} MiB")
    return "\n".join(lines)


def _verify_runtimes(args: argparse.Namespace) -> int:
    from shears.errors import ShearsError
    from shears.manifest import refresh_files
    from shears.pruning.runtimes import describe, verify_folders

    try:
        sections = verify_folders(
            args.folders,
            _names(args.runtimes),
            _runtime_pythons(args),
            log=lambda message: print(f"[shears] {message}", file=sys.stderr),
        )
    except ShearsError as exc:
        print(f"shears verify-runtimes: {exc.code}: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for folder, section in zip(args.folders, sections.values(), strict=True):
        refresh_files(folder, compatibility=section)  # a Shears folder's report says what was checked
        for name, verdict in section["runtimes"].items():
            print(f"{folder}: {describe(name, verdict)}")
            failed += not verdict["ok"]
    return 1 if failed else 0


def _structure_lines(structure: dict[str, Any]) -> list[str]:
    plan, params, size = structure["plan"], structure["parameters"], structure["bytes"]
    widths = ", ".join(
        f"{key} {plan[key]}"
        for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "experts")
        if plan[key] is not None
    )
    lines = [
        f"structure  removed blocks {plan['removed_blocks'] or 'none'}; {widths or 'widths unchanged'}",
        f"size       {params['before']:,} -> {params['after']:,} parameters, "
        f"{size['before'] / 2**20:.1f} -> {size['after'] / 2**20:.1f} MiB",
    ]
    speed = structure.get("speed")
    if speed and "dense" in speed:
        dense, pruned = speed["dense"], speed["pruned"]
        lines.append(
            f"speed      prefill {dense['prefill_tokens_per_s']:.0f} -> "
            f"{pruned['prefill_tokens_per_s']:.0f} tok/s "
            f"({speed['prefill_speedup']:.2f}x), decode {dense['decode_tokens_per_s']:.1f} -> "
            f"{pruned['decode_tokens_per_s']:.1f} tok/s ({speed['decode_speedup']:.2f}x) "
            f"[{dense['device']} {dense['dtype']}]"
        )
    return lines


def _eval(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from shears.calibration.windows import load_windows
    from shears.errors import ShearsError
    from shears.pruning.config import CalibrationSpec, EngineOptions, EvaluationSpec
    from shears.pruning.evaluate import perplexity_of_folder
    from shears.pruning.models import resolve_model

    try:
        model = resolve_model(args.model, None, EngineOptions(cache_dir=args.cache_dir))
        tokenizer = AutoTokenizer.from_pretrained(model.path)
        windows = load_windows(
            CalibrationSpec(source=args.source, samples=1, seqlen=8),
            EvaluationSpec(source=args.source, seqlen=args.seqlen, max_tokens=args.tokens),
            tokenizer,
        )
        assert windows.evaluation is not None
        result = perplexity_of_folder(model.path, windows.evaluation)
    except ShearsError as exc:
        print(f"shears eval: {exc.code}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"model": args.model, "source": args.source, **result.to_dict()}, indent=2))
    return 0


def _models(args: argparse.Namespace) -> int:
    from shears.pruning.config import EngineOptions
    from shears.pruning.models import BUILTIN_MODELS, resolve_model

    if args.action == "list":
        for name, (package, file) in BUILTIN_MODELS.items():
            print(f"{name}\t{package}/{file}")
        return 0
    print(resolve_model(args.name, None, EngineOptions(cache_dir=args.cache_dir)).path)
    return 0
