"""Config and weight rewriting for a smaller model, on tiny Llama, Gemma 3 (sliding and full layers),
Qwen3-MoE (MoE and dense blocks) and a Gemma 3 vision-language model.

The rewritten folder must load with from_pretrained (no missing or unexpected keys) and, where the
removed units can be silenced in the dense model by zeroing weights (channels: down_proj columns,
heads: o_proj columns, blocks: o_proj and down_proj), compute exactly what that silenced dense
model computes: that checks every slice, not only the shapes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from shears.errors import InvalidRequest
from shears.pruning.config import StructureSpec
from shears.pruning.structure.layout import ModelLayout, check_kept_block_types, verify_structure
from shears.pruning.structure.plan import dimensions, plan_structure
from tests.pruning.structure_models import FAMILIES, make_structure_model


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("structure-families")
    return {family: make_structure_model(family, root / family) for family in FAMILIES}


def _layout(folder: Path, **spec: float) -> ModelLayout:
    config = AutoConfig.from_pretrained(folder)
    text = config.get_text_config(decoder=True)
    plan = plan_structure(StructureSpec(granule=32, **spec), dimensions(text), text.model_type)
    return ModelLayout(folder, plan)


def _write(
    layout: ModelLayout, kept_blocks: list[int], kept: dict[int, dict[str, torch.Tensor]], out: Path
) -> None:
    """What the engine does, without calibration: outside tensors, sliced blocks, rewritten config."""
    out.mkdir()
    tensors = layout.checkpoint.load(layout.outside_names())
    for new, old in enumerate(kept_blocks):
        block = layout.checkpoint.load(layout.block_names(old))
        sliced = layout.slice_block(old, new, block, kept.get(old, {}))
        assert {n: tuple(t.shape) for n, t in sliced.items()} == layout.output_shapes(old, new)
        tensors.update(sliced)
    save_file(
        {n: t.contiguous() for n, t in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"}
    )
    (out / "config.json").write_text(json.dumps(layout.config_dict(kept_blocks), indent=2))
    for path in layout.folder.iterdir():
        if "token" in path.name:
            shutil.copy(path, out / path.name)
    verify_structure(out, layout, kept_blocks)


def _silenced(folder: Path, layout: ModelLayout, kept_blocks: list[int], kept: dict, out: Path) -> None:
    """The dense model with the removed units' contributions zeroed (same function as the pruned one)."""
    tensors = load_file(folder / "model.safetensors")
    prefix = layout.checkpoint_prefix
    for index in range(layout.dims.layers):
        rules = layout.rules[index]
        if index not in kept_blocks:
            for name in tensors:
                if name.startswith(f"{prefix}.{index}.") and name.endswith(
                    ("o_proj.weight", "down_proj.weight")
                ):
                    tensors[name] = torch.zeros_like(tensors[name])
            continue
        for kind, consumer in rules.consumers.items():
            if kind not in kept.get(index, {}):
                continue
            name = f"{prefix}.{index}.{consumer}.weight"
            (rule,) = [r for r in rules.params[f"{consumer}.weight"] if r.axis == 1]
            mask = torch.zeros(tensors[name].shape[1], dtype=torch.bool)
            mask[rule.index(kept[index][kind], layout.units(kind))] = True
            tensors[name] = tensors[name] * mask
    shutil.copytree(folder, out)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def _logits(folder: Path) -> torch.Tensor:
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    return logits


