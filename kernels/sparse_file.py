"""`packed/sparse.safetensors`: the packed tensors of a pruned Hugging Face folder, beside its dense weights.

They live in the `packed/` subfolder because loaders (vLLM, TGI, llama.cpp converters) take every
`*.safetensors` file at the top of a folder without an index for model weights: a packed file there
breaks them. Folders written before this layout hold the packed files at the top; both are read, and
`shears pack` moves an old folder's to `packed/`.

One file, or shards `sparse-00001-of-0000N.safetensors` + `sparse.safetensors.index.json` (like the
dense weights) when the packed tensors exceed `max_shard_bytes`. A weight "W.weight" is stored as
"W.weight.values" + "W.weight.meta" (N:M) or "W.weight.bitmask" + ".values" + ".row_offsets" (see
formats.py). Each file's safetensors metadata holds "format" = "shears.sparse", "format_version" and
"tensors": JSON {name: {"layout", "n", "m", "shape", "dtype"}}. Files are written deterministically
(same weights, same bytes) under a temporary name, fsynced, then renamed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from shears.kernels.errors import PackedFormatError
from shears.kernels.formats import FORMAT_NAME, FORMAT_VERSION, PackedWeight
from shears.kernels.registry import FORMATS, format_of, pack, unpack, validate
from shears.kernels.safetensors_io import dtype_name, read_header, save_deterministic, tensor_bytes

PACKED_DIR = "packed"
SPARSE_FILE = "sparse.safetensors"
SPARSE_INDEX = "sparse.safetensors.index.json"
DENSE_INDEX = "model.safetensors.index.json"
_SHARD = "sparse-{:05d}-of-{:05d}.safetensors"
_SPARSE_NAME = re.compile(r"^sparse(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
Progress = Callable[[int, int, str], None]


def natural_key(name: str) -> list[Any]:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def is_sparse_file(name: str) -> bool:
    return bool(_SPARSE_NAME.match(name))


def _has_pack(place: Path) -> bool:
    return (place / SPARSE_INDEX).exists() or (place / SPARSE_FILE).exists()


def packed_place(folder: Path) -> Path:
    """Where `folder` keeps its packed files: packed/, or the folder itself in an old-layout folder."""
    folder = Path(folder)
    if not _has_pack(folder / PACKED_DIR) and _has_pack(folder):
        return folder
    return folder / PACKED_DIR


def sparse_files(folder: Path) -> list[Path]:
    """The packed files of `folder` (empty if it has none): the single file, or the shards of its index."""
    place = packed_place(folder)
    if (place / SPARSE_INDEX).exists():
        weight_map = _read_json(place / SPARSE_INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise PackedFormatError(f"{place / SPARSE_INDEX}: no weight_map")
        return [place / name for name in sorted(set(weight_map.values()))]
    return [place / SPARSE_FILE] if (place / SPARSE_FILE).exists() else []


def dense_tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the dense safetensors file holding it."""
    folder = Path(folder)
    if (folder / DENSE_INDEX).exists():
        weight_map = _read_json(folder / DENSE_INDEX).get("weight_map", {})
        return {name: folder / file for name, file in weight_map.items()}
    found: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        if is_sparse_file(path.name):
            continue
        with _open(path) as handle:
            found.update(dict.fromkeys(handle.keys(), path))
    return found


# ------------------------------------------------------------------------------------------ writing


def pack_folder(
    folder: Path,
    pattern: tuple[int, int],
    names: list[str],
    *,
    max_shard_bytes: int = 2 << 30,
    progress: Progress | None = None,
    device: str | None = None,
) -> list[str]:
    """Pack the dense tensors `names` of `folder` with `pattern` into packed/sparse*.safetensors; return the
    written files' names relative to `folder` (packed/sparse.safetensors, or shards and their index).

    Packing runs on `device` (default: the GPU when there is one; the bytes are the same either way).

    `pattern`: (n, m), (0, 0) for unstructured; it packs in the first layout of registry.FORMATS that
    stores it (N:M with M <= 16 as N:M, anything else as a bitmask). Raises PackedFormatError for a
    missing, non-2-D or pattern-violating tensor.
    """
    folder = Path(folder)
    n, m = pattern
    sources = dense_tensor_files(folder)
    ordered = sorted(set(names), key=natural_key)
    missing = [name for name in ordered if name not in sources]
    if missing:
        raise PackedFormatError(
            f"{missing[0]}: not found in the safetensors files of {folder}"
            + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
        )
    shards: list[Path] = []
    place = folder / PACKED_DIR
    created = not place.exists()
    place.mkdir(exist_ok=True)
    try:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return _pack_into(folder, ordered, sources, (n, m), max_shard_bytes, progress, shards, device)
    except BaseException:
        for part in shards:  # leave no half-written pack behind
            part.unlink(missing_ok=True)
        if created:
            shutil.rmtree(place, ignore_errors=True)
        raise


