"""The FastAPI application: routers, problem+json errors, and the store and dispatcher it runs."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from shears.server import problems
from shears.server.api import system, v1
from shears.server.db import migrate
from shears.server.dispatcher import Dispatcher
from shears.server.downloads import Downloads
from shears.server.executors import make_executor
from shears.server.guard import Guard
from shears.server.metrics import make_registry
from shears.server.problems import ProblemDoc
from shears.server.settings import Settings
from shears.server.store import Store
from shears.server.ui import PUBLIC_PAGE_PREFIXES, PUBLIC_PAGES
from shears.server.ui import install as install_ui

log = logging.getLogger("shears.server")

_PROBLEM = {"model": ProblemDoc, "content": {"application/problem+json": {}}}
_ERRORS = {
    status: {**_PROBLEM, "description": text}
    for status, text in (
        (400, "malformed request (a cursor or header this server did not issue)"),
        (401, "missing or wrong bearer token"),
        (404, "no such job, upload or artifact"),
        (409, "the job is not in a state that allows this"),
        (411, "a multipart upload without Content-Length"),
        (413, "the request body is over its cap"),
        (415, "an upload whose file type is not a calibration format"),
        (416, "the byte range is outside the file"),
        (422, "invalid request (problem+json, `code` says why)"),
        (429, "the queue is full; see Retry-After"),
        (500, "internal error"),
        (507, "not enough free disk space on the server"),
    )
}


def create_app(settings: Settings | None = None, *, dispatch: bool = True) -> FastAPI:
    """`dispatch=False` serves the API without starting jobs (for tests of the HTTP layer only)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        settings.uploads_dir.mkdir(parents=True, exist_ok=True)
        store = Store(settings.resolved_store_url)
        await run_in_threadpool(migrate, store.engine)
        dispatcher = Dispatcher(settings, store, make_executor(settings))
        app.state.settings, app.state.store, app.state.dispatcher = settings, store, dispatcher
        app.state.storage = await run_in_threadpool(settings.artifact_storage)
        app.state.registry = make_registry(store)
        app.state.stopping = False
        app.state.downloads = Downloads()
        # Everything loaded so far (FastAPI, SQLAlchemy, torch via the calibration package: ~250k
        # objects) lives as long as the process; a full collection walking it stalls every request
        # for a quarter of a second on a busy CPU. Freezing moves it out of the collector's sight.
        gc.collect()
        gc.freeze()
        if dispatch:
            dispatcher.start()
        log.info(
            "shears serving with store %s, %d concurrent job(s)",
            store.engine.url.render_as_string(),
            settings.concurrency,
        )
        try:
            yield
        finally:
            app.state.stopping = True
            if dispatch:
                await run_in_threadpool(dispatcher.stop)
            store.close()

    app = FastAPI(
        title="Shears",
        version="v1",
        lifespan=lifespan,
        responses=_ERRORS,
        description="One-shot LLM pruning jobs: submit, follow, cancel, download. Dashboard at /ui.",
        docs_url=None,  # /docs and /redoc are served by the dashboard from vendored assets (no CDN)
        redoc_url=None,
    )
    problems.install(app)
    app.add_middleware(
        Guard, settings=settings, public_paths=PUBLIC_PAGES, public_prefixes=PUBLIC_PAGE_PREFIXES
    )
    app.include_router(system.router)
    app.include_router(v1)
    install_ui(app)
    return app
