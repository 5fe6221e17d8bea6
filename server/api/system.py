"""Liveness, readiness, version and metrics."""

from __future__ import annotations

import os
import platform
import shutil
from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from shears.server import metrics
from shears.server.db import schema_is_current
from shears.server.deps import Authorized, SettingsDep, StoreDep
from shears.server.disk import probe_write

router = APIRouter(tags=["system"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: store reachable and migrated, data dir writable, disk free",
    responses={503: {"description": "not ready; `checks` says what failed"}},
)
def readyz(settings: SettingsDep, store: StoreDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        with store.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["store"] = "ok" if schema_is_current(store.engine) else "schema is not at the newest migration"
    except Exception as exc:
        checks["store"] = f"unreachable: {type(exc).__name__}"
    data = settings.data_dir
    checks["data_dir"] = "ok" if data.is_dir() and os.access(data, os.W_OK) else f"{data} is not writable"
    free = shutil.disk_usage(data).free if data.is_dir() else 0
    unwritable = probe_write(data) if checks["data_dir"] == "ok" else None
    if free < settings.min_free_disk_bytes:
        checks["disk"] = f"{free} bytes free, below the minimum of {settings.min_free_disk_bytes}"
    elif unwritable is not None:
        checks["disk"] = f"a small file cannot be written ({unwritable})"
    else:
        checks["disk"] = "ok"
    ready = all(value == "ok" for value in checks.values())
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    if not ready:
        body |= {
            "type": "/problems/unavailable",
            "title": "Service Unavailable",
            "status": 503,
            "code": "unavailable",
            "detail": "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok"),
        }
        return JSONResponse(body, status_code=503, media_type="application/problem+json")
    return JSONResponse(body)


@router.get("/version", summary="Server and API versions", dependencies=[Authorized])
def version(request: Request, settings: SettingsDep) -> dict[str, str]:
    try:
        release = metadata.version("shears")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        release = "unknown"
    return {
        "version": release,
        "api": "v1",
        "python": platform.python_version(),
        "store": request.app.state.store.engine.dialect.name,
        "executor": settings.executor,
    }


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    dependencies=[Authorized],
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
def prometheus(request: Request) -> Response:
    return Response(metrics.render(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
