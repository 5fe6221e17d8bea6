"""Prune a LLaMA-7B-shaped model with random weights on one GPU; record time per phase and peak memory.

Runs on the GPU machine from a source checkout (nothing to carry: random weights, random tokens):

    PYTHONPATH=. python bench/gpu_prune.py --method sparsegpt
    PYTHONPATH=. python bench/gpu_prune.py --method wanda

Targets on one H100: SparseGPT <= 120 s and Wanda <= 30 s end to end (published reference
implementations: about 320 s and 55 s). `--tiny` runs the same path on a toy shape (CPU smoke test).
The result goes to bench/results/gpu-prune-<method>-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from shears.pruning.methods import METHODS

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=512,
)


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over `t0 ... tN`: the engine needs one, random-token calibration does not."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", eos_token="t2").save_pretrained(
        folder
    )


def build_model(folder: Path, shape: dict[str, int], device: torch.device) -> float:
    """Random bf16 weights saved as a sharded Hugging Face folder; returns seconds spent."""
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="2GB")
    write_tokenizer(folder, shape["vocab_size"])
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=list(METHODS), default="sparsegpt")
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="toy shape, 4 x 64 tokens: a CPU smoke test")
    parser.add_argument("--work-dir", type=Path, help="where the random model and output go (default: temp)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from shears.calibration.windows import save_windows
    from shears.pruning.config import CalibrationSpec, EvaluationSpec, PruneRequest
    from shears.pruning.engine import prune

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if args.tiny else LLAMA_7B
    samples, seqlen = (4, 64) if args.tiny else (args.samples, args.seqlen)
    work = Path(tempfile.mkdtemp(prefix="shears-gpu-", dir=args.work_dir))
    try:
        model_dir = work / "model"
        build_s = build_model(model_dir, shape, device)
        ids = torch.randint(
            0, shape["vocab_size"], (samples, seqlen), generator=torch.Generator().manual_seed(0)
        )
        save_windows(work / "calib.safetensors", ids)
        request = PruneRequest(
            model=str(model_dir),
            method=args.method,
            sparsity=0.5,
            pattern=args.pattern,
            calibration=CalibrationSpec(
                source=str(work / "calib.safetensors"),
                samples=samples,
                seqlen=seqlen,
                batch_size=args.batch_size,
            ),
            evaluation=EvaluationSpec(enabled=False),
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        manifest = prune(request, work / "out")
        total = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {
        "benchmark": "gpu_prune",
        "device": name,
        "shape": "tiny" if args.tiny else "llama-7b",
        "model_shape": shape,
        "method": args.method,
        "pattern": args.pattern,
        "calibration": {"samples": samples, "seqlen": seqlen, "tokens": "random"},
        "end_to_end_s": round(total, 2),
        "build_random_model_s": round(build_s, 2),
        "phases_s": manifest["timings"],
        "peak_cuda_mb": manifest["peak_memory"]["cuda_mb"],
        "peak_rss_mb": manifest["peak_memory"]["rss_mb"],
        "sparsity": manifest["sparsity"]["achieved"],
        "versions": manifest["versions"],
        "date": dt.date.today().isoformat(),
        "command": " ".join(["python", "bench/gpu_prune.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    print(json.dumps(result, indent=2))
    if not args.tiny:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        slug = name.lower().replace(" ", "-")
        path = args.results_dir / f"gpu-prune-{args.method}-{slug}-{result['date']}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
