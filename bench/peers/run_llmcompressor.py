"""Prune a dense Hugging Face folder with llm-compressor 0.14 (the peer), for bench/peers/run.py.

Runs with the peer venv's python (bench/.venv-peers), never with Shears' own: it imports nothing from
Shears. Input: a dense model folder and a .safetensors file whose `input_ids` (int64 [S, L]) are the
calibration windows that Shears gets too. Output: a dense folder (zeros in place, no compressed
format) and one JSON line on stdout, prefixed with RESULT_PREFIX so log lines cannot be mistaken
for it.

What the settings are, and why (the benchmark compares tools, not settings):
- SparseGPTModifier / WandaPruningModifier target the decoder blocks (the model's `_no_split_modules`
  classes, which is also what llm-compressor's sequential pipeline splits on); every Linear inside a
  block is pruned, lm_head and the embeddings are not. This is the shape of llm-compressor's own 2:4
  examples (`targets=[r"re:model.layers.\\d*$"]`), without assuming the module path.
- SparseGPT: dampening_frac 0.01 and block_size 128, the values Shears uses.
- Calibration: the token ids are handed over as a torch DataLoader (oneshot accepts one and then
  skips its own tokenisation, sampling and truncation), batch size --batch-size, no shuffling, no
  padding and no attention_mask (full causal windows), so both tools see exactly the same tokens.
- Magnitude: 0.14's MagnitudePruningModifier with init = final sparsity computes its masks at start
  but never applies them in one-shot; a subclass applies them at finalize (see
  _one_shot_magnitude_class). Its mask factory offers 'unstructured', 'channel', 'filter' and
  'block_*' only: there is no N:M magnitude in llm-compressor, so --pattern N:M with magnitude exits
  with code 3 ("not offered").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

RESULT_PREFIX = "PEER_RESULT "
NOT_OFFERED = 3


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="dense Hugging Face folder")
    parser.add_argument("--calib", required=True, type=Path, help=".safetensors with input_ids int64 [S, L]")
    parser.add_argument("--method", required=True, choices=["sparsegpt", "wanda", "magnitude"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default="unstructured", help="'unstructured' or 'N:M' (keep N of M)")
    parser.add_argument("--out", required=True, type=Path, help="where the pruned dense folder goes")
    parser.add_argument("--samples", type=int, default=None, help="first S windows (default: all)")
    parser.add_argument(
        "--seqlen", type=int, default=None, help="first L tokens of each window (default: all)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--damp", type=float, default=0.01, help="SparseGPT dampening fraction")
    parser.add_argument("--block-size", type=int, default=128, help="SparseGPT lazy-batch columns")
    return parser.parse_args(argv)


def _keep_n_of_m(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4) in Shears' convention (keep N of every M); 'unstructured' -> (0, 0)."""
    if pattern.strip().lower() == "unstructured":
        return 0, 0
    n, m = (int(part) for part in pattern.split(":"))
    if not 0 < n < m:
        raise SystemExit(f"pattern {pattern!r}: need 0 < N < M")
    return n, m


def _decoder_block_classes(model) -> list[str]:
    """The decoder layer class names, as llm-compressor's sequential pipeline infers them."""
    from llmcompressor.utils.pytorch.module import infer_sequential_targets

    return list(infer_sequential_targets(model, None))


def _block_linear_names(model, block_classes: list[str]) -> list[str]:
    """Every nn.Linear inside a decoder block: the layers both tools prune."""
    import torch

    names: list[str] = []
    for block_name, block in model.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear):
                names.append(f"{block_name}.{name}")
    return names


def _modifier(args: argparse.Namespace, model, block_classes: list[str], linear_names: list[str]):
    keep_n, keep_m = _keep_n_of_m(args.pattern)
    # llm-compressor's mask_structure "N:M" is read as prune N of every M; for 2:4 the two agree.
    mask_structure = f"{keep_m - keep_n}:{keep_m}" if keep_m else "0:0"
    sparsity = 1.0 - keep_n / keep_m if keep_m else args.sparsity
    if args.method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(
            sparsity=sparsity,
            mask_structure=mask_structure,
            targets=block_classes,
            dampening_frac=args.damp,
            block_size=args.block_size,
        )
    if args.method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(sparsity=sparsity, mask_structure=mask_structure, targets=block_classes)
    if keep_m:
        print(f"llm-compressor 0.14 has no N:M magnitude pruning (pattern {args.pattern})", file=sys.stderr)
        raise SystemExit(NOT_OFFERED)
    return _one_shot_magnitude_class()(
        targets=linear_names,
        init_sparsity=sparsity,
        final_sparsity=sparsity,
        mask_structure="unstructured",
        start=0,
        end=1,
    )


