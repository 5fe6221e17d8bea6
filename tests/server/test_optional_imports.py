"""The default server (SQLite, local executor, local artifacts) imports nothing of the scale-out extras,
and the API process never imports torch (workers do, in their own processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_PROBE = """
import sys
from shears.server.app import create_app
from shears.server.executors import make_executor
from shears.server.settings import Settings
from shears.server.store import Store
import shears.server.worker, shears.server.cli
settings = Settings(data_dir=sys.argv[1])
create_app(settings)
make_executor(settings)
assert settings.artifact_storage() is None
Store(settings.resolved_store_url).close()
heavy = ("ray", "s3fs", "psycopg", "moto", "aiobotocore", "torch", "transformers")
print(sorted(m for m in heavy if m in sys.modules))
"""


def test_default_server_needs_no_extras(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
