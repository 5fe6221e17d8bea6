"""The output folder around the weights: config and tokenizer files, verification, the manifest."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from shears.manifest import MANIFEST, file_entries, versions, write_json
from shears.pattern import Pattern
from shears.pruning.block_pruner import LayerResult
from shears.pruning.checkpoint import INDEX, Checkpoint
from shears.pruning.config import PruneRequest
from shears.pruning.experts import MIN_EXPERT_TOKENS
from shears.pruning.keymap import KeyMap
from shears.pruning.masks import achieved_sparsity, satisfies_pattern
from shears.pruning.models import ResolvedModel
from shears.pruning.skeleton import Skeleton

# Files of the source folder that are not carried over: weights (rewritten), pickles, our own records.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".lock")
_SKIP_NAMES = {INDEX, MANIFEST, "shears-source.json", "bench.json", "bench.png"}


def copy_model_files(source: Path, dest: Path, dtype: torch.dtype | None) -> list[str]:
    """Copy config, tokenizer and generation files; record a changed dtype in config.json."""
    copied = []
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.suffix in _SKIP_SUFFIXES or path.name in _SKIP_NAMES:
            continue
        if path.name.startswith(("sparse", ".")):
            continue
        shutil.copyfile(path, dest / path.name)
        copied.append(path.name)
    if dtype is not None:
        config = json.loads((dest / "config.json").read_text())
        name = str(dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = name
        config.setdefault("dtype", name)
        (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return copied


def check_layout(folder: Path) -> None:
    """What every loader sees is exactly the model: the top-level *.safetensors files are the weights
    (one model.safetensors, or the shards its index names and nothing else) and nothing packed is there.

    vLLM, TGI and converters take every top-level *.safetensors of a folder without an index.
    """
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if (folder / INDEX).is_file():
        listed = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        if found != listed:
            raise RuntimeError(f"verification: {INDEX} lists {listed} but the folder holds {found}")
    elif found != ["model.safetensors"]:
        raise RuntimeError(f"verification: {len(found)} weight files {found} and no {INDEX}")


def verify_output(folder: Path, layers: list[LayerResult], pattern: Pattern, keymap: KeyMap) -> None:
    """Re-read every pruned matrix from disk (through the checkpoint's key map, so in the layout the
    model sees): sparsity as recorded and the pattern holds."""
    from transformers import AutoConfig

    check_layout(folder)
    AutoConfig.from_pretrained(folder)
    written = Checkpoint(folder)
    params: dict[str, torch.Tensor] = {}
    for layer in sorted(layers, key=lambda r: r.param):  # one parameter in memory at a time
        if layer.param not in params:
            params = {layer.param: keymap.load([layer.param], checkpoint=written)[layer.param]}
        weight = _matrix(params[layer.param], layer)
        if achieved_sparsity(weight) != layer.sparsity:
            raise RuntimeError(
                f"verification: {layer.name} on disk has sparsity {achieved_sparsity(weight)}, "
                f"solver reported {layer.sparsity}"
            )
        if pattern.structured and not satisfies_pattern(weight, pattern):
            raise RuntimeError(f"verification: {layer.name} on disk breaks the {pattern} pattern")
        if torch.signbit(weight[weight == 0]).any():
            raise RuntimeError(f"verification: {layer.name} on disk holds -0.0")


def _matrix(tensor: torch.Tensor, layer: LayerResult) -> torch.Tensor:
    if layer.expert is not None:
        tensor = tensor[layer.expert]
    return tensor.T.contiguous() if layer.transposed else tensor


def packable_names(layers: list[LayerResult], keymap: KeyMap) -> list[str]:
    """Checkpoint keys of the pruned matrices stored as plain [out, in] tensors (what the packed
    format holds); Conv1D and fused or converted expert tensors stay dense only."""
    names = []
    for layer in layers:
        if layer.expert is None and not layer.transposed and not keymap.converted([layer.param]):
            names.extend(keymap.keys_of([layer.param]))
    return names


def _moe_summary(layers: list[LayerResult]) -> dict[str, Any] | None:
    """Per experts parameter: tokens each expert saw, and which used the fallback statistics."""
    experts: dict[str, dict[str, Any]] = {}
    for layer in layers:
        if layer.expert is None or layer.tokens is None:
            continue
        entry = experts.setdefault(layer.param, {"tokens": {}, "fallback": []})
        entry["tokens"][str(layer.expert)] = layer.tokens
        if layer.fallback and layer.expert not in entry["fallback"]:
            entry["fallback"].append(layer.expert)
    if not experts:
        return None
    return {
        "min_tokens": MIN_EXPERT_TOKENS,
        "fallback_rule": "experts routed fewer than min_tokens calibration tokens are pruned with the "
        "statistics of every token reaching their MoE layer",
        "router": "dense",
        "experts": experts,
    }


def _sparsity_summary(layers: list[LayerResult], skeleton: Skeleton, target: float) -> dict[str, Any]:
    pruned_params = sum(r.shape[0] * r.shape[1] for r in layers)
    zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in layers)
    all_params = sum(
        int(torch.Size(shape).numel())
        for name, shape in skeleton.checkpoint.shapes.items()
        if skeleton.checkpoint.dtypes[name].is_floating_point
    )
    return {
        "target": target,
        "pruned_layers": len(layers),
        "pruned_parameters": pruned_params,
        "achieved": zeros / pruned_params if pruned_params else 0.0,
        "of_all_parameters": zeros / all_params if all_params else 0.0,
    }


def write_manifest(
    folder: Path,
    *,
    request: PruneRequest,
    model: ResolvedModel,
    skeleton: Skeleton,
    windows_info: dict[str, Any],
    layers: list[LayerResult],
    blocks: list[dict[str, Any]],
    perplexity: dict[str, Any] | None,
    weight_files: list[str],
    packed_files: list[str],
    benchmark: dict[str, Any] | None,
    clock: dict[str, Any],
    solver: dict[str, Any] | None = None,
    compatibility: dict[str, Any] | None = None,
    attempts: list[dict[str, Any]] | None = None,
    structure: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`solver`: the exact algorithm that ran (method, variant, parameters, error correction)."""
    manifest: dict[str, Any] = {
        "format": "shears-manifest/1",
        "request": request.model_dump(mode="json"),
        "solver": solver,
        "model": {
            "spec": model.spec,
            "source": model.kind,
            "revision": model.revision,
            "architecture": type(skeleton.model).__name__,
            "model_type": skeleton.config.model_type,
            "num_blocks": skeleton.num_blocks,
            "blocks_prefix": skeleton.blocks_prefix,
            "compute_dtype": str(skeleton.dtype).removeprefix("torch."),
            "device": skeleton.device.type,
        },
        "calibration": windows_info,
        "versions": versions(),
        "sparsity": _sparsity_summary(layers, skeleton, request.sparsity),
        "layers": {r.name: {k: v for k, v in asdict(r).items() if k != "name"} for r in layers},
        "blocks": blocks,
        "moe": _moe_summary(layers),
        "perplexity": perplexity,
        "weights": {"dense": weight_files, "packed": packed_files},
        "benchmark": benchmark,
        "compatibility": compatibility,
        "timings": clock["seconds"],
        "total_seconds": clock["total_seconds"],
        "peak_memory": {"rss_mb": clock["peak_rss_mb"], "cuda_mb": clock["peak_cuda_mb"]},
    }
    if attempts is not None:  # a resumable job: where each attempt started (pruning.resume)
        manifest["attempts"] = attempts
    if structure is not None:
        manifest["structure"] = structure
    manifest["files"] = file_entries(folder)
    write_json(folder / MANIFEST, manifest)
    return manifest
