"""`shears demo` (`make demo`): the whole product once, end to end, through the HTTP API.

Starts `shears serve` on 127.0.0.1 (temporary data dir, free port), submits a SparseGPT 2:4 job for
the built-in model, follows its events with a progress bar, downloads the artifacts (sha256-checked),
loads the folder in transformers and checks the sparsity of every pruned layer, prints a report and
stops the server. Exits non-zero on any failure.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shears.client.client import ShearsClient
from shears.client.follow import follow
from shears.client.launch import ServerProcess


def demo_request(model: str, samples: int, seqlen: int, eval_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "method": "sparsegpt",
        "sparsity": 0.5,
        "pattern": "2:4",
        "calibration": {"source": "builtin", "samples": samples, "seqlen": seqlen, "seed": 0},
        "evaluation": {"enabled": True, "seqlen": seqlen, "max_tokens": eval_tokens},
        "formats": ["dense", "packed"],
    }


def check_sparsity(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Load the folder with transformers; every pruned layer must hold its N:M pattern and sparsity."""
    import torch
    from transformers import AutoModelForCausalLM

    request = manifest["request"]
    n, m = (int(x) for x in request["pattern"].split(":")) if ":" in request["pattern"] else (0, 0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    modules = dict(model.named_modules())
    by_kind: dict[str, list[float]] = defaultdict(list)
    for name, layer in manifest["layers"].items():
        weight = modules[name].weight.detach()
        zeros = float((weight == 0).float().mean())
        if m:
            groups = (weight.reshape(weight.shape[0], -1, m) != 0).sum(-1)
            if int(groups.max()) > n:
                raise AssertionError(
                    f"{name}: a group of {m} keeps {int(groups.max())} weights (pattern {n}:{m})"
                )
        expected = layer.get("sparsity")
        if expected is not None and abs(zeros - expected) > 1e-3:
            raise AssertionError(f"{name}: {zeros:.4f} zeros in the file, the manifest says {expected:.4f}")
        by_kind[name.rsplit(".", 1)[-1]].append(zeros)
    if not by_kind:
        raise AssertionError("the manifest lists no pruned layers")
    return {kind: (min(v), sum(v) / len(v), max(v), len(v)) for kind, v in sorted(by_kind.items())}


def report(
    job: dict[str, Any], manifest: dict[str, Any], layers: dict[str, Any], files: list[dict], seconds: float
) -> str:
    lines = [f"job {job['id']}: {job['status']} in {seconds:.0f} s (attempt {job['attempt']})"]
    model = manifest["model"]
    lines.append(
        f"model {model['spec']} ({model.get('architecture')}, {model.get('num_blocks')} blocks), "
        f"revision {job['model_revision']}"
    )
    request = manifest["request"]
    lines.append(f"method {request['method']}, pattern {request['pattern']}, sparsity {request['sparsity']}")
    ppl = manifest.get("perplexity")
    if ppl:
        lines.append(
            f"perplexity on {ppl['tokens']} held-out tokens (seqlen {ppl['seqlen']}): "
            f"dense {ppl['dense']:.2f} -> pruned {ppl['pruned']:.2f}"
        )
    lines.append("per-layer sparsity (min / mean / max over blocks):")
    for kind, (low, mean, high, count) in layers.items():
        lines.append(f"  {kind:<12} {low:.3f} / {mean:.3f} / {high:.3f}  ({count} layers)")
    timings = manifest.get("timings") or {}
    lines.append("timings: " + ", ".join(f"{phase} {value:.1f} s" for phase, value in timings.items()))
    rss = (manifest.get("peak_memory") or {}).get("rss_mb") or {}
    if rss:
        lines.append(f"peak memory: {max(rss.values()):.0f} MB RSS")
    total = sum(f["size"] for f in files)
    lines.append(f"artifacts: {len(files)} files, {total / 2**20:.1f} MiB, sha256 verified")
    return "\n".join(lines)


def run_demo(
    *,
    model: str = "smollm2-135m",
    samples: int = 32,
    seqlen: int = 256,
    eval_tokens: int = 4096,
    keep: Path | None = None,
) -> int:
    data_dir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="shears-demo-"))
    server = ServerProcess(data_dir / "server", args=["--log-level", "warning"], env={"SHEARS_TOKEN": ""})
    try:
        print(f"starting shears serve on {server.url} (data in {server.data_dir})", file=sys.stderr)
        server.start()
        with ShearsClient(server.url) as client:
            start = time.monotonic()
            job = client.submit(demo_request(model, samples, seqlen, eval_tokens))
            print(f"submitted job {job['id']}", file=sys.stderr)
            job = follow(client, job["id"])
            if job["status"] != "succeeded":
                print(f"job {job['status']}: {job['error']}", file=sys.stderr)
                return 1
            seconds = time.monotonic() - start
            dest = data_dir / "download"
            with tqdm(unit="B", unit_scale=True, desc="download", file=sys.stderr) as bar:
                files = client.download(
                    job["id"], dest, progress=bar.update, on_total=lambda n: bar.reset(total=n)
                )
            manifest = client.artifacts(job["id"])["manifest"]
        layers = check_sparsity(dest, manifest)
        print(report(job, manifest, layers, files, seconds))
        return 0
    except Exception as exc:
        print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if server.process is not None:
            print(server.log_tail(), file=sys.stderr)
        return 1
    finally:
        server.stop()
        if keep is None:
            shutil.rmtree(data_dir, ignore_errors=True)
