"""End to end: every tiny architecture x method x pattern through the real engine and transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from shears.errors import ModelUnavailable
from shears.manifest import verify_files
from shears.progress import Event
from shears.pruning.config import CalibrationSpec, EngineOptions, EvaluationSpec, PruneRequest
from shears.pruning.engine import prune
from tests.tiny import ARCHITECTURES

FAST_CALIB = CalibrationSpec(samples=4, seqlen=64, batch_size=2)
FAST_EVAL = EvaluationSpec(seqlen=64, max_tokens=256)


def fast_request(model: Path, **fields: object) -> PruneRequest:
    base: dict[str, object] = dict(
        model=str(model), method="sparsegpt", sparsity=0.5, calibration=FAST_CALIB, evaluation=FAST_EVAL
    )
    base.update(fields)
    return PruneRequest(**base)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def check_output(folder: Path, request: PruneRequest) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    assert verify_files(folder, manifest) == []
    listed = {entry["name"] for entry in manifest["files"]}
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk
    for key in (
        "request",
        "model",
        "calibration",
        "versions",
        "sparsity",
        "layers",
        "timings",
        "peak_memory",
    ):
        assert manifest[key] is not None, key
    assert manifest["request"]["calibration"]["seed"] == request.calibration.seed
    tensors = weights(folder)
    pattern = request.pattern
    assert manifest["layers"], "no layer was pruned"
    for name, layer in manifest["layers"].items():
        weight = tensors[name + ".weight"]
        zeros = int((weight == 0).sum())
        assert zeros / weight.numel() == pytest.approx(layer["sparsity"], abs=0)
        if pattern.structured:
            groups = (weight.reshape(weight.shape[0], -1, pattern.m) == 0).sum(-1)
            assert int(groups.min()) >= pattern.m - pattern.n
        else:
            assert abs(zeros - layer["target"] * weight.numel()) <= weight.shape[0]  # row-exact at worst
        assert not torch.signbit(weight[weight == 0]).any()
    model = AutoModelForCausalLM.from_pretrained(folder)
    loaded = dict(model.named_parameters())
    some = next(iter(manifest["layers"])) + ".weight"
    assert torch.equal(loaded[some].detach(), tensors[some].to(loaded[some].dtype))
    return manifest


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(
    ("method", "pattern", "sparsity"),
    [
        ("sparsegpt", "unstructured", 0.5),
        ("wanda", "2:4", 0.5),
        ("magnitude", "4:8", 0.5),
        ("sparsegpt", "2:4", 0.5),
        ("wanda", "unstructured", 0.6),
    ],
)
def test_every_architecture_method_and_pattern(
    tiny_models: dict[str, Path], tmp_path: Path, arch: str, method: str, pattern: str, sparsity: float
) -> None:
    request = fast_request(tiny_models[arch], method=method, pattern=pattern, sparsity=sparsity)
    events: list[Event] = []
    manifest = prune(request, tmp_path / "out", reporter=events.append)
    check_output(tmp_path / "out", request)
    phases = [e.phase for e in events if e.kind == "phase"]
    assert phases[:3] == ["loading", "calibrating", "pruning"]
    progress = [e for e in events if e.kind == "progress"]
    assert progress[-1].done == progress[-1].total == manifest["model"]["num_blocks"]
    assert manifest["perplexity"]["tokens"] == 4 * 63
    assert not list(tmp_path.glob(".out.partial-*"))


def test_same_request_and_seed_give_identical_bytes(tiny_llama: Path, tmp_path: Path) -> None:
    request = fast_request(tiny_llama)
    prune(request, tmp_path / "a")
    prune(request, tmp_path / "b")
    a = json.loads((tmp_path / "a" / "manifest.json").read_text())["files"]
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())["files"]
    assert a == b
    other = prune(
        fast_request(tiny_llama, calibration=FAST_CALIB.model_copy(update={"seed": 1})), tmp_path / "c"
    )
    weights_of = {e["name"]: e["sha256"] for e in other["files"]}
    assert weights_of["model.safetensors"] != {e["name"]: e["sha256"] for e in a}["model.safetensors"]


def test_small_shards_stream_out_with_an_index(tiny_llama: Path, tmp_path: Path) -> None:
    request = fast_request(tiny_llama, method="wanda")
    manifest = prune(request, tmp_path / "out", options=EngineOptions(max_shard_bytes=200_000))
    names = {e["name"] for e in manifest["files"]}
    shards = sorted(n for n in names if n.startswith("model-"))
    assert len(shards) >= 2 and "model.safetensors.index.json" in names
    check_output(tmp_path / "out", request)
    single = prune(request, tmp_path / "single")
    assert torch.equal(
        torch.cat([t.flatten() for _, t in sorted(weights(tmp_path / "out").items())]),
        torch.cat([t.flatten() for _, t in sorted(weights(tmp_path / "single").items())]),
    )
    assert single["sparsity"] == manifest["sparsity"]


def test_ignore_overrides_and_true_sequential(tiny_llama: Path, tmp_path: Path) -> None:
    request = fast_request(
        tiny_llama,
        sparsity=0.5,
        ignore=[r"lm_head", r"\.0\.mlp\."],
        overrides={r"self_attn\.o_proj": 0.75},
        true_sequential=True,
    )
    manifest = prune(request, tmp_path / "out")
    layers = manifest["layers"]
    assert not any(".0.mlp." in name for name in layers)
    assert "model.layers.1.mlp.down_proj" in layers
    assert layers["model.layers.0.self_attn.o_proj"]["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert layers["model.layers.1.self_attn.q_proj"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    dense = weights(tiny_llama)
    pruned = weights(tmp_path / "out")
    assert torch.equal(
        dense["model.layers.0.mlp.up_proj.weight"], pruned["model.layers.0.mlp.up_proj.weight"]
    )
    check_output(tmp_path / "out", request)


def test_owl_gives_non_uniform_block_sparsity_with_the_requested_mean(
    tiny_llama: Path, tmp_path: Path
) -> None:
    request = fast_request(tiny_llama, method="wanda", sparsity=0.6, owl={"threshold": 3.0, "lam": 0.1})
    manifest = prune(request, tmp_path / "out")
    per_block = [manifest["layers"][f"model.layers.{i}.self_attn.q_proj"]["target"] for i in range(2)]
    assert per_block[0] != per_block[1]
    assert sum(per_block) / 2 == pytest.approx(0.6, abs=1e-6)


def test_self_calibration_samples_text_from_the_model(tiny_llama: Path, tmp_path: Path) -> None:
    request = fast_request(tiny_llama, calibration=CalibrationSpec(source="self", samples=2, seqlen=32))
    manifest = prune(request, tmp_path / "out")
    assert manifest["calibration"]
    check_output(tmp_path / "out", request)


def test_packed_output_and_pack_command_keep_the_manifest_true(tiny_llama: Path, tmp_path: Path) -> None:
    from shears.cli import main

    request = fast_request(tiny_llama, pattern="2:4", formats=["dense", "packed"])
    manifest = prune(request, tmp_path / "out")
    assert manifest["weights"]["packed"] == ["packed/sparse.safetensors"]
    packed_bytes = (tmp_path / "out" / "packed" / "sparse.safetensors").stat().st_size
    assert packed_bytes < 0.6 * sum(
        4 * layer["shape"][0] * layer["shape"][1] for layer in manifest["layers"].values()
    )
    plain = prune(fast_request(tiny_llama, pattern="2:4"), tmp_path / "plain")
    assert plain["weights"]["packed"] == []
    assert main(["pack", str(tmp_path / "plain")]) == 0
    refreshed = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert refreshed["weights"]["packed"] == ["packed/sparse.safetensors"]
    assert verify_files(tmp_path / "plain", refreshed) == []
    assert (tmp_path / "plain" / "packed" / "sparse.safetensors").read_bytes() == (
        tmp_path / "out" / "packed" / "sparse.safetensors"
    ).read_bytes()


def test_token_ids_need_no_tokenizer_and_blocks_report_their_output_error(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """A folder without tokenizer files prunes from a token-id file (the tokenizer loads lazily);
    the per-block output error is measured on the leading calibration tokens."""
    from shears.calibration.windows import save_windows

    bare = tmp_path / "bare"
    bare.mkdir()
    for path in tiny_llama.iterdir():
        if "token" not in path.name and path.is_file():
            (bare / path.name).write_bytes(path.read_bytes())
    config = json.loads((bare / "config.json").read_text())
    ids = torch.randint(0, config["vocab_size"], (6, 32), generator=torch.Generator().manual_seed(0))
    save_windows(tmp_path / "ids.safetensors", ids)
    request = fast_request(
        bare,
        calibration=CalibrationSpec(source=str(tmp_path / "ids.safetensors"), samples=6, seqlen=32),
        evaluation=EvaluationSpec(enabled=False),
    )
    manifest = prune(request, tmp_path / "out", options=EngineOptions(allow_local_paths=True))
    assert manifest["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.01)
    blocks = manifest["blocks"]
    assert blocks and all(b["output_error"] > 0 and b["output_error_tokens"] == 6 * 32 for b in blocks)
    with pytest.raises(ModelUnavailable, match="cannot load the tokenizer"):  # text still needs one
        prune(fast_request(bare), tmp_path / "out2", options=EngineOptions(allow_local_paths=True))
    assert not (tmp_path / "out2").exists()
