"""Kernel tests run the Triton kernels on the CPU under the interpreter.

triton.jit reads TRITON_INTERPRET when a kernel is decorated, i.e. when kernels.triton_* is first
imported; this conftest is imported before any test module, so the kernels come up interpreted.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest
import torch

from tests.kernels.pruned import prune_folder


@pytest.fixture(scope="session")
def pruned_24(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """tiny_llama with every decoder linear pruned to 2:4 (fp32), not yet packed."""
    target = tmp_path_factory.mktemp("pruned") / "llama-2of4"
    return target, prune_folder(tiny_llama, target, 2, 4)


@pytest.fixture(scope="session")
def pruned_24_bf16(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    target = tmp_path_factory.mktemp("pruned") / "llama-2of4-bf16"
    return target, prune_folder(tiny_llama, target, 2, 4, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def pruned_unstructured(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """tiny_llama with every decoder linear 70% magnitude-pruned (fp32)."""
    target = tmp_path_factory.mktemp("pruned") / "llama-70"
    return target, prune_folder(tiny_llama, target, 0, 0, sparsity=0.7)
