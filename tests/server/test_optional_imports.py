"""The default server (SQLite, local executor, local artifacts) imports nothing of the scale-out extras."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_PROBE = """
import sys
from server.app import create_app
from server.executors import make_executor
from server.settings import Settings
from server.store import Store
import server.worker, server.cli
settings = Settings(data_dir=sys.argv[1])
create_app(settings)
make_executor(settings)
assert settings.artifact_storage() is None
Store(settings.resolved_store_url).close()
print(sorted(m for m in ("ray", "s3fs", "psycopg", "moto", "aiobotocore") if m in sys.modules))
"""


def test_default_server_needs_no_extras(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
