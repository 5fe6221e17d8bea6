"""`make bench-peers`: Shears against llm-compressor on the same model, tokens and evaluation.

Calibrated on each domain of the built-in corpus in turn (Shakespeare, GSM8K; bench.peers.domains),
both tools prune the same dense safetensors folder with the same calibration token ids (one
.safetensors file both read), each in its own child process measured from the outside (wall time,
peak RSS). Every output folder, and the dense model, goes through the one perplexity function
`pruning.evaluate.perplexity_of_folder` on the held-out text of *both* domains: the same domain as
its calibration and the other one. Shears also runs its papers' variants. Then a width sweep of
random-weight Llama-style models compares prune time and peak RSS as size grows.
Results: bench/results/peers-<date>.json, .md and .png (+ -scaling.png).

Usage: python -m bench.peers.run [--methods ...] [--patterns ...] [--domains ...] [--no-scaling] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import psutil
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bench.peers import report
from bench.peers.domains import DomainWindows, describe, domain_windows
from bench.peers.measure import parameter_count, pruned_weight_names
from bench.peers.tools import (
    VARIANT_NAMES,
    VARIANTS,
    Job,
    ToolResult,
    import_floor,
    parse_scaling_run,
    peer_import_argv,
    run_peer,
    run_shears,
    shears_import_argv,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PEER_PYTHON = REPO / "bench" / ".venv-peers" / "bin" / "python"
DEFAULT_VLLM_PYTHON = REPO / "bench" / ".venv-vllm" / "bin" / "python"
Method = Literal["sparsegpt", "wanda", "magnitude"]
Domain = Literal["shakespeare", "gsm8k"]


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2-135m", description="built-in alias or dense folder, as `shears prune` takes")
    model_name: str | None = Field(None, description="name in the report; default: the model spec")
    methods: list[Method] = ["sparsegpt", "wanda", "magnitude"]
    patterns: list[str] = ["unstructured", "2:4"]
    sparsity: Annotated[float, Field(gt=0, lt=1)] = 0.5
    domains: list[Domain] = Field(
        ["shakespeare", "gsm8k"],
        description="calibrate on each in turn; every output is evaluated on the held-out text of all",
    )
    samples: Annotated[int, Field(ge=1)] = 64
    seqlen: Annotated[int, Field(ge=8)] = 512
    batch_size: Annotated[int, Field(ge=1)] = 8
    eval_seqlen: Annotated[int, Field(ge=8)] = 512
    eval_tokens: Annotated[int, Field(ge=64)] = 20480
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Shears' block forwards ('auto': bf16 on CPUs with AMX/AVX512-BF16)"
    )
    variants: list[str] = Field(
        VARIANT_NAMES, description="which of Shears' VARIANTS to run next to each default ([]: none)"
    )
    default: bool = Field(True, description="run each method's default (and the peer); False: variants only")
    calibrate_on: list[Domain] | None = Field(
        None, description="calibrate on these domains only (default: every domain); all are evaluated"
    )
    peer_python: Path | None = Field(DEFAULT_PEER_PYTHON, description="None or missing: Shears side only")
    vllm_python: Path | None = Field(
        DEFAULT_VLLM_PYTHON, description="None or missing: outputs are not loaded in vLLM (make vllm-venv)"
    )
    work_dir: Path = REPO / "bench" / "work" / "peers"
    results_dir: Path = REPO / "bench" / "results"
    tag: str | None = Field(None, description="results file suffix; default: today's date")
    keep_outputs: bool = False
    scaling_widths: list[int] = [512, 1024, 2048]
    scaling_layers: Annotated[int, Field(ge=1)] = 8
    scaling_ffn_ratio: Annotated[int, Field(ge=1)] = 4
    scaling_samples: Annotated[int, Field(ge=1)] = 16
    scaling_runs: list[str] = Field(
        ["sparsegpt:unstructured", "wanda:unstructured"],
        description="'method:pattern[:variant]' timed at each width (a variant of VARIANTS: Shears runs it, "
        "the peer's time is the default run's at that width, or its own run if none)",
    )

    @property
    def peer_available(self) -> bool:
        return self.peer_python is not None and self.peer_python.is_file()

    @model_validator(mode="after")
    def _known_variants_and_domains(self) -> BenchConfig:
        unknown = sorted(set(self.variants) - set(VARIANT_NAMES))
        if unknown:
            raise ValueError(f"unknown variants {unknown}; expected some of {VARIANT_NAMES}")
        outside = sorted(set(self.calibrate_on or []) - set(self.domains))
        if outside:
            raise ValueError(f"calibrate_on {outside} is not among the domains {self.domains}")
        from shears.pattern import Pattern

        for spec in self.scaling_runs:
            method, pattern, _ = parse_scaling_run(spec)
            if method not in ("sparsegpt", "wanda", "magnitude"):
                raise ValueError(f"scaling run {spec!r}: unknown method {method!r}")
            try:
                Pattern.parse(pattern)
            except ValueError as error:
                raise ValueError(f"scaling run {spec!r}: {error}") from None
        return self

    @property
    def vllm_available(self) -> bool:
        return self.vllm_python is not None and self.vllm_python.is_file()


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_ids(path: Path, ids: torch.Tensor) -> Path:
    from shears.calibration.windows import save_windows

    path.parent.mkdir(parents=True, exist_ok=True)
    save_windows(path, ids)
    return path


def _slug(*parts: str) -> str:
    return "-".join(part.replace(":", "of") for part in parts)


class Bench:
    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.work = config.work_dir
        self.tag = config.tag or dt.date.today().isoformat()
        self.json_path = config.results_dir / f"peers-{self.tag}.json"
        self.data: dict[str, Any] = {}
        self.windows: dict[str, DomainWindows] = {}
        self.calib_paths: dict[str, Path] = {}

    def log(self, message: str) -> None:
        print(f"[bench-peers] {message}", file=sys.stderr, flush=True)

    # -- setup -------------------------------------------------------------------------------------
    def prepare(self) -> None:
        from transformers import AutoTokenizer

        from shears.manifest import versions
        from shears.pruning.config import EngineOptions
        from shears.pruning.evaluate import perplexity_of_folder
        from shears.pruning.models import resolve_model

        config = self.config
        if len(set(config.domains)) != len(config.domains) or not config.domains:
            raise ValueError(f"domains must be distinct and not empty, got {config.domains}")
        self.work.mkdir(parents=True, exist_ok=True)
        self.dense = resolve_model(config.model, None, EngineOptions()).path
        self.log(f"dense folder {self.dense}")
        tokenizer = AutoTokenizer.from_pretrained(self.dense)
        calibration: dict[str, Any] = {}
        evaluation: dict[str, Any] = {}
        dense: dict[str, Any] = {}
        for domain in config.domains:
            windows = domain_windows(
                domain,
                self.work / "domains",
                tokenizer,
                samples=config.samples,
                seqlen=config.seqlen,
                eval_seqlen=config.eval_seqlen,
                eval_tokens=config.eval_tokens,
            )
            self.windows[domain] = windows
            path = _save_ids(
                self.work / f"calib-{domain}-{config.samples}x{config.seqlen}.safetensors",
                windows.calibration,
            )
            self.calib_paths[domain] = path
            calibration[domain] = {
                "source": describe(domain, "calibration"),
                "samples": int(windows.calibration.shape[0]),
                "seqlen": int(windows.calibration.shape[1]),
                "batch_size": config.batch_size,
                "file": str(path),
                "sha256": _sha256(path),
                "info": windows.info,
            }
            self.log(f"{domain}: evaluating the dense model")
            ppl = perplexity_of_folder(self.dense, windows.evaluation)
            evaluation[domain] = {
                "source": describe(domain, "evaluation"),
                "function": "shears.pruning.evaluate.perplexity_of_folder",
                "seqlen": ppl.seqlen,
                "windows": ppl.windows,
                "tokens": ppl.tokens,
            }
            dense[domain] = ppl.to_dict()
            self.log(f"{domain}: dense perplexity {ppl.ppl:.3f} ({ppl.windows} x {ppl.seqlen} tokens)")
        self.weight_names = pruned_weight_names(self.dense)
        self.data = {
            "benchmark": "shears-vs-llm-compressor",
            "date": self.tag,
            "machine": machine_info(),
            "tools": {"shears": versions(), "llm-compressor": {}},
            "model": {
                "name": config.model_name or config.model,
                "spec": config.model,
                "folder": str(self.dense),
                "parameters": parameter_count(self.dense),
                "pruned_weights": len(self.weight_names),
            },
            "domains": list(config.domains),
            "calibration": calibration,
            "evaluation": evaluation,
            "dense": dense,
            "settings": {
                "sparsity": config.sparsity,
                "sparsegpt_damp": 0.01,
                "sparsegpt_block_size": 128,
                "device": "cpu",
                "shears_compute_dtype": config.compute_dtype,
                "peer_compute_dtype": "float32",
                "shears_variants": {},  # run_benchmark sets it: it knows which parts run
                "peer_modifiers": "SparseGPTModifier / WandaPruningModifier targeting the decoder "
                "blocks; MagnitudePruningModifier (init = final sparsity) with its "
                "mask applied at finalize (see run_llmcompressor.py)",
            },
            "measures": report.MEASURES,
            "config": config.model_dump(mode="json"),
            "harness_command": [sys.executable, *sys.argv],
            "commands": [],
            "rows": [],
            "import_floor": self._import_floors(),
            "scaling": None,
        }

    def _import_floors(self) -> dict[str, Any] | None:
        floors = {"shears": import_floor(shears_import_argv(), self.work / "logs" / "import-shears.log")}
        if not self.config.peer_available:
            return floors
        assert self.config.peer_python is not None
        floors["llm-compressor"] = import_floor(
            peer_import_argv(self.config.peer_python), self.work / "logs" / "import-peer.log"
        )
        return floors

    # -- runs --------------------------------------------------------------------------------------
    def _run(self, tool: str, job: Job, name: str, weight_names: list[str], evaluate: bool) -> ToolResult:
        from shears.pruning.evaluate import perplexity_of_folder

        out, log = self.work / "out" / f"{name}-{tool}", self.work / "logs" / f"{name}-{tool}.log"
        load = [round(x, 2) for x in os.getloadavg()]
        if tool == "shears":
            self.log(f"{name}: Shears")
            result = run_shears(job, out, log, weight_names)
        elif self.config.peer_available:
            assert self.config.peer_python is not None
            self.log(f"{name}: llm-compressor")
            result = run_peer(job, out, log, weight_names, self.config.peer_python)
        else:
            result = ToolResult(
                tool="llm-compressor",
                status="not_offered",
                note=f"peer venv missing ({self.config.peer_python}); run make bench-peers",
            )
        result.details["loadavg_before"] = load
        if "argv" in result.details:
            self.data["commands"].append({"run": name, "tool": result.tool, "argv": result.details["argv"]})
        if result.status == "ok" and evaluate:
            result.ppl = {
                domain: perplexity_of_folder(out, windows.evaluation).ppl
                for domain, windows in self.windows.items()
            }
            result.details["compatibility"] = self._runtimes(out)
        if result.status == "ok" and not self.config.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
        self.log(
            f"{name}: {result.tool} {result.status} prune_s={result.prune_s} "
            f"rss={result.peak_rss_mb} sparsity={result.sparsity} ppl={result.ppl} {result.note[:200]}"
        )
        return result

    def _runtimes(self, out: Path) -> dict[str, Any]:
        """vLLM's verdict on an output folder, checked after the tool's measured run (its own children)."""
        from shears.pruning.runtimes import verify_folders

        if not self.config.vllm_available:
            return {"vllm": {"checked": False, "note": f"no vLLM venv at {self.config.vllm_python}"}}
        sections = verify_folders([out], ["vllm"], {"vllm": str(self.config.vllm_python)}, log=self.log)
        return next(iter(sections.values()))["runtimes"]

    def job(self, method: str, pattern: str, model: Path, calib: Path, samples: int) -> Job:
        from shears.pattern import Pattern

        structured = Pattern.parse(pattern).sparsity
        return Job(
            model=model,
            calib=calib,
            method=method,
            pattern=pattern,
            sparsity=structured if structured is not None else self.config.sparsity,
            samples=samples,
            seqlen=self.config.seqlen,
            batch_size=self.config.batch_size,
            compute_dtype=self.config.compute_dtype,
        )

    def run_rows(self) -> None:
        config = self.config
        for domain in config.calibrate_on or config.domains:
            for method in config.methods:
                for pattern in config.patterns:
                    job = self.job(method, pattern, self.dense, self.calib_paths[domain], config.samples)
                    name = _slug(domain, method, pattern)
                    if config.default:
                        shears = self._run("shears", job, name, self.weight_names, True)
                        peer = self._run("peer", job, name, self.weight_names, True)
                    else:
                        skipped = "not run (--no-default: variants only)"
                        shears = ToolResult(tool="shears", status="not_offered", note=skipped)
                        peer = ToolResult(tool="llm-compressor", status="not_offered", note=skipped)
                    self._note_peer_versions(peer)
                    row = report.make_row(domain, method, pattern, shears, peer)
                    for variant, flags in VARIANTS.get(method, {}).items():
                        if variant not in config.variants:
                            continue
                        variant_job = dataclasses.replace(job, shears_flags=flags)
                        result = self._run(
                            "shears", variant_job, _slug(name, variant), self.weight_names, True
                        )
                        report.add_variant(row, variant, result)
                    self.data["rows"].append(row)
                    self.write()

    def run_scaling(self) -> None:
        from bench.peers.synthetic import synthetic_llama

        config = self.config
        if not config.scaling_widths or not config.scaling_runs:
            return
        first = self.windows[config.domains[0]]
        calib = _save_ids(
            self.work / f"calib-{config.domains[0]}-{config.scaling_samples}x{config.seqlen}.safetensors",
            first.calibration[: config.scaling_samples],
        )
        self.data["scaling"] = {
            "description": f"random-weight Llama, {config.scaling_layers} layers, intermediate = "
            f"{config.scaling_ffn_ratio} x hidden, {', '.join(config.scaling_runs)}, "
            f"{config.scaling_samples} x {config.seqlen} calibration tokens ({config.domains[0]})",
            "runs": list(config.scaling_runs),
            "samples": config.scaling_samples,
            "seqlen": config.seqlen,
            "layers": config.scaling_layers,
            "points": [],
        }
        for hidden in config.scaling_widths:
            intermediate = hidden * config.scaling_ffn_ratio
            self.log(f"synthetic model hidden {hidden} intermediate {intermediate}")
            folder = synthetic_llama(
                self.work / "synthetic" / f"h{hidden}-l{config.scaling_layers}",
                hidden=hidden,
                intermediate=intermediate,
                layers=config.scaling_layers,
                tokenizer_from=self.dense,
            )
            names = pruned_weight_names(folder)
            peers: dict[tuple[str, str], ToolResult] = {}  # one peer run per method and pattern
            for spec in config.scaling_runs:
                method, pattern, variant = parse_scaling_run(spec)
                job = self.job(method, pattern, folder, calib, config.scaling_samples)
                name = _slug("scaling", f"h{hidden}", method, pattern)
                if variant != "default":
                    job = dataclasses.replace(job, shears_flags=VARIANTS[method][variant])
                    name = _slug(name, variant)
                shears = self._run("shears", job, name, names, False)
                peer = peers.get((method, pattern)) or self._run("peer", job, name, names, False)
                peers[method, pattern] = peer
                self._note_peer_versions(peer)
                self.data["scaling"]["points"].append(
                    {
                        "hidden": hidden,
                        "intermediate": intermediate,
                        "layers": config.scaling_layers,
                        "parameters": parameter_count(folder),
                        "method": method,
                        "pattern": pattern,
                        "variant": variant,
                        "shears": shears.to_dict(),
                        "peer": peer.to_dict(),
                        "time_ratio": report.ratio(shears.prune_s, peer.prune_s),
                        "rss_ratio": report.ratio(shears.peak_rss_mb, peer.peak_rss_mb),
                        "wall_ratio": report.ratio(shears.wall_s, peer.wall_s),
                    }
                )
                self.write()

    def _note_peer_versions(self, peer: ToolResult) -> None:
        """The peer's versions, from its first successful run (quality rows or the width sweep)."""
        if peer.status == "ok" and not self.data["tools"]["llm-compressor"]:
            self.data["tools"]["llm-compressor"] = {
                k: peer.details[k] for k in ("version", "transformers", "torch") if k in peer.details
            }

    # -- output ------------------------------------------------------------------------------------
    def write(self) -> None:
        self.data["summary"] = report.summary(self.data["rows"], self.data.get("scaling"))
        report.write_json(self.json_path, self.data)
        self.json_path.with_suffix(".md").write_text(report.markdown(self.data))
        if self.data["rows"]:
            report.chart(self.data, self.json_path.with_suffix(".png"))
        scaling = self.data.get("scaling")
        if scaling and scaling["points"]:
            report.scaling_chart(scaling, self.json_path.with_name(f"peers-{self.tag}-scaling.png"))

    def print_ratios(self) -> None:
        print(f"\nShears / llm-compressor ({self.json_path}):")
        for line in report.ratio_lines(self.data):
            print(line)
        summary = self.data["summary"]
        print("targets met: " + ", ".join(f"{k} {v['met']}/{v['of']}" for k, v in summary.items()))