def _one_shot_magnitude_class():
    """MagnitudePruningModifier that applies its masks when it finalises.

    In 0.14 the modifier computes its masks at start but multiplies the weights by them only on
    optimiser steps (it was written for pruning during training); `oneshot` has no optimiser, so the
    unpatched modifier returns the model untouched (0.0 sparsity, measured). Applying each layer's
    mask once before the modifier drops its mask buffers is the one-shot behaviour it lacks.
    """
    import torch
    from llmcompressor.modifiers.pruning import MagnitudePruningModifier

    class OneShotMagnitudePruningModifier(MagnitudePruningModifier):
        def on_finalize(self, state, **kwargs) -> bool:
            with torch.no_grad():
                for layer in self.parameterized_layers_.values():
                    layer.param.mul_(layer.layer.get_buffer("mask"))
            return super().on_finalize(state, **kwargs)

    return OneShotMagnitudePruningModifier


def _calibration_loader(path: Path, samples: int | None, seqlen: int | None, batch_size: int):
    import torch
    from safetensors.torch import load_file

    ids = load_file(str(path))["input_ids"]
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise SystemExit(f"{path}: input_ids must be int64 [S, L], got {ids.dtype} {list(ids.shape)}")
    ids = ids[: samples or ids.shape[0], : seqlen or ids.shape[1]].contiguous()
    # No attention_mask: full causal windows without padding, as Shears feeds them.
    rows = [{"input_ids": row} for row in ids]
    loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=False)
    return loader, list(ids.shape)


def _source_dtype(folder: Path):
    import torch

    config = json.loads((folder / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32


def _sparsity(model, names: list[str]) -> tuple[float, int]:
    modules = dict(model.named_modules())
    zeros = total = 0
    for name in names:
        weight = modules[name].weight
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / max(total, 1), len(names)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    import llmcompressor
    import torch
    import transformers
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, device_map=None)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    loader, shape = _calibration_loader(args.calib, args.samples, args.seqlen, args.batch_size)
    block_classes = _decoder_block_classes(model)
    linear_names = _block_linear_names(model, block_classes)
    modifier = _modifier(args, model, block_classes, linear_names)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=loader,
        recipe=modifier,
        pipeline="independent",
        num_calibration_samples=shape[0],
        max_seq_length=shape[1],
        batch_size=args.batch_size,
        shuffle_calibration_samples=False,
        save_compressed=False,
        output_dir=None,
    )
    prune_s = time.perf_counter() - t0

    sparsity, layers = _sparsity(model, linear_names)
    t0 = time.perf_counter()
    # Back to the dense folder's dtype (Shears keeps the source dtype too), then a plain transformers
    # save: a dense folder with zeros in place, as Shears' "dense" format.
    model.to(_source_dtype(args.model))
    transformers.PreTrainedModel.save_pretrained(model, args.out)
    tokenizer.save_pretrained(args.out)
    save_s = time.perf_counter() - t0

    result = {
        "tool": "llm-compressor",
        "version": llmcompressor.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "method": args.method,
        "pattern": args.pattern,
        "modifier": type(modifier).__name__,
        "modifier_args": modifier.model_dump(
            include={
                "sparsity",
                "mask_structure",
                "dampening_frac",
                "block_size",
                "init_sparsity",
                "final_sparsity",
            }
        ),
        "calibration_shape": shape,
        "batch_size": args.batch_size,
        "load_s": round(load_s, 3),
        "prune_s": round(prune_s, 3),
        "save_s": round(save_s, 3),
        "process_s": round(time.perf_counter() - started, 3),
        "sparsity": sparsity,
        "pruned_layers": layers,
        "out": str(args.out),
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
