"""Installed from a real wheel, Shears adds `shears` and its dist-info to site-packages and nothing else,
so it sits beside Hugging Face's `kernels` (the kernel hub transformers loads) without either
overwriting the other. Needs the package registry (pip downloads `kernels`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import shears

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("shears", "calibration", "kernels", "pruning", "server", "client")  # shears.<folder> but the floor
HUB_KERNELS = "kernels==0.17.*"


def _pip(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _sources(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


def test_wheel_installs_only_shears_next_to_hub_kernels(tmp_path: Path) -> None:
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "source"
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    _pip(
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(tmp_path / "wheels"),
        str(source),
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "wheels").glob("shears-*.whl")

    site = tmp_path / "site-packages"
    _pip("install", "--no-deps", "--target", str(site), str(wheel), cwd=tmp_path)
    added = {p.name for p in site.iterdir()} - {"bin"}  # --target puts the console script in bin/
    assert added == {"shears", f"shears-{shears.__version__}.dist-info"}
    for folder in FOLDERS:  # every module of every part is in the wheel
        installed = site / "shears" if folder == "shears" else site / "shears" / folder
        assert _sources(ROOT / folder) <= _sources(installed), folder

    _pip("install", "--no-deps", "--target", str(site), HUB_KERNELS, cwd=tmp_path)
    assert {"kernels", "shears"} <= {p.name for p in site.iterdir()}
    probe = (
        "import shears, shears.kernels.registry, shears.pruning.methods, kernels\n"
        "print(shears.__file__, shears.kernels.registry.__file__, shears.pruning.methods.__file__)\n"
        "print(kernels.__file__, kernels.__version__)\n"
    )
    # Only the scratch site-packages on the path: not the checkout (its shears would shadow the wheel's).
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    ours, theirs = (line.split() for line in done.stdout.splitlines())
    assert all(path.startswith(str(site / "shears")) for path in ours), ours
    assert theirs[0] == str(site / "kernels" / "__init__.py") and theirs[1].startswith("0.17.")
