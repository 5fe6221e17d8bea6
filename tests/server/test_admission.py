"""What an HTTP user may name: local models and text files only inside the operator's folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from shears.errors import InvalidRequest, ShearsError
from shears.pruning.config import PruneRequest
from shears.server.admission import admit
from shears.server.settings import Settings


def _request(model: str, source: str = "builtin") -> PruneRequest:
    return PruneRequest(model=model, method="wanda", sparsity=0.5, calibration={"source": source})


def _no_uploads(_: str) -> bool:
    return False


def test_local_models_need_an_allowed_folder(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="refused by this server"):
        admit(_request(str(tiny_llama)), Settings(data_dir=tmp_path), _no_uploads)
    admit(_request(str(tiny_llama)), Settings(data_dir=tmp_path, model_dirs=[tiny_llama.parent]), _no_uploads)
    admit(_request("smollm2-135m"), Settings(data_dir=tmp_path), _no_uploads)  # the built-in alias, always
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "escape").symlink_to(tiny_llama, target_is_directory=True)
    settings = Settings(data_dir=tmp_path, model_dirs=[allowed])
    for spec in (str(allowed / "escape"), f"{allowed}/../{tiny_llama}", str(tiny_llama)):
        with pytest.raises(InvalidRequest, match="outside the folders"):
            admit(_request(spec), settings, _no_uploads)


def test_local_text_needs_an_allowed_folder(tmp_path: Path) -> None:
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "c4.txt").write_text("some text")
    (tmp_path / "secret.txt").write_text("not for you")
    (texts / "link.txt").symlink_to(tmp_path / "secret.txt")
    closed = Settings(data_dir=tmp_path)
    assert closed.engine_options().allow_local_paths is False
    with pytest.raises(InvalidRequest, match="refused"):
        admit(_request("smollm2-135m", str(texts / "c4.txt")), closed, _no_uploads)
    opened = Settings(data_dir=tmp_path, text_dirs=[texts])
    assert opened.engine_options().allow_local_paths is True
    admit(_request("smollm2-135m", str(texts / "c4.txt")), opened, _no_uploads)
    for source in (str(texts / "link.txt"), str(tmp_path / "secret.txt"), "c4.txt", str(texts / "none.txt")):
        with pytest.raises(ShearsError):
            admit(_request("smollm2-135m", source), opened, _no_uploads)


def test_uploads_must_exist(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    admit(_request("smollm2-135m", "upload:u123"), settings, lambda upload_id: upload_id == "u123")
    with pytest.raises(InvalidRequest, match="no such upload"):
        admit(_request("smollm2-135m", "upload:u124"), settings, lambda upload_id: upload_id == "u123")


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHEARS_MODEL_DIRS", f"{tmp_path}/a:{tmp_path}/b")
    monkeypatch.setenv("SHEARS_TEXT_DIRS", f'["{tmp_path}/c"]')
    monkeypatch.setenv("SHEARS_TOKEN", "  ")
    settings = Settings()
    assert settings.model_dirs == [tmp_path / "a", tmp_path / "b"] and settings.text_dirs == [tmp_path / "c"]
    assert settings.token is None
    assert Settings(host="0.0.0.0").startup_problem() is not None
    assert Settings(host="0.0.0.0", token="t").startup_problem() is None
    assert Settings(host="::1").startup_problem() is None
    env = Settings(data_dir=tmp_path, token="secret").worker_env()
    assert "SHEARS_TOKEN" not in env and env["SHEARS_MODEL_DIRS"] == f'["{tmp_path}/a", "{tmp_path}/b"]'


def test_runtime_checks_follow_the_operators_vllm_python(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sys

    asking = PruneRequest(model="smollm2-135m", method="magnitude", sparsity=0.5, verify_runtimes=["vllm"])
    with pytest.raises(InvalidRequest, match="SHEARS_VLLM_PYTHON") as refused:
        admit(asking, Settings(data_dir=tmp_path), _no_uploads)
    assert refused.value.code == "runtime_unavailable"
    monkeypatch.setenv("SHEARS_VLLM_PYTHON", sys.executable)
    settings = Settings(data_dir=tmp_path)
    admit(asking, settings, _no_uploads)
    assert settings.engine_options().runtime_pythons == {"vllm": sys.executable}
    assert settings.worker_env()["SHEARS_VLLM_PYTHON"] == sys.executable  # workers see the same Python


def test_every_engine_phase_fits_the_store() -> None:
    from typing import get_args

    from shears.progress import Phase
    from shears.server.models import Job, JobEvent

    for column in (Job.__table__.c.phase, JobEvent.__table__.c.phase):
        assert max(len(phase) for phase in get_args(Phase)) <= column.type.length
