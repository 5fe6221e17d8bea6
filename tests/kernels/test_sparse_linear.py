"""SparseLinear in a real (tiny) transformers model: the logits and tokens of the dense-with-zeros model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from shears.kernels.errors import PackedFormatError
from shears.kernels.formats import pack_nm
from shears.kernels.sparse_file import PACKED_DIR, pack_folder
from shears.kernels.sparse_linear import SparseLinear, load_packed_model, swap_in_sparse
from tests.kernels.pruned import magnitude_prune

PROMPT = torch.tensor([[1, 17, 250, 33, 9, 480, 64, 5]])


def packed_copy(source: Path, names: list[str], pattern: tuple[int, int], target: Path) -> Path:
    shutil.copytree(source, target)
    pack_folder(target, pattern, names)
    return target


@pytest.mark.parametrize(("fixture", "pattern"), [("pruned_24", (2, 4)), ("pruned_unstructured", (0, 0))])
def test_packed_model_matches_dense_logits(
    fixture: str, pattern: tuple[int, int], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source, names = request.getfixturevalue(fixture)
    folder = packed_copy(source, names, pattern, tmp_path / "packed")
    dense = AutoModelForCausalLM.from_pretrained(source).eval()
    packed = load_packed_model(folder)
    sparse_modules = [m for m in packed.modules() if isinstance(m, SparseLinear)]
    assert len(sparse_modules) == len(names) == 14
    assert not any(isinstance(m, nn.Linear) for m in packed.model.layers.modules())
    dense_params = sum(p.numel() for p in dense.parameters())
    assert sum(p.numel() for p in packed.parameters()) < dense_params  # the pruned dense weights are gone
    with torch.no_grad():
        want, got = dense(PROMPT).logits, packed(PROMPT).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["packed/", "old: at the top"])
def test_packed_model_generates_the_same_text(
    layout: str, pruned_24: tuple[Path, list[str]], tmp_path: Path
) -> None:
    source, names = pruned_24
    folder = packed_copy(source, names, (2, 4), tmp_path / "packed")
    if layout.startswith("old"):
        for path in (folder / PACKED_DIR).iterdir():
            path.rename(folder / path.name)
    dense = AutoModelForCausalLM.from_pretrained(source).eval()
    packed = load_packed_model(folder)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        assert torch.equal(packed.generate(PROMPT, **settings), dense.generate(PROMPT, **settings))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_with_bias_follows_module_moves(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 24, bias=True)
    with torch.no_grad():
        linear.weight.copy_(magnitude_prune(linear.weight, 2, 4))
    sparse = SparseLinear.from_linear(linear, 2, 4).to(dtype)
    linear = linear.to(dtype)
    assert sparse.values.dtype == dtype and sparse.meta.dtype == torch.int16
    x = torch.randn(2, 3, 64).to(dtype)
    with torch.no_grad():
        want = linear(x)
        got = sparse(x)
    assert got.shape == (2, 3, 24) and got.dtype == dtype
    torch.testing.assert_close(
        got,
        want,
        rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
        atol=2e-2 if dtype == torch.bfloat16 else 1e-5,
    )
    assert torch.equal(sparse.dense_weight(), linear.weight.detach() + 0.0)
    assert "packed=2:4" in repr(sparse)


def test_swap_refuses_mismatched_weights() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    with pytest.raises(
        PackedFormatError, match=r"0\.weight: packed shape \(4, 16\) but the model's weight is"
    ):
        swap_in_sparse(model, {"0.weight": pack_nm(torch.zeros(4, 16), 2, 4)})
    with pytest.raises(PackedFormatError, match=r"1\.weight: 1 is a ReLU, not nn\.Linear"):
        swap_in_sparse(model, {"1.weight": pack_nm(torch.zeros(4, 8), 2, 4)})
    assert swap_in_sparse(model, {"0.weight": pack_nm(torch.zeros(4, 8), 2, 4)}) == ["0.weight"]
    assert isinstance(model[0], SparseLinear)
