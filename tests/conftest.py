from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.tiny import ARCHITECTURES, make_tiny_model, make_tiny_of_type


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random model folder per architecture, built once per session."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tiny_of_type(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A tiny random model folder of any transformers model type, built once per session."""
    root = tmp_path_factory.mktemp("tiny-of-type")
    made: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in made:
            made[model_type] = make_tiny_of_type(model_type, root / model_type)
        return made[model_type]

    return get