def _random_kept(layout: ModelLayout, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    plan = layout.plan
    keep = {"mlp": plan.mlp_keep, "heads": plan.kv_keep, "experts": plan.experts_keep}
    kept: dict[int, dict[str, torch.Tensor]] = {}
    for index, rules in enumerate(layout.rules):
        kinds = {r.kind for rule_list in rules.params.values() for r in rule_list}
        kept[index] = {
            kind: torch.randperm(layout.units(kind), generator=generator)[: keep[kind]].sort().values
            for kind in kinds
        }
    return kept


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3_moe", "gemma3_vlm"])
def test_widths_and_depth_give_a_loadable_model_computing_the_silenced_dense_one(
    family_models: dict[str, Path], tmp_path: Path, family: str
) -> None:
    folder = family_models[family]
    layout = _layout(folder, layers=0.34, mlp=0.5, heads=0.5)
    layers = layout.dims.layers
    kept_blocks = [i for i in range(layers) if i != 1 and i != layers - 2][
        : layers - layout.plan.remove_layers
    ]
    check_kept_block_types(layout, kept_blocks)
    kept = _random_kept(layout, seed=1)
    _write(layout, kept_blocks, kept, tmp_path / "pruned")
    _silenced(folder, layout, kept_blocks, kept, tmp_path / "silenced")
    pruned, silenced = _logits(tmp_path / "pruned"), _logits(tmp_path / "silenced")
    torch.testing.assert_close(pruned, silenced, rtol=1e-4, atol=1e-4)

    config = AutoConfig.from_pretrained(tmp_path / "pruned").get_text_config(decoder=True)
    dense = AutoConfig.from_pretrained(folder).get_text_config(decoder=True)
    assert config.num_hidden_layers == len(kept_blocks)
    assert config.num_key_value_heads == dense.num_key_value_heads // 2
    assert config.num_attention_heads == dense.num_attention_heads // 2
    assert config.head_dim == dense.head_dim
    assert config.intermediate_size == dense.intermediate_size // 2
    if getattr(dense, "layer_types", None):
        assert config.layer_types == [dense.layer_types[i] for i in kept_blocks]


def test_experts_are_dropped_with_their_router_rows_and_renumbered(
    family_models: dict[str, Path], tmp_path: Path
) -> None:
    folder = family_models["qwen3_moe"]
    layout = _layout(folder, experts=0.5, layers=0.25)
    assert layout.rules[1].router == "mlp.gate" and layout.rules[1].experts_module == "mlp.experts"
    assert not layout.rules[0].params  # a dense block: nothing to do with experts
    kept_blocks = [0, 1, 3]
    kept = {1: {"experts": torch.tensor([1, 4, 6, 7])}, 3: {"experts": torch.tensor([0, 2, 3, 5])}}
    check_kept_block_types(layout, kept_blocks)
    _write(layout, kept_blocks, kept, tmp_path / "pruned")
    _logits(tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["num_local_experts"] == 4 and config["num_hidden_layers"] == 3
    # blocks 1 and 3 were MoE (decoder_sparse_step=2); as blocks 1 and 2 they must stay MoE
    assert config["decoder_sparse_step"] == 1 and config["mlp_only_layers"] == [0]
    before, after = (
        load_file(folder / "model.safetensors"),
        load_file(tmp_path / "pruned" / "model.safetensors"),
    )
    for new_block, old_block in ((1, 1), (2, 3)):
        for new, old in enumerate(kept[old_block]["experts"].tolist()):
            for part in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(
                    after[f"model.layers.{new_block}.mlp.experts.{new}.{part}.weight"],
                    before[f"model.layers.{old_block}.mlp.experts.{old}.{part}.weight"],
                )
        router = before[f"model.layers.{old_block}.mlp.gate.weight"][kept[old_block]["experts"]]
        assert torch.equal(after[f"model.layers.{new_block}.mlp.gate.weight"], router)


def test_the_vlm_keeps_its_vision_tower_and_checkpoint_names(
    family_models: dict[str, Path], tmp_path: Path
) -> None:
    folder = family_models["gemma3_vlm"]
    layout = _layout(folder, mlp=0.5)
    assert layout.checkpoint_prefix == "language_model.model.layers"
    assert layout.module_prefix == "model.language_model.layers"
    assert layout.rules[0].consumers == {"mlp": "mlp.down_proj"}
    outside = layout.outside_names()
    assert any(n.startswith("vision_tower.") for n in outside)


@pytest.mark.parametrize(
    ("family", "spec", "message"),
    [
        ("llama", {"layers": 0.9}, "would remove all 4 decoder blocks"),
        ("llama", {"mlp": 0.95}, "below one granule"),
        ("llama", {"mlp": 0.01}, "less than one granule"),
        ("llama", {"experts": 0.5}, "dense model"),
        ("llama", {"heads": 0.05}, "removes no head group"),
        ("qwen3_moe", {"experts": 0.9}, "fewer than the 2"),
    ],
)
def test_impossible_counts_are_refused(
    family_models: dict[str, Path], family: str, spec: dict, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        _layout(family_models[family], **spec)


def test_one_kv_head_is_refused(tmp_path: Path) -> None:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
    )
    with pytest.raises(InvalidRequest, match="single key-value head"):
        plan_structure(StructureSpec(heads=0.5), dimensions(config), "llama")


def test_verification_catches_a_config_that_disagrees_with_the_weights(
    family_models: dict[str, Path], tmp_path: Path
) -> None:
    layout = _layout(family_models["llama"], mlp=0.5)
    kept = _random_kept(layout, seed=2)
    _write(layout, [0, 1, 2, 3], kept, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["intermediate_size"] = 256
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="the config builds"):
        verify_structure(tmp_path / "out", layout, [0, 1, 2, 3])


def test_reap_saliency_on_a_real_moe_block(family_models: dict[str, Path]) -> None:
    """Per expert: the routed token count and the mean of gate weight x ||expert output||."""
    from shears.pruning.structure.select import expert_saliency

    model = AutoModelForCausalLM.from_pretrained(family_models["qwen3_moe"]).eval()
    moe = model.model.layers[1].mlp
    hidden = torch.randn(3, 10, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), expert_saliency(moe.experts, 8, torch.device("cpu")) as saliency:
        moe(hidden)
        flat = hidden.reshape(-1, 64)
        _, weights, index = moe.gate(flat)
    assert int(saliency.tokens.sum()) == index.numel()  # every (token, slot) routed once
    for expert in range(8):
        rows, slots = (index == expert).nonzero(as_tuple=True)
        assert int(saliency.tokens[expert]) == len(rows)
        if len(rows) == 0:
            assert float(saliency.scores[expert]) == 0.0
            continue
        gate, up = torch.nn.functional.linear(flat[rows], moe.experts.gate_up_proj[expert]).chunk(2, dim=-1)
        out = torch.nn.functional.linear(moe.experts.act_fn(gate) * up, moe.experts.down_proj[expert])
        expected = (out.norm(dim=-1) * weights[rows, slots]).mean()
        assert float(saliency.scores[expert]) == pytest.approx(float(expected), rel=1e-4)
