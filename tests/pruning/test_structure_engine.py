"""Structured pruning through the real engine: a smaller standard folder, re-fits that help, nothing
changed when nothing is removed, and bad requests refused before any work with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from shears.cli import main
from shears.errors import InvalidRequest
from shears.manifest import verify_files
from shears.pruning.config import CalibrationSpec, EvaluationSpec, PruneRequest
from shears.pruning.engine import prune
from tests.pruning.structure_models import fuse_experts, make_structure_model

CALIB = CalibrationSpec(samples=4, seqlen=64, batch_size=2)
EVAL = EvaluationSpec(seqlen=64, max_tokens=256)
NO_EVAL = EvaluationSpec(enabled=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("structure-engine")
    return {family: make_structure_model(family, root / family) for family in ("llama", "gemma3")}


def request(model: Path, method: str = "none", **fields: object) -> PruneRequest:
    structure = {"granule": 32, "speed": False, **fields.pop("structure", {})}  # type: ignore[arg-type]
    base: dict[str, object] = dict(
        model=str(model), method=method, structure=structure, calibration=CALIB, evaluation=EVAL
    )
    return PruneRequest(**{**base, **fields})


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _loaded_logits(folder: Path) -> torch.Tensor:
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        logits = model(input_ids=torch.arange(3, 35).reshape(2, 16)).logits
    assert torch.isfinite(logits).all()
    return logits


def _per_expert_stacked(tensors: dict[str, torch.Tensor], head: str, count: int) -> dict[str, torch.Tensor]:
    """A block's experts as fused [E, ...] tensors, whichever layout they were saved in."""
    if f"{head}.gate_up_proj" in tensors:
        return {f"{head}.{name}": tensors[f"{head}.{name}"] for name in ("gate_up_proj", "down_proj")}
    weights = {
        p: [tensors[f"{head}.{e}.{p}_proj.weight"] for e in range(count)] for p in ("gate", "up", "down")
    }
    gate_up = [torch.cat([g, u]) for g, u in zip(weights["gate"], weights["up"], strict=True)]
    return {f"{head}.gate_up_proj": torch.stack(gate_up), f"{head}.down_proj": torch.stack(weights["down"])}