def _pack_into(
    folder: Path,
    ordered: list[str],
    sources: dict[str, Path],
    pattern: tuple[int, int],
    max_shard_bytes: int,
    progress: Progress | None,
    shards: list[Path],
    device: str,
) -> list[str]:
    tensors: dict[str, torch.Tensor] = {}
    infos: dict[str, dict[str, Any]] = {}
    size = 0
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for done, name in enumerate(ordered):
            path = sources[name]
            if path not in handles:
                handles[path] = stack.enter_context(_open(path))
            packed = pack(handles[path].get_tensor(name).to(device), *pattern, name).to("cpu")
            if tensors and size + packed.nbytes > max_shard_bytes:
                shards.append(_write_shard(folder, len(shards), tensors, infos))
                tensors, infos, size = {}, {}, 0
            tensors.update({f"{name}.{part}": t.contiguous() for part, t in packed.tensors().items()})
            infos[name] = entry_info(packed)
            size += packed.nbytes
            if progress:
                progress(done + 1, len(ordered), name)
    if tensors or not shards:
        shards.append(_write_shard(folder, len(shards), tensors, infos))
    return _finish(folder, shards)


def entry_info(packed: PackedWeight) -> dict[str, Any]:
    n, m = packed.nm
    return {
        "layout": packed.layout,
        "n": n,
        "m": m,
        "shape": list(packed.shape),
        "dtype": str(packed.dtype).removeprefix("torch."),
    }


def _write_shard(folder: Path, index: int, tensors: dict[str, torch.Tensor], infos: dict[str, dict]) -> Path:
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "tensors": json.dumps(infos, sort_keys=True, separators=(",", ":")),
    }
    path = folder / PACKED_DIR / f".sparse-part-{index:05d}.safetensors.tmp"
    save_deterministic(tensors, path, metadata)
    return path


def _finish(folder: Path, parts: list[Path]) -> list[str]:
    """Rename the written parts to their final names in packed/, write the index, remove stale sparse
    files (an earlier pack's, and an old-layout folder's at the top)."""
    place = folder / PACKED_DIR
    if len(parts) == 1:
        finals = [SPARSE_FILE]
    else:
        finals = [_SHARD.format(i + 1, len(parts)) for i in range(len(parts))]
    weight_map: dict[str, str] = {}
    total = 0
    for part, final in zip(parts, finals, strict=True):
        with _open(part) as handle:
            weight_map.update(dict.fromkeys(handle.keys(), final))
        total += part.stat().st_size
        os.replace(part, place / final)
    written = list(finals)
    if len(parts) > 1:
        index = {
            "metadata": {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "total_size": total},
            "weight_map": dict(sorted(weight_map.items(), key=lambda kv: natural_key(kv[0]))),
        }
        atomic_write_text(place / SPARSE_INDEX, json.dumps(index, indent=2) + "\n")
        written.append(SPARSE_INDEX)
    for path in [*place.iterdir(), *folder.iterdir()]:
        if is_sparse_file(path.name) and not (path.parent == place and path.name in written):
            path.unlink()
    _fsync_dir(place)
    _fsync_dir(folder)
    return [f"{PACKED_DIR}/{name}" for name in written]


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_deterministic(tensors, tmp, metadata)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ reading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PackedFormatError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise PackedFormatError(f"{path}: expected a JSON object")
    return data


def _open(path: Path, device: str = "cpu") -> Any:
    try:
        return safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise PackedFormatError(f"{path}: not a readable safetensors file ({exc})") from exc


