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
    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "source"
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    site = tmp_path / "site-packages"
    # One pip run: it builds Shears' wheel (PEP 517, setuptools from this environment) and installs
    # it with the registry's kernels into one scratch site-packages.
    _pip(
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        str(site),
        str(source),
        HUB_KERNELS,
        cwd=tmp_path,
    )

    ours = f"shears-{shears.__version__}.dist-info"
    (theirs,) = (p.name for p in site.glob("kernels-*.dist-info"))
    assert {p.name for p in site.iterdir()} == {"shears", ours, "kernels", theirs, "bin"}  # bin: scripts
    paths = [line.split(",")[0] for line in (site / ours / "RECORD").read_text().splitlines()]
    scripts = {p for p in paths if p.startswith("../") and p.endswith("/bin/shears")}  # the console script
    assert {p.split("/")[0] for p in set(paths) - scripts} == {"shears", ours}, paths
    for folder in FOLDERS:  # every module of every part is in the wheel
        installed = site / "shears" if folder == "shears" else site / "shears" / folder
        assert _sources(ROOT / folder) <= _sources(installed), folder

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
    loaded_ours, loaded_theirs = (line.split() for line in done.stdout.splitlines())
    assert all(path.startswith(str(site / "shears")) for path in loaded_ours), loaded_ours
    assert loaded_theirs[0] == str(site / "kernels" / "__init__.py") and loaded_theirs[1].startswith("0.17.")