def test_depth_and_width_give_a_smaller_standard_folder_whose_streamed_ppl_is_its_own(
    models: dict[str, Path], tmp_path: Path
) -> None:
    from shears.calibration.windows import load_windows
    from shears.pruning.evaluate import perplexity_of_folder

    job = request(
        models["llama"],
        structure={"layers": 0.25, "mlp": 0.5, "heads": 0.5, "layer_refit": True},
        compute_dtype="float32",
    )
    manifest = prune(job, tmp_path / "out")
    out = tmp_path / "out"
    assert verify_files(out, manifest) == []
    structure = manifest["structure"]
    plan = structure["plan"]
    assert len(plan["removed_blocks"]) == 1 and len(plan["kept_blocks"]) == 3
    assert plan["intermediate_size"] == 128 and plan["num_key_value_heads"] == 2
    config = AutoConfig.from_pretrained(out)
    assert (config.num_hidden_layers, config.intermediate_size) == (3, 128)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    on_disk = sum(t.numel() for t in _tensors(out).values())
    assert structure["parameters"]["after"] == on_disk < structure["parameters"]["before"]
    assert structure["bytes"]["after"] < structure["bytes"]["before"]
    for block in structure["blocks"]:
        assert len(block["mlp"]["removed"]) == 128 and len(block["heads"]["removed"]) == 2
        assert 0 < block["output_error"] < 1
    assert structure["layers"]["influence"] and len(structure["layers"]["influence"]) == 4
    (removed,) = plan["removed_blocks"]
    if removed > 0:  # the block before the removed one was re-fitted to carry it
        (refit,) = [b["layer_refit"] for b in structure["blocks"] if "layer_refit" in b]
        assert refit["run"] == [removed] and refit["writer"] == "mlp.down_proj"
        assert 0 < refit["explained"] < 1 and "skipped" not in refit
    _loaded_logits(out)
    # the engine's streamed "after" perplexity is the saved folder's own perplexity
    tokenizer = AutoTokenizer.from_pretrained(out)
    windows = load_windows(CALIB, EVAL, tokenizer)
    assert windows.evaluation is not None
    saved = perplexity_of_folder(out, windows.evaluation, device=torch.device("cpu"))
    assert saved.ppl == pytest.approx(manifest["perplexity"]["pruned"], rel=1e-4)


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert-checkpoint", "fused-checkpoint"])
def test_experts_heads_and_depth_of_a_moe_model_compute_what_the_job_streamed(
    tmp_path: Path, fused: bool
) -> None:
    """The module holds the experts fused ([E, 2I, H] gate_up_proj); the checkpoint holds them per
    expert (as transformers saves them) or fused, and the output keeps the checkpoint's layout."""
    from shears.calibration.windows import load_windows
    from shears.pruning.evaluate import perplexity_of_folder

    folder, out = make_structure_model("qwen3_moe", tmp_path / "moe"), tmp_path / "out"
    if fused:
        fuse_experts(folder)
    job = request(
        folder, structure={"experts": 0.5, "heads": 0.5, "mlp": 0.5, "layers": 0.25}, compute_dtype="float32"
    )
    manifest = prune(job, out)
    assert verify_files(out, manifest) == []
    plan = manifest["structure"]["plan"]
    dense, config = AutoConfig.from_pretrained(folder), AutoConfig.from_pretrained(out)
    assert config.num_hidden_layers == dense.num_hidden_layers - 1 == len(plan["kept_blocks"])
    assert config.num_experts == plan["experts"] == dense.num_experts // 2
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.intermediate_size == plan["intermediate_size"] == dense.intermediate_size // 2
    moe_blocks = [b for b in manifest["structure"]["blocks"] if "experts" in b]
    assert moe_blocks and all(len(b["experts"]["removed"]) == 4 for b in moe_blocks)
    tensors, dense_tensors = _tensors(out), _tensors(folder)
    assert sum(t.numel() for t in tensors.values()) == manifest["structure"]["parameters"]["after"]
    # written in the checkpoint's own layout: the kept experts renumbered, their bytes unchanged
    assert any("gate_up_proj" in name for name in dense_tensors) == fused
    for block in moe_blocks:
        old, new = f"model.layers.{block['index']}.mlp", f"model.layers.{block['new_index']}.mlp"
        kept = [e for e in range(dense.num_experts) if e not in block["experts"]["removed"]]
        expected = {
            name.replace(old, new, 1): tensor[kept]
            for name, tensor in _per_expert_stacked(
                dense_tensors, f"{old}.experts", dense.num_experts
            ).items()
        }
        saved = _per_expert_stacked(tensors, f"{new}.experts", len(kept))
        assert saved.keys() == expected.keys() and all(saved[n].equal(expected[n]) for n in saved)
        layout = {n.removeprefix(f"{new}.experts.") for n in tensors if n.startswith(f"{new}.experts.")}
        per_expert = {f"{e}.{p}_proj.weight" for e in range(len(kept)) for p in ("gate", "up", "down")}
        assert layout == ({"gate_up_proj", "down_proj"} if fused else per_expert)
        assert tensors[f"{new}.gate.weight"].equal(dense_tensors[f"{old}.gate.weight"][kept])
    _loaded_logits(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    windows = load_windows(CALIB, EVAL, tokenizer)
    assert windows.evaluation is not None
    saved = perplexity_of_folder(out, windows.evaluation, device=torch.device("cpu"))
    assert saved.ppl == pytest.approx(manifest["perplexity"]["pruned"], rel=1e-4)
    assert manifest["perplexity"]["pruned"] != pytest.approx(manifest["perplexity"]["dense"], rel=1e-4)


def test_reconstruction_lowers_the_block_output_error(models: dict[str, Path], tmp_path: Path) -> None:
    errors = {}
    for reconstruct in (True, False):
        structure = {"mlp": 0.5, "heads": 0.5, "reconstruct": reconstruct}
        manifest = prune(
            request(models["llama"], structure=structure, evaluation=NO_EVAL), tmp_path / f"{reconstruct}"
        )
        blocks = manifest["structure"]["blocks"]
        errors[reconstruct] = [b["output_error"] for b in blocks]
        for kind in ("heads", "mlp"):  # block 0: the same inputs and the same selection in both runs
            errors[kind, reconstruct] = blocks[0][kind]["consumer_output_error"]
    assert errors[True][0] < errors[False][0]
    assert sum(errors[True]) < sum(errors[False])
    assert errors["heads", True] < errors["heads", False] and errors["mlp", True] < errors["mlp", False]


def test_nothing_removed_changes_nothing(models: dict[str, Path], tmp_path: Path) -> None:
    folder = models["gemma3"]
    prune(request(folder, structure={"layers": 0.0, "mlp": 0.0}, evaluation=NO_EVAL), tmp_path / "none")
    dense, same = _tensors(folder), _tensors(tmp_path / "none")
    assert dense.keys() == same.keys()
    for name, tensor in dense.items():
        assert tensor.dtype == same[name].dtype and tensor.view(torch.uint8).equal(
            same[name].view(torch.uint8)
        )
    assert json.loads((tmp_path / "none" / "config.json").read_text()) == {
        **json.loads((folder / "config.json").read_text())
    }
    # with a method: the same bytes as the method without a structure
    a = prune(
        request(folder, "wanda", sparsity=0.5, structure={"layers": 0.0}, evaluation=NO_EVAL), tmp_path / "a"
    )
    b = prune(
        PruneRequest(model=str(folder), method="wanda", sparsity=0.5, calibration=CALIB, evaluation=NO_EVAL),
        tmp_path / "b",
    )
    weights = {e["name"]: e["sha256"] for e in a["files"] if e["name"].endswith(".safetensors")}
    assert weights == {e["name"]: e["sha256"] for e in b["files"] if e["name"].endswith(".safetensors")}


def test_sliding_layers_keep_their_types_and_a_method_runs_on_the_cut_model(
    models: dict[str, Path], tmp_path: Path
) -> None:
    folder = models["gemma3"]
    job = request(
        folder,
        "sparsegpt",
        sparsity=0.5,
        pattern="2:4",
        structure={"layers": 0.34, "contiguous": True, "mlp": 0.5},
    )
    manifest = prune(job, tmp_path / "out")
    removed = manifest["structure"]["plan"]["removed_blocks"]
    assert len(removed) == 2 and removed[1] == removed[0] + 1  # one contiguous run
    refits = [b["layer_refit"] for b in manifest["structure"]["blocks"] if "layer_refit" in b]
    assert all("not linear" in r["skipped"] for r in refits)  # Gemma normalises the MLP output
    kept = manifest["structure"]["plan"]["kept_blocks"]
    dense_types = AutoConfig.from_pretrained(folder).layer_types
    assert AutoConfig.from_pretrained(tmp_path / "out").layer_types == [dense_types[i] for i in kept]
    tensors = _tensors(tmp_path / "out")
    assert manifest["layers"]
    for name, layer in manifest["layers"].items():
        weight = tensors[name + ".weight"]
        assert layer["sparsity"] == 0.5 and (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1).max() <= 2
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
    _loaded_logits(tmp_path / "out")


def test_speed_is_measured_for_both_models(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shears.pruning.structure import speed as speed_module

    # The job times 4 x 512 prefill and 128 decode steps; a test needs far less to see it wired.
    monkeypatch.setattr(speed_module, "PREFILL_SHAPE", (2, 32))
    monkeypatch.setattr(speed_module, "DECODE_TOKENS", 4)
    job = request(models["llama"], structure={"layers": 0.5, "speed": True}, evaluation=NO_EVAL)
    speed = prune(job, tmp_path / "out")["structure"]["speed"]
    for model in ("dense", "pruned"):
        assert speed[model]["prefill_tokens_per_s"] > 0 and speed[model]["decode_tokens_per_s"] > 0
        assert speed[model]["prefill_shape"] == [2, 32] and speed[model]["decode_tokens"] == 4
    assert speed["prefill_speedup"] > 0 and speed["decode_speedup"] > 0


@pytest.mark.parametrize(
    ("structure", "message"),
    [
        ({"layers": 0.99}, "remove all 4 decoder blocks"),
        ({"heads": 0.5, "mlp": 0.95}, "below one granule"),
        ({"experts": 0.25}, "dense model"),
    ],
)
def test_impossible_structures_are_refused_before_any_work(
    models: dict[str, Path], tmp_path: Path, structure: dict, message: str
) -> None:
    events: list = []
    with pytest.raises(InvalidRequest, match=message):
        prune(request(models["llama"], structure=structure), tmp_path / "out", reporter=events.append)
    assert list(tmp_path.iterdir()) == []
    assert [e.phase for e in events if e.kind == "phase"] == ["loading"]  # no calibration ran


def test_one_kv_head_model_refuses_heads(tmp_path: Path) -> None:
    from tests.tiny import make_tiny_model

    folder = make_tiny_model("llama", tmp_path / "mqa", num_key_value_heads=1)
    with pytest.raises(InvalidRequest, match="single key-value head"):
        prune(request(folder, structure={"heads": 0.5}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "none"}, "give a structure"),
        ({"method": "none", "structure": {"mlp": 0.25}, "sparsity": 0.5}, "sparsity"),
        ({"method": "none", "structure": {"mlp": 0.25}, "pattern": "2:4"}, "pattern"),
        ({"method": "wanda", "sparsity": 0.5, "structure": {"mlp": 1.0}}, "less than 1"),
        ({"method": "wanda", "sparsity": 0.5, "structure": {"layers": -0.1}}, "greater than or equal to 0"),
        ({"method": "wanda", "structure": {"mlp": 0.25}}, "sparsity is required"),
        ({"method": "none", "structure": {"mlp": 0.25, "granule": 0}}, "granule"),
    ],
)
def test_request_validation(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PruneRequest(model="m", **fields)


def test_cli_structure_flag(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["prune", str(models["llama"]), "--method", "none", "--out", str(tmp_path / "out"), "--quiet"]
    assert main([*base, "--structure", "mlp=1.5"]) == 2
    assert "less than 1" in capsys.readouterr().err
    assert main([*base, "--structure", "mlp"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    assert main(base) == 2
    assert "give a structure" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    code = main(
        [
            *base,
            "--structure",
            "layers=0.25,granule=32,speed=false",
            "--samples",
            "2",
            "--seqlen",
            "32",
            "--eval-seqlen",
            "32",
            "--eval-tokens",
            "128",
        ]
    )
    assert code == 0
    assert "removed blocks" in capsys.readouterr().out
