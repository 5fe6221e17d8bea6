"""The layers of docs/architecture.md hold: floor -> calibration, kernels -> pruning -> server / client.

Imports are read from the source (every `import`, `from ... import` and every string naming a
Shears module, which is how plugins and worker commands are loaded), so a lazy import inside a
function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("calibration", "kernels", "pruning", "server", "client")
# part -> the parts it must never import
FORBIDDEN = {
    "calibration": {"pruning", "server", "client", "kernels"},
    "kernels": {"pruning", "server", "client", "calibration"},
    "pruning": {"server", "client"},
    "server": {"client"},
    "client": {"pruning", "server", "kernels", "calibration"},
}
_NAMED = re.compile(r"\bshears\.(calibration|kernels|pruning|server|client)\b")


def _modules_named(path: Path) -> set[str]:
    """The Shears parts a source file imports or names in a string."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    named: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in docstrings:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [m.group(0) for m in _NAMED.finditer(node.value)]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "shears" and len(parts) > 1 and parts[1] in PARTS:
                named.add(parts[1])
            elif parts[0] in PARTS:  # the old top-level names must not come back
                named.add(f"top-level {parts[0]}")
    return named


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("part", PARTS)
def test_part_imports_only_what_lies_below(part: str) -> None:
    offences = []
    for path in _sources(part):
        named = _modules_named(path)
        bad = sorted(n for n in named if n in FORBIDDEN[part] or n.startswith("top-level"))
        if bad:
            offences.append(f"{path.relative_to(ROOT)}: {', '.join(bad)}")
    assert not offences, f"{part}/ reaches across the layers:\n" + "\n".join(offences)


def test_floor_imports_no_part() -> None:
    """The floor imports none of the parts; only the command-line entry names them, as plugins."""
    entry = {"cli.py", "__main__.py"}
    offences = [
        f"{path.name}: {sorted(named)}"
        for path in _sources("shears")
        if path.name not in entry and (named := _modules_named(path))
    ]
    assert not offences, offences


def test_pruning_does_not_name_the_server() -> None:
    """Not even in a string: the engine must run where the server's packages are not installed."""
    for path in _sources("pruning"):
        text = path.read_text()
        assert not re.search(r"\bshears[./]server\b|\bserver\.cli\b", text), path


_PROBE = """
import sys
{imports}
heavy = ("torch", "transformers", "numpy", "triton", "fastapi", "sqlalchemy", "pydantic")
print(",".join(sorted(m for m in heavy if m in sys.modules)))
"""


def _loaded_by(imports: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(imports=imports)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    return {m for m in out.stdout.strip().split(",") if m}


def test_api_process_never_imports_torch() -> None:
    loaded = _loaded_by("import shears.server.app, shears.server.admission, shears.server.cli")
    assert "torch" not in loaded and "transformers" not in loaded, loaded


def test_client_needs_neither_torch_nor_the_server() -> None:
    loaded = _loaded_by("import shears.client.client, shears.client.follow, shears.client.cli")
    assert not loaded & {"torch", "transformers", "fastapi", "sqlalchemy"}, loaded


def test_floor_is_light() -> None:
    """The floor loads on a bare GPU box: no pydantic, no server packages, no torch at import."""
    loaded = _loaded_by("import shears, shears.errors, shears.progress, shears.manifest, shears.pattern")
    assert not loaded, loaded


def test_kernels_need_no_pydantic() -> None:
    """The GPU machine has torch, triton, transformers, safetensors, numpy only."""
    loaded = _loaded_by(
        "import shears.kernels.formats, shears.kernels.sparse_file, shears.kernels.dispatch, "
        "shears.kernels.sparse_linear, shears.kernels.cli"
    )
    assert "pydantic" not in loaded and "fastapi" not in loaded, loaded
