"""Architectures beyond Llama: MoE experts, a VLM, Conv1D, renamed checkpoint keys, BOS, positions.

Each test pins a defect of issue 11 (each failed before the fix): MoE and VLM checkpoints were
refused, GPT-2's Conv1D layers were invisible, checkpoint keys that differ from module names were
refused, windows lacked BOS, and windows longer than the model's positions crashed or extrapolated.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shears.errors import InvalidRequest
from shears.pattern import Pattern
from shears.pruning.config import CalibrationSpec, EvaluationSpec, PruneRequest
from shears.pruning.engine import prune
from shears.pruning.solvers.wanda import wanda_prune
from tests.tiny import make_tiny_model, make_tiny_of_type, plain_logits

CALIB = CalibrationSpec(samples=8, seqlen=32, batch_size=4)
NO_EVAL = EvaluationSpec(enabled=False)


def _request(folder: Path, **fields: object) -> PruneRequest:
    base: dict[str, object] = dict(
        model=str(folder), method="wanda", sparsity=0.5, calibration=CALIB, evaluation=NO_EVAL
    )
    base.update(fields)
    return PruneRequest(**base)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(path))
    return out


def _load(folder: Path) -> torch.nn.Module:
    from transformers import AutoConfig

    from tests.tiny import _model_class

    config = AutoConfig.from_pretrained(folder)
    return _model_class(config, config.architectures[0]).from_pretrained(folder, dtype=torch.float32).eval()


def _nm_along_input(matrix: torch.Tensor) -> bool:
    """Every group of 4 consecutive inputs of each output row of an [out, in] matrix has 2 zeros."""
    return bool(((matrix.reshape(matrix.shape[0], -1, 4) == 0).sum(-1) >= 2).all())


def test_moe_experts_are_pruned_with_the_tokens_their_router_sends_them(tmp_path: Path) -> None:
    folder = make_tiny_of_type("qwen3_moe", tmp_path / "moe")
    request = _request(folder, compute_dtype="float32")
    manifest = prune(request, tmp_path / "out")

    from shears.calibration.windows import load_windows
    from shears.pruning.experts import MIN_EXPERT_TOKENS
    from shears.pruning.models import LazyTokenizer

    windows = load_windows(request.calibration, None, LazyTokenizer(folder)).calibration
    dense = _load(folder)
    experts = dense.model.layers[0].mlp.experts
    seen: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen["hidden"], seen["index"] = args[0].reshape(-1, args[0].shape[-1]), args[1]

    experts.register_forward_hook(hook)
    with torch.inference_mode():
        dense(input_ids=windows, use_cache=False)
    pruned = _load(tmp_path / "out").model.layers[0].mlp.experts
    moe = manifest["moe"]["experts"]
    tokens = moe["model.layers.0.mlp.experts.gate_up_proj"]["tokens"]
    checked = 0
    for expert in range(experts.num_experts):
        routed = (seen["index"] == expert).any(-1)
        assert tokens[str(expert)] == int(routed.sum())
        fallback = int(routed.sum()) < MIN_EXPERT_TOKENS
        assert (expert in moe["model.layers.0.mlp.experts.gate_up_proj"]["fallback"]) == fallback
        x = seen["hidden"] if fallback else seen["hidden"][routed]
        gate, up = (x @ experts.gate_up_proj[expert].T).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        for weight, inputs, got in (
            (experts.gate_up_proj[expert], x, pruned.gate_up_proj[expert]),
            (experts.down_proj[expert], h, pruned.down_proj[expert]),
        ):
            expected = wanda_prune(weight.detach(), inputs.square().sum(0), 0.5, Pattern()) == 0
            agreement = float((expected == (got.detach() == 0)).float().mean())
            assert agreement > 0.995, (expert, agreement)
        checked += not fallback
    assert checked >= 4  # most experts got enough tokens for their own statistics
    router = "model.layers.0.mlp.gate.weight"
    assert torch.equal(_tensors(folder)[router], _tensors(tmp_path / "out")[router])  # the router stays dense


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_moe_2_4_in_the_checkpoints_own_format(
    tiny_of_type: Callable[[str], Path], tmp_path: Path, model_type: str
) -> None:
    """Mixtral's checkpoint keeps per-expert w1/w2/w3 under block_sparse_moe, GPT-OSS fused
    [experts, in, out] tensors: the output keeps each format, 2:4 along every expert's inputs."""
    folder = tiny_of_type(model_type)
    manifest = prune(_request(folder, method="sparsegpt", pattern="2:4"), tmp_path / "out")
    before, after = _tensors(folder), _tensors(tmp_path / "out")
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    assert any(r["expert"] is not None for r in manifest["layers"].values())
    if model_type == "mixtral":
        w1 = after["model.layers.1.block_sparse_moe.experts.3.w1.weight"]
        assert _nm_along_input(w1) and _nm_along_input(
            after["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
        )
    else:
        fused = after["model.layers.1.mlp.experts.gate_up_proj"]  # [experts, in, out]
        assert all(_nm_along_input(fused[e].T) for e in range(fused.shape[0]))
    logits = plain_logits(tmp_path / "out", torch.randint(3, 512, (1, 16)), torch.float32)
    assert torch.isfinite(logits).all()


def test_vlm_prunes_the_language_model_only(tiny_of_type: Callable[[str], Path], tmp_path: Path) -> None:
    from transformers import Gemma3ForConditionalGeneration, Gemma3ImageProcessor

    folder = tmp_path / "vlm"
    folder.mkdir()
    for path in tiny_of_type("gemma3").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    Gemma3ImageProcessor().save_pretrained(folder)
    manifest = prune(_request(folder), tmp_path / "out")
    assert manifest["model"]["blocks_prefix"] == "model.language_model.layers"
    assert all(name.startswith("model.language_model.layers.") for name in manifest["layers"])
    before, after = _tensors(folder), _tensors(tmp_path / "out")
    assert set(before) == set(after)  # the checkpoint's own names (language_model.model.layers...)
    outside = [k for k in before if ".layers." not in k or k.startswith("vision_tower")]
    assert any(k.startswith("vision_tower") for k in outside) and any("projector" in k for k in outside)
    for key in outside:  # vision tower, projector, embeddings: bit for bit
        assert before[key].view(torch.uint8).equal(after[key].view(torch.uint8)), key
    assert (after["language_model.model.layers.0.mlp.down_proj.weight"] == 0).float().mean() == 0.5
    for name in ("preprocessor_config.json", "tokenizer.json"):
        assert (tmp_path / "out" / name).read_bytes() == (folder / name).read_bytes()
    model = Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == json.loads((folder / "config.json").read_text())["architectures"][0]


def test_conv1d_layers_are_pruned_along_their_inputs(
    tiny_of_type: Callable[[str], Path], tmp_path: Path
) -> None:
    folder = tiny_of_type("gpt2")
    manifest = prune(_request(folder, method="sparsegpt", pattern="2:4"), tmp_path / "out")
    after = _tensors(tmp_path / "out")
    c_attn = after["transformer.h.0.attn.c_attn.weight"]  # Conv1D: stored [in, out] = [64, 192]
    assert manifest["layers"]["transformer.h.0.attn.c_attn"]["shape"] == (192, 64)
    assert manifest["layers"]["transformer.h.0.attn.c_attn"]["transposed"]
    assert _nm_along_input(c_attn.T)
    assert set(after) == set(_tensors(folder))


def test_renamed_checkpoint_keys_load_and_are_written_back(
    tiny_of_type: Callable[[str], Path], tmp_path: Path
) -> None:
    """GPT-NeoX's `embed_out` (the model's lm_head); a checkpoint saved without the `model.` prefix;
    Mistral's consolidated.safetensors next to the Hugging Face weights."""
    neox = tiny_of_type("gpt_neox")
    prune(_request(neox), tmp_path / "neox")
    assert set(_tensors(tmp_path / "neox")) == set(_tensors(neox)) and "embed_out.weight" in _tensors(neox)

    folder = make_tiny_model("llama", tmp_path / "bare")
    tensors = load_file(folder / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, folder / "model.safetensors")
    mistral_names = {f"layers.{i}.attention.wq.weight": torch.zeros(4, 4) for i in range(2)}
    save_file(mistral_names, folder / "consolidated.safetensors")
    ids = torch.randint(3, 512, (1, 12))
    dense_logits = plain_logits(folder, ids, torch.float32)  # transformers loads it as it is
    manifest = prune(_request(folder), tmp_path / "out")
    written = _tensors(tmp_path / "out")
    assert set(written) == {k.removeprefix("model.") for k in tensors}
    assert (
        "layers.0.mlp.down_proj.weight" in written
        and not (tmp_path / "out" / "consolidated.safetensors").exists()
    )
    assert manifest["layers"]["model.layers.0.mlp.down_proj"]["sparsity"] == 0.5
    assert not torch.equal(plain_logits(tmp_path / "out", ids, torch.float32), dense_logits)


def test_windows_start_with_bos_where_the_tokenizer_adds_it(tmp_path: Path) -> None:
    from shears.calibration.windows import load_windows
    from shears.pruning.models import LazyTokenizer
    from tests.tiny import make_tokenizer

    folder = make_tiny_model("llama", tmp_path / "llama")
    make_tokenizer(folder, bos=True)
    evaluation = EvaluationSpec(seqlen=32, max_tokens=64)
    windows = load_windows(CALIB, evaluation, LazyTokenizer(folder))
    assert windows.calibration.shape == (8, 32) and (windows.calibration[:, 0] == 1).all()
    assert windows.evaluation is not None and (windows.evaluation[:, 0] == 1).all()
    assert (windows.calibration[:, 1:] != 1).all()  # BOS only at the start
    manifest = prune(_request(folder, evaluation=evaluation), tmp_path / "out")
    assert manifest["calibration"]["calibration_start_token"] == 1
    assert manifest["calibration"]["evaluation_start_token"] == 1
    plain = make_tiny_model("llama", tmp_path / "plain")  # a tokenizer without BOS: windows unchanged
    assert load_windows(CALIB, None, LazyTokenizer(plain)).calibration[:, 0].ne(1).any()


def test_windows_beyond_the_models_positions_are_refused_before_any_work(
    tiny_of_type: Callable[[str], Path], tmp_path: Path
) -> None:
    from shears.cli import main
    from shears.server.admission import admit
    from shears.server.settings import Settings

    folder = tiny_of_type("opt")  # learned positions: 256 in the tiny config
    events: list[object] = []
    too_long = CalibrationSpec(samples=2, seqlen=512)
    with pytest.raises(InvalidRequest, match=r"calibration.seqlen = 512 exceeds the 256 positions"):
        prune(_request(folder, calibration=too_long), tmp_path / "out", reporter=events.append)
    assert [e.phase for e in events] == ["loading"] and list(tmp_path.iterdir()) == []  # no calibration
    with pytest.raises(InvalidRequest, match=r"evaluation.seqlen = 300 exceeds"):
        prune(_request(folder, evaluation=EvaluationSpec(seqlen=300)), tmp_path / "out")
    code = main(
        [
            "prune",
            str(folder),
            "--out",
            str(tmp_path / "cli"),
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            "--seqlen",
            "512",
            "--quiet",
        ]
    )
    assert code == 2 and not (tmp_path / "cli").exists()
    settings = Settings(data_dir=tmp_path / "data", model_dirs=[folder.parent])
    with pytest.raises(InvalidRequest, match="exceeds the 256 positions"):
        admit(_request(folder, calibration=too_long), settings, lambda _: False)
    with pytest.raises(InvalidRequest, match="exceeds the 8192 positions"):
        admit(_request("smollm2-135m", calibration=CalibrationSpec(seqlen=16384)), settings, lambda _: False)
    admit(_request(folder), settings, lambda _: False)


def test_architectures_shears_cannot_run_are_refused_before_any_work(
    tiny_of_type: Callable[[str], Path], tmp_path: Path
) -> None:
    """BLIP-2 needs an image with every text: a clear refusal, nothing written, no block pruned."""
    from shears.errors import ModelUnavailable

    events: list[object] = []
    with pytest.raises(ModelUnavailable, match=r"fails as Shears runs it.*pixel_values.*not supported"):
        prune(_request(tiny_of_type("blip-2")), tmp_path / "out", reporter=events.append)
    assert "pruning" not in [getattr(e, "phase", None) for e in events]
    assert list(tmp_path.iterdir()) == []
