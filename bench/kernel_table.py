"""Kernel table for the Llama-8B linear shapes: Shears' kernels vs dense cuBLAS vs torch semi-structured.

Random bf16 weights, 2:4 and bitmask at 50 / 70 / 90 % sparsity, M in {1, 4, 16, 64, 512, 2048}; CUDA
events after warm-up, L2 flushed, median of many runs (kernels/timing.py). Writes
bench/results/kernels-<device>-<date>.json and .png, and prints the table and the issue's targets.

    PYTHONPATH=. .venv/bin/python bench/kernel_table.py [--m 1 16] [--shapes qo kv] [--layouts 2:4 bitmask90]
"""

from __future__ import annotations

import argparse
import datetime
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from shears.kernels.bench import device_info, kernel_rows, memory_bytes, write_result
from shears.kernels.dispatch import Dispatcher, triton_status
from shears.kernels.formats import PackedWeight, dense_nbytes, pack_bitmask, pack_nm

SHAPES = {"qo": (4096, 4096), "kv": (1024, 4096), "up": (14336, 4096), "down": (4096, 14336)}
LAYOUTS = {"2:4": None, "bitmask50": 0.5, "bitmask70": 0.7, "bitmask90": 0.9}
M_VALUES = (1, 4, 16, 64, 512, 2048)


def random_weight(rows: int, cols: int, layout: str, dtype: torch.dtype, seed: int) -> PackedWeight:
    """A random weight of the layout, made and packed on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g, device="cuda", dtype=torch.float32) * 0.02
    sparsity = LAYOUTS[layout]
    if sparsity is None:
        order = torch.rand(rows, cols // 4, 4, generator=g, device="cuda").argsort(-1)
        keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool, device="cuda").scatter_(
            -1, order[..., :2], True
        )
        return pack_nm(torch.where(keep.view(rows, cols), weight, 0.0).to(dtype), 2, 4, layout)
    keep = torch.rand(rows, cols, generator=g, device="cuda") >= sparsity
    return pack_bitmask(torch.where(keep, weight, 0.0).to(dtype), layout)


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, as measured: speedups over dense cuBLAS."""

    def speedups(key: str, pick) -> list[float]:
        return [r[key] for r in rows if pick(r) and r.get(key)]

    decode_24 = speedups("speedup_shears", lambda r: r["pattern"] == "2:4" and r["m"] <= 16)
    prefill_24 = speedups("speedup_dispatch", lambda r: r["pattern"] == "2:4" and r["m"] >= 512)
    prefill_kernel = speedups("speedup_shears", lambda r: r["pattern"] == "2:4" and r["m"] >= 512)
    out: dict[str, Any] = {
        "2:4 M<=16 Shears vs dense (target >= 1.5)": _spread(decode_24),
        "2:4 M>=512 dispatch vs dense (target >= 1.0)": _spread(prefill_24),
        "2:4 M>=512 Shears kernel alone vs dense": _spread(prefill_kernel),
    }
    for density, goal in ((0.3, 2.0), (0.1, 4.0)):
        values = speedups(
            "speedup_shears",
            lambda r, d=density: r["layout"] == "bitmask" and r["m"] == 1 and abs(r["density"] - d) < 0.02,
        )
        out[f"bitmask {round((1 - density) * 100)}% M=1 Shears vs dense (target >= {goal})"] = _spread(values)
    out["all outputs correct"] = all(r.get("correct", True) for r in rows)
    return out


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# Decode models: random weights of the real shapes (speed does not depend on trained values; agreement
# with the dense-with-zeros model is checked all the same). The GPU box has no GGUF reader for the
# built-in checkpoint, and a pruned copy is too big to carry there.
DECODE_MODELS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}  # fmt: skip


