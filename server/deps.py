"""FastAPI dependencies as `Annotated` aliases (settings, store, dispatcher); the bearer scheme."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shears.server.dispatcher import Dispatcher
from shears.server.settings import Settings
from shears.server.store import Store

_bearer = HTTPBearer(auto_error=False, description="required when the server binds a non-loopback address")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]


def bearer_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Documents the bearer scheme in the OpenAPI schema. The check itself is server.guard's: it runs
    before a body is read, on every path but the health probes."""


Authorized = Depends(bearer_token)
