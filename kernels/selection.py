"""Which weights of a folder to pack, and with which pattern: from its manifest, or found in its weights.

A Shears folder's manifest.json names the pattern (`request.pattern`) and the pruned layers (`layers`,
keyed by module name). A folder without one is searched: every 2-D weight of the decoder blocks that
satisfies the pattern (N:M), or that a bitmask stores in fewer bytes than dense (unstructured).
Patterns are (n, m) pairs here, (0, 0) for unstructured; text is parsed where it arrives (as_nm).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from shears.kernels.errors import PackedFormatError
from shears.manifest import MANIFEST
from shears.pattern import Pattern

# Decoder-block weights: model.layers.3.mlp.up_proj.weight, transformer.h.0.attn.c_attn.weight, ...
BLOCK_WEIGHT = re.compile(r"(^|\.)(layers|h|blocks|block)\.\d+\.(.+\.)?[^.]+\.weight$")
_NOT_LINEAR = re.compile(r"(norm|embed|ln_\d|layernorm)", re.IGNORECASE)


def as_nm(text: str) -> tuple[int, int]:
    """(n, m) of a pattern's text ('2:4'; 'unstructured' is (0, 0)); PackedFormatError if it is neither."""
    try:
        return Pattern.parse(text).nm
    except ValueError as exc:
        raise PackedFormatError(str(exc)) from None


def pattern_text(n: int, m: int) -> str:
    return f"{n}:{m}" if m else "unstructured"


def names_from_manifest(folder: Path) -> tuple[tuple[int, int], list[str]] | None:
    """((n, m), weight names) from manifest.json, or None if the folder has no manifest."""
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
    return as_nm(pattern), [f"{name}.weight" for name in layers]


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


def guess_pattern(folder: Path) -> tuple[tuple[int, int], list[str]]:
    """For a folder with neither manifest nor pattern: the first common N:M its block weights fit, else
    unstructured (a weight pruned unstructured fits no N:M by chance)."""
    for n, m in GUESSES:
        names = detect_names(folder, n, m)
        if names:
            return (n, m), names
    names = detect_names(folder, 0, 0)
    if not names:
        raise PackedFormatError(f"{folder}: no decoder-block weight is sparse enough to pack")
    return (0, 0), names


def select_for_packing(folder: Path, pattern: tuple[int, int] | None) -> tuple[tuple[int, int], list[str]]:
    """((n, m), names) to pack: the manifest's when there is one, else the weights that fit `pattern`."""
    from_manifest = names_from_manifest(folder)
    if from_manifest is not None:
        manifest_pattern, names = from_manifest
        if pattern is not None and pattern != manifest_pattern:
            raise PackedFormatError(
                f"{folder}: the manifest says pattern {pattern_text(*manifest_pattern)}; "
                f"got --pattern {pattern_text(*pattern)}"
            )
        return manifest_pattern, names
    if pattern is None:
        raise PackedFormatError(
            f"{folder} has no {MANIFEST}: say which pattern its weights follow (--pattern 2:4)"
        )
    names = detect_names(folder, *pattern)
    if not names:
        raise PackedFormatError(f"{folder}: no decoder-block weight fits pattern {pattern_text(*pattern)}")
    return pattern, names
