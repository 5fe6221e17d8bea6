"""Which weights of a folder to pack, and with which pattern: from its manifest, or found in its weights.

A Shears folder's manifest.json names the pattern (`request.pattern`) and the pruned layers (`layers`,
keyed by module name). A folder without one is searched: every 2-D weight of the decoder blocks that
satisfies the pattern (N:M), or that a bitmask stores in fewer bytes than dense (unstructured).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from shears.kernels.errors import PackedFormatError
from shears.manifest import MANIFEST

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
# Decoder-block weights: model.layers.3.mlp.up_proj.weight, transformer.h.0.attn.c_attn.weight, ...
BLOCK_WEIGHT = re.compile(r"(^|\.)(layers|h|blocks|block)\.\d+\.(.+\.)?[^.]+\.weight$")
_NOT_LINEAR = re.compile(r"(norm|embed|ln_\d|layernorm)", re.IGNORECASE)


def as_nm(pattern: Any) -> tuple[int, int]:
    """(n, m) of a pattern: pruning.config.Pattern, anything with .n/.m, '2:4' or 'unstructured' (0, 0)."""
    if hasattr(pattern, "n") and hasattr(pattern, "m"):
        n, m = int(pattern.n), int(pattern.m)
    elif isinstance(pattern, str) and pattern.strip().lower() == "unstructured":
        n, m = 0, 0
    elif isinstance(pattern, str) and (match := _NM.match(pattern)):
        n, m = int(match[1]), int(match[2])
    else:
        raise PackedFormatError(
            f"pattern {pattern!r} is neither 'unstructured' nor 'N:M' (for example '2:4')"
        )
    if (n, m) != (0, 0) and not 0 < n < m:
        raise PackedFormatError(f"pattern {n}:{m}: N:M needs 0 < N < M")
    return n, m


def pattern_text(n: int, m: int) -> str:
    return f"{n}:{m}" if m else "unstructured"


def names_from_manifest(folder: Path) -> tuple[str, list[str]] | None:
    """(pattern, weight names) from manifest.json, or None if the folder has no manifest."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        pattern = manifest["request"]["pattern"]
        layers = manifest["layers"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PackedFormatError(f"{path}: needs request.pattern and layers ({exc!r})") from exc
    if not isinstance(pattern, str) or not isinstance(layers, dict):
        raise PackedFormatError(f"{path}: request.pattern must be a string and layers an object")
    return pattern, [f"{name}.weight" for name in layers]


def detect_names(folder: Path, n: int, m: int) -> list[str]:
    """Decoder-block 2-D weights of `folder` that fit pattern n:m (n = m = 0: worth a bitmask)."""
    from safetensors import safe_open

    from shears.kernels.formats import satisfies_nm
    from shears.kernels.sparse_file import dense_tensor_files, natural_key

    found = []
    by_file: dict[Path, list[str]] = {}
    for name, path in dense_tensor_files(folder).items():
        if BLOCK_WEIGHT.search(name) and not _NOT_LINEAR.search(name):
            by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for name in names:
                weight = handle.get_tensor(name)
                if weight.dim() != 2 or not weight.is_floating_point():
                    continue
                if satisfies_nm(weight, n, m) if m else _bitmask_saves(weight):
                    found.append(name)
    return sorted(found, key=natural_key)


def _bitmask_saves(weight: Any) -> bool:
    rows, cols = weight.shape
    dense = weight.numel() * weight.element_size()
    packed = rows * -(-cols // 8) + int((weight != 0).sum()) * weight.element_size() + 8 * (rows + 1)
    return packed < dense


GUESSES = ((2, 4), (4, 8), (1, 4))


def guess_pattern(folder: Path) -> tuple[str, list[str]]:
    """For a folder with neither manifest nor pattern: the first common N:M its block weights fit, else
    unstructured (a weight pruned unstructured fits no N:M by chance)."""
    for n, m in GUESSES:
        names = detect_names(folder, n, m)
        if names:
            return pattern_text(n, m), names
    names = detect_names(folder, 0, 0)
    if not names:
        raise PackedFormatError(f"{folder}: no decoder-block weight is sparse enough to pack")
    return "unstructured", names


def select_for_packing(folder: Path, pattern: str | None) -> tuple[str, list[str]]:
    """(pattern, names) to pack: the manifest's when there is one, else the weights that fit `pattern`."""
    from_manifest = names_from_manifest(folder)
    if from_manifest is not None:
        manifest_pattern, names = from_manifest
        if pattern is not None and as_nm(pattern) != as_nm(manifest_pattern):
            raise PackedFormatError(
                f"{folder}: the manifest says pattern {manifest_pattern}; got --pattern {pattern}"
            )
        return manifest_pattern, names
    if pattern is None:
        raise PackedFormatError(
            f"{folder} has no {MANIFEST}: say which pattern its weights follow (--pattern 2:4)"
        )
    n, m = as_nm(pattern)
    names = detect_names(folder, n, m)
    if not names:
        raise PackedFormatError(f"{folder}: no decoder-block weight fits pattern {pattern_text(n, m)}")
    return pattern_text(n, m), names
