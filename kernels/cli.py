"""`shears pack`, `shears unpack`, `shears bench`: the kernels package's subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    pack = sub.add_parser("pack", help="pack a pruned folder's sparse weights into packed/sparse.safetensors")
    pack.add_argument("folder", type=Path)
    pack.add_argument("--pattern", help="'N:M' or 'unstructured'; default: the folder's manifest.json")
    pack.add_argument("--max-shard-bytes", type=int, default=2 << 30, help="shard above this size")
    pack.set_defaults(func=_pack)

    unpack = sub.add_parser("unpack", help="restore dense weights from a folder's packed/sparse.safetensors")
    unpack.add_argument("folder", type=Path)
    unpack.add_argument("--out", type=Path, required=True, help="new folder to write")
    unpack.set_defaults(func=_unpack)

    bench = sub.add_parser("bench", help="time packed vs dense matmuls and decode; write bench.json/.png")
    bench.add_argument("folder", type=Path)
    bench.add_argument(
        "--m", type=int, nargs="+", default=None, help="token counts (default 1 4 16 64 512 2048)"
    )
    bench.add_argument("--decode-tokens", type=int, default=64)
    bench.add_argument("--json", action="store_true", help="print the whole result as JSON")
    bench.set_defaults(func=_bench)


def _bar(description: str) -> tuple[Callable[[int, int, str], None], Callable[[], None]]:
    """A tqdm progress callback (done, total, item) and its closer; silent without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return (lambda done, total, item: None), (lambda: None)
    state: dict[str, Any] = {}

    def update(done: int, total: int, item: str) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=description, unit="tensor", file=sys.stderr)
        state["bar"].set_postfix_str(item[-40:], refresh=False)
        state["bar"].update(done - state["bar"].n)

    return update, lambda: state["bar"].close() if "bar" in state else None


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _pack(args: argparse.Namespace) -> int:
    from shears.kernels.errors import PackedFormatError
    from shears.kernels.selection import as_nm, pattern_text, select_for_packing
    from shears.kernels.sparse_file import pack_folder

    try:
        asked = as_nm(args.pattern) if args.pattern is not None else None
        pattern, names = select_for_packing(args.folder, asked)
        update, close = _bar("packing")
        try:
            files = pack_folder(
                args.folder, pattern, names, max_shard_bytes=args.max_shard_bytes, progress=update
            )
        finally:
            close()
    except (PackedFormatError, FileNotFoundError) as exc:
        return _fail(exc)
    _record_in_manifest(args.folder, files)
    print(f"packed {len(names)} tensors ({pattern_text(*pattern)}) into {', '.join(files)}")
    return 0


def _record_in_manifest(folder: Path, packed: list[str] | None = None, **updates: Any) -> None:
    """A Shears folder's manifest lists every file with its checksum: keep it true after adding some."""
    try:
        from shears.manifest import MANIFEST, refresh_files
    except ImportError:  # kernels/ works without the engine installed
        return
    if not (folder / MANIFEST).is_file():
        return
    if packed is not None:
        weights = json.loads((folder / MANIFEST).read_text()).get("weights") or {}
        updates["weights"] = {**weights, "packed": packed}
    refresh_files(folder, **updates)


def _unpack(args: argparse.Namespace) -> int:
    from shears.kernels.errors import PackedFormatError
    from shears.kernels.sparse_file import unpack_folder

    update, close = _bar("unpacking")
    try:
        report = unpack_folder(args.folder, args.out, progress=update)
    except (PackedFormatError, FileNotFoundError) as exc:
        return _fail(exc)
    finally:
        close()
    print(f"restored {len(report['restored'])} tensors into {args.out}")
    if report["differs_from_dense"]:
        print(
            f"note: {len(report['differs_from_dense'])} restored tensors differ from the dense copies "
            f"(e.g. -0.0 written as +0.0): {', '.join(report['differs_from_dense'][:3])}",
            file=sys.stderr,
        )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from shears.kernels.bench import M_VALUES, run_benchmark
    from shears.kernels.errors import PackedFormatError

    try:
        result = run_benchmark(
            args.folder, m_values=tuple(args.m or M_VALUES), decode_tokens=args.decode_tokens
        )
    except (PackedFormatError, FileNotFoundError) as exc:
        return _fail(exc)
    _record_in_manifest(args.folder, benchmark=result)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
        return 0
    print(summary(result))
    return 0


def summary(result: dict[str, Any]) -> str:
    """A few lines for the terminal: sizes, then the kernel table and decode speed where measured."""
    total = result["sizes"]["total"]
    lines = [
        f"device: {result['device'].get('name')}",
        f"packed layers: {total['layers']}, {total['packed_bytes']:,} bytes vs {total['dense_bytes']:,} dense"
        + (f" ({total['ratio']:.4f}x)" if total["ratio"] else ""),
    ]
    if result.get("message"):
        lines.append(result["message"])
    checks = result.get("checks")
    if checks:
        ok = sum(1 for r in checks["results"] if r.get("ok"))
        lines.append(f"kernel checks ({checks['mode']}): {ok}/{len(checks['results'])} ok")
    for row in result.get("kernels", []):
        speedup = row.get("speedup_shears")
        lines.append(
            f"{row['layer']:>12} {row['shape'][0]}x{row['shape'][1]} {row['pattern']:>12} M={row['m']:<5} "
            f"shears {row['shears_us'] or float('nan'):8.1f} us  "
            f"dense {row['dense_us'] or float('nan'):8.1f} us  "
            f"x{speedup or float('nan'):.2f}  dispatch={row['dispatch']}"
        )
    decode = result.get("decode")
    if decode and "speedup" in decode:
        lines.append(
            f"decode: {decode['packed_tokens_per_s']:.1f} tok/s packed vs "
            f"{decode['dense_tokens_per_s']:.1f} dense "
            f"(x{decode['speedup']:.2f}), tokens agree {decode['tokens_agree']:.0%}"
        )
    elif decode:
        lines.append(f"decode: {decode.get('error')}")
    lines.append("wrote bench.json and bench.png")
    return "\n".join(lines)
