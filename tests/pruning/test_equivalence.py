"""The streamed forward is the model's forward, in fp32 and bf16, for a representative set of families.

Streamed = what the engine does: capture what every block receives, run the blocks one at a time
from the checkpoint, apply the model's own head. After pruning, the engine's streamed pruned
hidden states (its "pruned" perplexity) equal a plain transformers forward of the saved folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shears.pattern import Pattern
from shears.pruning.config import CalibrationSpec, EvaluationSpec, PruneRequest
from shears.pruning.engine import prune
from shears.pruning.solvers.wanda import wanda_prune
from tests.tiny import make_tiny_of_type, plain_logits, streamed_logits

# The CI subset of bench/architectures.py: sliding/full layers with their own masks and rotary
# tables, MoE (fused experts, per-expert checkpoints, MLA), a VLM, Conv1D, renamed checkpoint keys.
CI_TYPES = [
    "llama",
    "gemma2",
    "gemma3_text",
    "gemma3",  # Gemma3ForConditionalGeneration: the decoder is model.language_model
    "cohere2",
    "gpt_oss",  # sliding + full layers, fused transposed experts with biases
    "qwen3_moe",
    "mixtral",  # per-expert checkpoint tensors under block_sparse_moe
    "deepseek_v3",  # MLA, a dense first block, shared experts
    "gpt2",  # Conv1D
    "gpt_neox",  # embed_out in the checkpoint, lm_head in the model
    "opt",
    "phi3",
    "falcon",
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _close(streamed: torch.Tensor, plain: torch.Tensor, dtype: str) -> None:
    scale = float(plain.abs().max())
    # fp32: the same arithmetic up to operation order; bf16: within a few bf16 ulps of the scale.
    tolerance = 1e-5 * max(scale, 1.0) if dtype == "float32" else 2e-2 * max(scale, 1e-3)
    assert float((streamed - plain).abs().max()) <= tolerance, (float((streamed - plain).abs().max()), scale)


def _ids(seqlen: int = 24) -> torch.Tensor:
    return torch.randint(3, 512, (2, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_type", [*CI_TYPES, "openai-gpt"])  # GPT-1: its blocks return a list
def test_streamed_forward_equals_the_models_forward(
    tiny_of_type: Callable[[str], Path], model_type: str, dtype: str
) -> None:
    ids = _ids()
    _close(
        streamed_logits(tiny_of_type(model_type), ids, DTYPES[dtype]),
        plain_logits(tiny_of_type(model_type), ids, DTYPES[dtype]),
        dtype,
    )


def _plain_nll(folder: Path, windows: torch.Tensor, dtype: torch.dtype) -> float:
    logits = plain_logits(folder, windows, dtype)
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_type", CI_TYPES)
def test_pruned_stream_equals_a_plain_forward_of_the_saved_folder(
    tiny_of_type: Callable[[str], Path], tmp_path: Path, model_type: str, dtype: str
) -> None:
    from shears.calibration.windows import load_windows
    from shears.pruning.models import LazyTokenizer

    folder = tiny_of_type(model_type)
    request = PruneRequest(
        model=str(folder),
        method="wanda",
        sparsity=0.5,
        compute_dtype=dtype,
        calibration=CalibrationSpec(samples=2, seqlen=32, batch_size=2),
        evaluation=EvaluationSpec(seqlen=32, max_tokens=64),
    )
    manifest = prune(request, tmp_path / "out")
    perplexity = manifest["perplexity"]
    windows = load_windows(request.calibration, request.evaluation, LazyTokenizer(folder)).evaluation
    assert windows is not None and perplexity["tokens"] == windows.shape[0] * (windows.shape[1] - 1)
    pruned = _plain_nll(tmp_path / "out", windows, DTYPES[dtype])
    dense = _plain_nll(folder, windows, DTYPES[dtype])
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    assert perplexity["nll_pruned"] == pytest.approx(pruned, rel=tolerance, abs=tolerance)
    assert perplexity["nll_dense"] == pytest.approx(dense, rel=tolerance, abs=tolerance)
    assert perplexity["nll_pruned"] != perplexity["nll_dense"]  # pruning changed the model


def test_fp32_forwards_hand_each_block_the_pruned_output(tmp_path: Path) -> None:
    """Regression: an fp32 block output was squared in place while measuring the block's error, so
    the next block's statistics (and masks) came from (pruned - dense)^2. Each block's Wanda masks
    must be those computed from the inputs the saved pruned model gives that block."""
    from transformers import AutoModelForCausalLM

    from shears.calibration.windows import load_windows
    from shears.pruning.checkpoint import Checkpoint
    from shears.pruning.models import LazyTokenizer

    folder = make_tiny_of_type("llama", tmp_path / "llama", num_hidden_layers=3)
    request = PruneRequest(
        model=str(folder),
        method="wanda",
        sparsity=0.5,
        compute_dtype="float32",
        calibration=CalibrationSpec(samples=4, seqlen=32, batch_size=2),
        evaluation=EvaluationSpec(enabled=False),
    )
    prune(request, tmp_path / "out")
    windows = load_windows(request.calibration, None, LazyTokenizer(folder)).calibration
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    norms: dict[str, torch.Tensor] = {}
    hooks = []
    for index in (1, 2):  # q/k/v read the block's input (through a norm), so they are comparable
        for name in ("q_proj", "k_proj", "v_proj"):
            key = f"model.layers.{index}.self_attn.{name}"
            module = model.get_submodule(key)

            def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor, key: str = key) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                norms[key] = norms.get(key, 0) + x.square().sum(0)

            hooks.append(module.register_forward_hook(hook))
    with torch.inference_mode():
        model(input_ids=windows, use_cache=False)
    dense = Checkpoint(folder)
    for key, sq_norm in norms.items():
        weight = dense.load([key + ".weight"])[key + ".weight"]
        expected = wanda_prune(weight, sq_norm, 0.5, Pattern()) == 0
        got = model.get_submodule(key).weight.detach() == 0
        agreement = float((expected == got).float().mean())
        assert agreement > 0.995, (key, agreement)
