"""The HTTP API's routers; /v1 routes need the bearer token when one is configured."""

from __future__ import annotations

from fastapi import APIRouter

from shears.server.api import artifacts, events, jobs, system, uploads
from shears.server.deps import Authorized

v1 = APIRouter(dependencies=[Authorized])
for module in (jobs, events, artifacts, uploads):
    v1.include_router(module.router)

__all__ = ["system", "v1"]