def decode_model(name: str, layers: int | None, folder: Path, device: str = "cuda") -> Path:
    """A random bf16 Llama of the named shape, decoder linears magnitude-pruned to 2:4, saved and packed."""
    from torch import nn
    from transformers import AutoModelForCausalLM, LlamaConfig

    from shears.kernels.sparse_file import pack_folder

    settings = dict(DECODE_MODELS[name], max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    if layers:
        settings["num_hidden_layers"] = layers
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**settings), dtype=torch.bfloat16)
    names = []
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in module_name:
                groups = module.weight.view(module.weight.shape[0], -1, 4)
                keep = torch.zeros_like(groups, dtype=torch.bool)
                keep.scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
                module.weight.copy_(torch.where(keep, groups, 0.0).view_as(module.weight))
                names.append(f"{module_name}.weight")
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    pack_folder(folder, (2, 4), names)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=list(M_VALUES))
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--decode", choices=sorted(DECODE_MODELS), help="also time end-to-end decode of this shape"
    )
    parser.add_argument("--decode-layers", type=int, help="fewer decoder blocks for --decode (quicker)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--no-table", action="store_true", help="skip the kernel table (decode only)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or triton_status() is not None:
        print(
            f"bench/kernel_table.py needs a CUDA GPU with triton ({triton_status() or 'no CUDA device'}); "
            "`shears bench` reports sizes and interpreter checks without one",
            file=sys.stderr,
        )
        return 2
    dtype = getattr(torch, args.dtype)
    rows: list[dict[str, Any]] = []
    sizes: list[dict[str, Any]] = []
    pairs = [] if args.no_table else [(s, lay) for s in args.shapes for lay in args.layouts]
    for seed, (shape_name, layout) in enumerate(pairs):
        n, k = SHAPES[shape_name]
        packed = random_weight(n, k, layout, dtype, seed)
        sizes.append(
            {
                "layer": shape_name,
                "layout": layout,
                "pattern": layout,
                "shape": [n, k],
                "dense_bytes": dense_nbytes(packed),
                "packed_bytes": packed.nbytes,
                "memory_bytes": memory_bytes(packed),
                "ratio": packed.nbytes / dense_nbytes(packed),
            }
        )
        found = kernel_rows(shape_name, packed, tuple(args.m), Dispatcher(measure=True), seed=seed)
        for row in found:
            row["layout_name"] = layout
            print(
                f"{shape_name:>5} {n}x{k} {layout:>10} M={row['m']:<5} "
                f"shears {row['shears_us'] or 0:8.1f} us "
                f"dense {row['dense_us'] or 0:8.1f} us semi {row['semi_us'] or 0:8.1f} us "
                f"x{row['speedup_shears'] or 0:.2f} dispatch={row['dispatch']} ok={row.get('correct')}",
                flush=True,
            )
        rows += found
        del packed
        torch.cuda.empty_cache()
    device = device_info()
    slug = re.sub(r"[^a-z0-9]+", "-", device["name"].lower()).strip("-")
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"kernels-{slug}-{date}"
    result = {
        "schema": "shears.bench-kernels/1",
        "device": device,
        "date": date,
        "dtype": args.dtype,
        "m_values": args.m,
        "kernels": rows,
        "sizes": {"layers": sizes},
        "targets": targets(rows),
    }
    if args.decode:
        import tempfile

        from shears.kernels.decode_bench import decode_comparison

        with tempfile.TemporaryDirectory(prefix="shears-decode-") as tmp:
            folder = decode_model(args.decode, args.decode_layers, Path(tmp) / args.decode)
            decode = decode_comparison(folder, new_tokens=args.decode_tokens)
        result["decode"] = {"model": args.decode, "layers": args.decode_layers, **decode}
        print(
            f"decode {args.decode}: {decode['packed_tokens_per_s']:.1f} tok/s packed vs "
            f"{decode['dense_tokens_per_s']:.1f} dense (x{decode['speedup']:.2f}), cuda graphs "
            f"{decode['cuda_graph']}, tokens agree {decode['tokens_agree']:.0%}"
        )
    write_result(result, stem.with_suffix(".json"), stem.with_suffix(".png"))
    for name, value in result["targets"].items():
        print(f"{name}: {value}")
    print(f"wrote {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
