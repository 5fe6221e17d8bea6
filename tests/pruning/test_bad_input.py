"""Bad requests fail fast with a message that says what to fix, and leave nothing behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from shears.cli import main
from shears.errors import CalibrationError, InvalidRequest, ModelUnavailable, UnsafeWeights
from shears.pruning.config import CalibrationSpec, EngineOptions, PruneRequest
from shears.pruning.engine import prune
from shears.pruning.models import check_spec
from tests.pruning.test_engine import fast_request


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_open_unit_interval(sparsity: float) -> None:
    with pytest.raises(ValidationError, match="sparsity"):
        PruneRequest(model="m", method="wanda", sparsity=sparsity)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("3:2", "0 < N < M"),
        ("0:4", "0 < N < M"),
        ("2-4", "N:M"),
        ("4:4", "0 < N < M"),
        ("banana", "N:M"),
    ],
)
def test_malformed_patterns(pattern: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PruneRequest(model="m", method="wanda", sparsity=0.5, pattern=pattern)


def test_sparsity_that_contradicts_the_pattern() -> None:
    with pytest.raises(ValidationError, match=r"fixes sparsity at 0\.5"):
        PruneRequest(model="m", method="wanda", sparsity=0.6, pattern="2:4")


def test_unknown_method_and_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="method"):
        PruneRequest(model="m", method="obs", sparsity=0.5)
    with pytest.raises(ValidationError, match="Extra inputs"):
        PruneRequest(model="m", method="wanda", sparsity=0.5, sparsty=0.5)


def test_layer_width_not_a_multiple_of_m(tiny_llama: Path, tmp_path: Path) -> None:
    # hidden 64 and intermediate 128 are multiples of 8 and 16 but not of 48
    request = fast_request(tiny_llama, pattern="1:48", sparsity=47 / 48)
    with pytest.raises(InvalidRequest, match="multiple of"):
        prune(request, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="no such file or folder"):
        prune(fast_request(tmp_path / "nope"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_pickle_only_checkpoint_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_llama / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(UnsafeWeights, match="pickle"):
        prune(fast_request(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    check_spec(str(folder), None, EngineOptions(allow_pickle=True))  # an operator may allow them


def test_remote_code_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    folder = tmp_path / "custom"
    shutil.copytree(tiny_llama, folder)
    config = (folder / "config.json").read_text().replace("{", '{"auto_map": {"AutoModel": "x.Y"},', 1)
    (folder / "config.json").write_text(config)
    with pytest.raises(UnsafeWeights, match="trust_remote_code"):
        check_spec(str(folder), None, EngineOptions())


def test_empty_calibration_file(tiny_llama: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    request = fast_request(tiny_llama, calibration=CalibrationSpec(source=str(empty), samples=2, seqlen=32))
    with pytest.raises(CalibrationError, match="empty"):
        prune(request, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def test_existing_output_folder_is_not_overwritten(tiny_llama: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(InvalidRequest, match="already exists"):
        prune(fast_request(tiny_llama), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("spec", ["bad//id", "-lead", "a" * 200, "x/y/z"])
def test_malformed_hub_ids(spec: str) -> None:
    with pytest.raises((InvalidRequest, ModelUnavailable)):
        check_spec(spec, None, EngineOptions())


def test_unreachable_hub_is_model_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable, match="hub"):
        prune(fast_request(Path("nonexistent-org/nonexistent-model")), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_errors_with_exit_code_2(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        [
            "prune",
            str(tiny_llama),
            "--method",
            "wanda",
            "--sparsity",
            "0.6",
            "--pattern",
            "2:4",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "fixes sparsity" in capsys.readouterr().err
    code = main(
        [
            "prune",
            str(tmp_path / "missing"),
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    assert code == 2
    assert "model_unavailable" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_prune_writes_a_loadable_folder(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(
        [
            "prune",
            str(tiny_llama),
            "--method",
            "wanda",
            "--pattern",
            "2:4",
            "--samples",
            "4",
            "--seqlen",
            "64",
            "--eval-seqlen",
            "64",
            "--eval-tokens",
            "256",
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "perplexity dense" in out and "sparsity   0.5000" in out
    assert (tmp_path / "out" / "manifest.json").is_file()