def _file_entries(path: Path, handle: Any) -> dict[str, dict[str, Any]]:
    metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT_NAME:
        raise PackedFormatError(
            f"{path}: not a Shears sparse file (metadata format {metadata.get('format')!r})"
        )
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise PackedFormatError(
            f"{path}: sparse format version {version!r} is unknown; this Shears reads "
            f"version {FORMAT_VERSION}"
        )
    try:
        entries = json.loads(metadata.get("tensors", ""))
    except json.JSONDecodeError as exc:
        raise PackedFormatError(f"{path}: metadata 'tensors' is not JSON ({exc})") from exc
    if not isinstance(entries, dict):
        raise PackedFormatError(f"{path}: metadata 'tensors' must map tensor names to descriptions")
    return entries


def _entry_parts(path: Path, name: str, entry: Any) -> tuple[str, int, int, tuple[int, int], str]:
    if not isinstance(entry, dict) or entry.get("layout") not in FORMATS:
        raise PackedFormatError(
            f"{name} in {path.name}: layout must be one of {sorted(FORMATS)}; got {entry!r}"
        )
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) for d in shape)):
        raise PackedFormatError(f"{name} in {path.name}: shape must be [rows, columns]; got {shape!r}")
    n, m = entry.get("n") or 0, entry.get("m") or 0
    layout = entry["layout"]
    if not (isinstance(n, int) and isinstance(m, int) and FORMATS[layout].stores(n, m)):
        raise PackedFormatError(f"{name} in {path.name}: {layout} layout with unusable pattern {n}:{m}")
    return layout, n, m, (shape[0], shape[1]), str(entry.get("dtype"))


def read_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """Name -> description (+ "file" and "nbytes") of every packed tensor, without loading the tensors."""
    found: dict[str, dict[str, Any]] = {}
    for path in sparse_files(folder):
        with _open(path) as handle:
            keys = set(handle.keys())
            for name, entry in _file_entries(path, handle).items():
                layout = _entry_parts(path, name, entry)[0]
                nbytes = 0
                for part in FORMATS[layout].parts:
                    if f"{name}.{part}" not in keys:
                        raise PackedFormatError(f"{name}: {path.name} lacks its '{part}' tensor")
                    t = handle.get_slice(f"{name}.{part}")
                    numel = 1
                    for d in t.get_shape():
                        numel *= d
                    nbytes += numel * _dtype_size(t.get_dtype())
                found[name] = {**entry, "file": path.name, "nbytes": nbytes}
    return found


def _dtype_size(name: str) -> int:
    sizes = {
        "F64": 8,
        "F32": 4,
        "F16": 2,
        "BF16": 2,
        "I64": 8,
        "I32": 4,
        "I16": 2,
        "U8": 1,
        "I8": 1,
        "BOOL": 1,
    }
    return sizes.get(name, 0)


def read_packed(
    folder: Path, *, device: str = "cpu", names: Iterable[str] | None = None, check: bool = True
) -> dict[str, PackedWeight]:
    """Load (and by default validate) the packed tensors of `folder`; PackedFormatError if anything is off."""
    wanted = set(names) if names is not None else None
    files = sparse_files(folder)
    if not files:
        raise PackedFormatError(f"{folder}: no {PACKED_DIR}/{SPARSE_FILE} (run `shears pack {folder}`)")
    loaded: dict[str, PackedWeight] = {}
    for path in files:
        if not path.exists():
            raise PackedFormatError(f"{path}: listed in {SPARSE_INDEX} but missing")
        with _open(path, device) as handle:
            keys = set(handle.keys())
            entries = _file_entries(path, handle)
            claimed = {
                f"{name}.{part}"
                for name, e in entries.items()
                for part in FORMATS[_entry_parts(path, name, e)[0]].parts
            }
            if keys - claimed:
                raise PackedFormatError(
                    f"{path.name}: tensors {sorted(keys - claimed)[:3]} belong to no declared packed weight"
                )
            for name, entry in entries.items():
                if wanted is not None and name not in wanted:
                    continue
                layout, n, m, shape, dtype = _entry_parts(path, name, entry)
                record = format_of(layout)
                parts = {}
                for part in record.parts:
                    if f"{name}.{part}" not in keys:
                        raise PackedFormatError(f"{name}: {path.name} lacks its '{part}' tensor")
                    parts[part] = handle.get_tensor(f"{name}.{part}")
                packed = record.assemble(parts, n, m, shape)
                if str(packed.dtype).removeprefix("torch.") != dtype:
                    raise PackedFormatError(
                        f"{name}.values: dtype {packed.dtype} but the metadata says {dtype}"
                    )
                if check:
                    validate(packed, name)
                if name in loaded:
                    raise PackedFormatError(f"{name}: stored twice in {folder}")
                loaded[name] = packed
    if wanted is not None and wanted - loaded.keys():
        raise PackedFormatError(
            f"{sorted(wanted - loaded.keys())[0]}: not among the packed tensors of {folder}"
        )
    return loaded