def variants_run(config: BenchConfig, *, rows: bool, scaling: bool) -> dict[str, dict[str, list[str]]]:
    """The Shears variants a run uses, with their flags: next to each row's default, and in the sweep."""
    used: dict[str, set[str]] = {}
    if rows:
        for method in config.methods:
            used.setdefault(method, set()).update(v for v in config.variants if v in VARIANTS.get(method, {}))
    if scaling and config.scaling_widths:
        for spec in config.scaling_runs:
            method, _, variant = parse_scaling_run(spec)
            if variant != "default":
                used.setdefault(method, set()).add(variant)
    return {m: {v: list(VARIANTS[m][v]) for v in sorted(names)} for m, names in used.items() if names}


def run_benchmark(config: BenchConfig, *, rows: bool = True, scaling: bool = True) -> dict[str, Any]:
    bench = Bench(config)
    if not config.peer_available:
        bench.log(f"no peer venv at {config.peer_python}: Shears side only")
    bench.prepare()
    bench.data["settings"]["shears_variants"] = variants_run(config, rows=rows, scaling=scaling)
    if rows:
        bench.run_rows()
    if scaling:
        bench.run_scaling()
    bench.write()
    bench.print_ratios()
    return bench.data


def _parse(argv: list[str] | None) -> tuple[BenchConfig, bool, bool]:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(prog="bench-peers", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument(
        "--methods", nargs="+", default=defaults.methods, choices=["sparsegpt", "wanda", "magnitude"]
    )
    parser.add_argument("--patterns", nargs="+", default=defaults.patterns)
    parser.add_argument("--domains", nargs="+", default=defaults.domains, choices=["shakespeare", "gsm8k"])
    parser.add_argument("--samples", type=int, default=defaults.samples)
    parser.add_argument("--seqlen", type=int, default=defaults.seqlen)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens)
    parser.add_argument(
        "--compute-dtype", default=defaults.compute_dtype, choices=["auto", "float32", "bfloat16"]
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        default=defaults.variants,
        choices=VARIANT_NAMES,
        help="Shears' variants run next to each default (none: --variants with no name)",
    )
    parser.add_argument("--no-variants", action="store_true", help="skip Shears' variants")
    parser.add_argument(
        "--no-default", action="store_true", help="run only the variants (no default, no peer): split runs"
    )
    parser.add_argument(
        "--calibrate-on",
        nargs="+",
        choices=["shakespeare", "gsm8k"],
        help="calibrate on these domains only (default: every --domains); every domain is evaluated",
    )
    parser.add_argument("--peer-python", type=Path, default=defaults.peer_python)
    parser.add_argument("--vllm-python", type=Path, default=defaults.vllm_python)
    parser.add_argument("--work-dir", type=Path, default=defaults.work_dir)
    parser.add_argument("--results-dir", type=Path, default=defaults.results_dir)
    parser.add_argument("--tag", help="results file suffix (default: today's date)")
    parser.add_argument(
        "--keep-outputs", action="store_true", help="keep the pruned folders under --work-dir"
    )
    parser.add_argument("--scaling-widths", type=int, nargs="*", default=defaults.scaling_widths)
    parser.add_argument("--scaling-layers", type=int, default=defaults.scaling_layers)
    parser.add_argument("--scaling-samples", type=int, default=defaults.scaling_samples)
    parser.add_argument("--scaling-runs", nargs="*", default=defaults.scaling_runs, help="method:pattern")
    parser.add_argument("--no-rows", action="store_true", help="only the width sweep")
    parser.add_argument("--no-scaling", action="store_true", help="skip the width sweep")
    args = parser.parse_args(argv)
    config = BenchConfig(
        model=args.model,
        methods=args.methods,
        patterns=args.patterns,
        domains=args.domains,
        samples=args.samples,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        eval_tokens=args.eval_tokens,
        compute_dtype=args.compute_dtype,
        variants=[] if args.no_variants else args.variants,
        calibrate_on=args.calibrate_on,
        default=not args.no_default,
        peer_python=args.peer_python,
        vllm_python=args.vllm_python,
        work_dir=args.work_dir,
        results_dir=args.results_dir,
        tag=args.tag,
        keep_outputs=args.keep_outputs,
        scaling_widths=args.scaling_widths,
        scaling_layers=args.scaling_layers,
        scaling_samples=args.scaling_samples,
        scaling_runs=args.scaling_runs,
    )
    return config, not args.no_rows, not args.no_scaling


def main(argv: list[str] | None = None) -> int:
    config, rows, scaling = _parse(argv)
    run_benchmark(config, rows=rows, scaling=scaling)
    return 0


if __name__ == "__main__":
    sys.exit(main())
