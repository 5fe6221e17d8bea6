"""A real `shears serve` on loopback and one headless Chromium per module, for the dashboard tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from shears.client.launch import ServerProcess
from tests.server.conftest import FAST_SETTINGS, kill_workers
from tests.server.ui.browser import Browser, missing

# A model folder whose name is markup: every page must show it as text.
HOSTILE_NAME = '<img src=x onerror="window.__pwned=1">'


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    reason = missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests need Chromium: {reason}")
        pytest.skip(reason)
    instance = Browser()
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def extra_models(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Path:
    """The tiny model under a hostile name, and `tiny6`: six tiny blocks, so progress has steps to show."""
    root = tmp_path_factory.mktemp("ui-models")
    shutil.copytree(model_root / "tiny", root / HOSTILE_NAME)
    config = transformers.AutoConfig.from_pretrained(model_root / "tiny")
    config.num_hidden_layers = 6
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "tiny6")
    for tokenizer_file in (model_root / "tiny").glob("tokenizer*"):
        shutil.copy(tokenizer_file, root / "tiny6" / tokenizer_file.name)
    return root


def serve(data_dir: Path, model_root: Path, *flags: str, env: dict[str, str] | None = None) -> ServerProcess:
    server = ServerProcess(
        data_dir,
        args=[*FAST_SETTINGS, "--model-dir", str(model_root), *flags],
        env={"SHEARS_TOKEN": "", **(env or {})},
    )
    return server.start()


@pytest.fixture(scope="module")
def ui_server(
    tmp_path_factory: pytest.TempPathFactory, model_root: Path, extra_models: Path
) -> Iterator[ServerProcess]:
    """Two jobs at a time: a job submitted through the form runs beside the one to compare with."""
    server = serve(
        tmp_path_factory.mktemp("ui-data"),
        model_root,
        "--model-dir",
        str(extra_models),
        "--max-concurrent-jobs",
        "2",
    )
    yield server
    server.stop()
    kill_workers(server.data_dir)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On a failure, keep a screenshot and the page's console in the report."""
    report = yield
    instance = getattr(item, "funcargs", {}).get("browser")
    if report.when == "call" and report.failed and instance is not None:
        path = Path(tempfile.gettempdir()) / f"shears-ui-{item.name}.png"
        try:
            instance.screenshot(path)
            console = "\n".join(entry["message"] for entry in instance.logs()[-20:])
            report.sections.append(
                ("browser", f"url: {instance.driver.current_url}\nscreenshot: {path}\nconsole:\n{console}")
            )
        except Exception as exc:  # the browser may be what failed
            report.sections.append(("browser", f"no screenshot: {exc!r}"))
    return report
