"""The built-in SmolLM2-135M (a real trained model from a GGUF): pruning quality where it matters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shears.pruning.config import CalibrationSpec, EngineOptions, EvaluationSpec, PruneRequest
from shears.pruning.engine import prune
from shears.pruning.models import resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("builtin")
    out = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        request = PruneRequest(
            model="smollm2-135m",
            method=method,
            sparsity=0.5,
            calibration=CalibrationSpec(samples=8, seqlen=128, batch_size=8),
            evaluation=EvaluationSpec(seqlen=128, max_tokens=2048),
        )
        out[method] = prune(request, root / method)
        out[method]["folder"] = root / method
    return out


def test_builtin_model_resolves_to_a_cached_safetensors_folder() -> None:
    model = resolve_model("smollm2-135m", None, EngineOptions())
    assert (model.path / "model.safetensors").is_file()
    assert model.revision and model.revision.startswith("sha256:")
    again = resolve_model("smollm2-135m", None, EngineOptions())
    assert again.path == model.path


def test_calibrated_methods_beat_magnitude_by_far(results: dict[str, dict]) -> None:
    ppl = {method: r["perplexity"] for method, r in results.items()}
    dense = ppl["sparsegpt"]["dense"]
    assert ppl["wanda"]["dense"] == pytest.approx(dense, rel=1e-6)
    for method in ("sparsegpt", "wanda"):
        assert ppl[method]["pruned"] < 0.5 * ppl["magnitude"]["pruned"], ppl
        assert ppl[method]["pruned"] < 3.0 * dense, ppl


def test_pruned_builtin_loads_and_generates_with_tied_embeddings(results: dict[str, dict]) -> None:
    folder: Path = results["sparsegpt"]["folder"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    q = model.model.layers[3].self_attn.q_proj.weight
    assert float((q == 0).float().mean()) == pytest.approx(0.5, abs=1e-6)
    ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