# ---------------------------------------------------------------------------------------- unpacking


def _patched_copy(source: Path, target: Path, packed: dict[str, PackedWeight]) -> list[str]:
    """Copy a dense safetensors file, rewriting the data of every packed tensor in it from its packed form.

    Header and layout stay as they were, so a file whose dense tensors equal their packed forms comes
    out byte-identical. Returns the names whose stored bytes differed from the packed form.
    """
    try:
        data_start, header = read_header(source)
    except (OSError, ValueError, struct.error) as exc:
        raise PackedFormatError(f"{source}: not a readable safetensors file ({exc})") from exc
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    differs = []
    with open(tmp, "r+b") as handle:
        for name in sorted(set(header) & packed.keys(), key=natural_key):
            weight, entry = packed[name], header[name]
            if entry.get("dtype") != dtype_name(weight.dtype) or list(entry.get("shape", [])) != list(
                weight.shape
            ):
                raise PackedFormatError(
                    f"{name}: packed as {weight.dtype} {tuple(weight.shape)} but {source.name} holds "
                    f"{entry.get('dtype')} {entry.get('shape')}"
                )
            begin, end = entry["data_offsets"]
            restored = tensor_bytes(unpack(weight))
            handle.seek(data_start + begin)
            if handle.read(end - begin) != restored:
                differs.append(name)
                handle.seek(data_start + begin)
                handle.write(restored)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    return differs


def unpack_folder(folder: Path, out: Path, *, progress: Progress | None = None) -> dict[str, Any]:
    """Write `out`: `folder` with every packed tensor restored dense from its packed files (no packed/).

    Dense files are copied with each packed tensor's bytes rewritten in place, so when the folder's dense
    tensors match their packed forms the output files are byte-identical to the input's. Returns
    {"files": written, "restored": names, "differs_from_dense": names whose dense copy in `folder` was
    not bit-identical (a -0.0 in a pruned slot, or a hand-edited file)}.
    """
    folder, out = Path(folder), Path(out)
    if out.resolve() == folder.resolve():
        raise PackedFormatError("unpack writes a new folder: --out must differ from the packed folder")
    packed = read_packed(folder)
    out.mkdir(parents=True, exist_ok=True)
    sources = dense_tensor_files(folder)
    dense_files = sorted(set(sources.values()))
    written: list[str] = []
    for path in sorted(folder.iterdir()):
        if (
            path.is_file()
            and not is_sparse_file(path.name)
            and path not in dense_files
            and not path.name.startswith(".")
        ):
            shutil.copy2(path, out / path.name)
            written.append(path.name)
    differs: list[str] = []
    for done, path in enumerate(dense_files):
        differs += _patched_copy(path, out / path.name, packed)
        written.append(path.name)
        if progress:
            progress(done + 1, len(dense_files), path.name)
    orphans = {name: unpack(p) for name, p in packed.items() if name not in sources}
    if orphans:  # a folder whose dense copies were removed: restore them into one more shard
        extra = "model-restored.safetensors"
        atomic_save(orphans, out / extra, {"format": "pt"})
        weight_map = {name: path.name for name, path in sources.items()} | dict.fromkeys(orphans, extra)
        index = {
            "metadata": {},
            "weight_map": dict(sorted(weight_map.items(), key=lambda kv: natural_key(kv[0]))),
        }
        atomic_write_text(out / DENSE_INDEX, json.dumps(index, indent=2) + "\n")
        written += [extra, DENSE_INDEX] if DENSE_INDEX not in written else [extra]
    _fsync_dir(out)
    return {
        "files": sorted(set(written)),
        "restored": sorted(packed, key=natural_key),
        "differs_from_dense": differs,
    }
