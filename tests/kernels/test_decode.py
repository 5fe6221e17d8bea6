"""The decode benchmark's loop (StaticCache, one token per step) runs and agrees, here on the CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from shears.kernels.decode_bench import decode_comparison, greedy_decode
from shears.kernels.sparse_file import pack_folder


def test_greedy_decode_matches_generate(pruned_24: tuple[Path, list[str]]) -> None:
    source, _ = pruned_24
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    prompt = torch.tensor([[1, 40, 41, 300, 7]])
    run = greedy_decode(model, prompt, 5)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=2)[0, 5:]
    assert run["tokens"] == expected.tolist() and run["cuda_graph"] is False and run["tokens_per_s"] > 0


def test_decode_comparison_packed_vs_dense(pruned_24: tuple[Path, list[str]], tmp_path: Path) -> None:
    source, names = pruned_24
    folder = tmp_path / "packed"
    shutil.copytree(source, folder)
    pack_folder(folder, (2, 4), names)
    result = decode_comparison(folder, device="cpu", dtype=torch.float32, new_tokens=2, prompt_tokens=4)
    assert result["tokens_agree"] == 1.0 and result["first_step_max_abs_logit_diff"] < 1e-4
    assert result["packed_weight_bytes"] < result["dense_weight_bytes"]
    assert result["speedup"] > 0 and result["cuda_graph"] == {"dense": False, "packed": False}
