"""Routes of the dashboard (/ui), its form options, and the offline API docs (/docs, /redoc)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from shears import __version__
from shears.calibration.sources import TEXT_SUFFIXES
from shears.pruning.config import PruneRequest
from shears.pruning.models import BUILTIN_MODELS
from shears.server.deps import Authorized, SettingsDep
from shears.server.problems import Problem
from shears.server.ui.headers import SecureStaticFiles, content_security_policy, new_nonce, secure

HERE = Path(__file__).resolve().parent
STATIC = "/ui/static"
# Pages are shells that hold no data (they fetch it with the token the user types), so they and their
# static files load without the token: a browser cannot send an Authorization header when it navigates.
PUBLIC_PAGES = frozenset({"/", "/ui", "/ui/compare", "/docs", "/redoc"})
PUBLIC_PAGE_PREFIXES = (STATIC + "/", "/ui/jobs/")
_templates = Jinja2Templates(directory=HERE / "templates")  # autoescapes .html
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_LISTED = 200  # local models / text files offered in the form
# The <style> elements redoc-2.5.4/redoc.standalone.js inserts at load (see redoc() below).
REDOC_STYLE_HASHES = (
    "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='",
    "'sha256-QMIg+bpjm3JdElJ388KYke01izlUW0UoNOeKjpMxdgc='",
)

pages = APIRouter(include_in_schema=False)
api = APIRouter(include_in_schema=False, dependencies=[Authorized])


def _page(request: Request, template: str, csp: str | None = None, **context: Any) -> Response:
    response = _templates.TemplateResponse(
        request, template, {"static": STATIC, "version": __version__, **context}
    )
    response.headers["Cache-Control"] = "no-cache"
    return secure(response, csp) if csp else secure(response)


@pages.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@pages.get("/ui", response_class=HTMLResponse)
def jobs_page(request: Request) -> Response:
    return _page(request, "jobs.html", page="jobs", title="Jobs")


@pages.get("/ui/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: Annotated[str, PathParam(max_length=64)]) -> Response:
    if not _JOB_ID.fullmatch(job_id):
        raise Problem(404, "not_found", "no such job")
    return _page(request, "job.html", page="job", title=f"Job {job_id}", job_id=job_id)


@pages.get("/ui/compare", response_class=HTMLResponse)
def compare_page(request: Request) -> Response:
    return _page(request, "compare.html", page="compare", title="Compare jobs")


@pages.get("/docs", response_class=HTMLResponse)
def swagger(request: Request) -> Response:
    return _page(request, "docs.html", title="API (Swagger UI)", openapi_url=request.app.openapi_url)


@pages.get("/redoc", response_class=HTMLResponse)
def redoc(request: Request) -> Response:
    nonce = new_nonce()
    # ReDoc's styled-components insert <style> elements carrying this nonce; two more are inserted
    # while its bundle loads, before it knows the nonce (perfect-scrollbar's CSS and an empty one):
    # allowed by hash. Its search runs in a worker built from a blob.
    csp = content_security_policy(
        style_src=f"'self' 'nonce-{nonce}' {' '.join(REDOC_STYLE_HASHES)}", worker_src="blob:"
    )
    return _page(
        request, "redoc.html", csp, title="API (ReDoc)", openapi_url=request.app.openapi_url, nonce=nonce
    )


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def local_models(roots: list[Path]) -> list[str]:
    """HF folders (a config.json) and .gguf files in the allowed folders, one level down."""
    found: list[str] = []
    for root in roots:
        if not root.is_dir():
            continue
        candidates = [root, *sorted(p for p in root.iterdir() if not p.name.startswith("."))]
        for path in candidates:
            if not _inside(path, root):  # a link out of the folder is refused at submit anyway
                continue
            if (path.is_dir() and (path / "config.json").is_file()) or path.suffix == ".gguf":
                found.append(str(path.resolve()))
            if len(found) >= _MAX_LISTED:
                return found
    return found


def text_files(roots: list[Path]) -> list[str]:
    found: list[str] = []
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.iterdir()):
            if path.suffix in TEXT_SUFFIXES and path.is_file() and _inside(path, root):
                found.append(str(path.resolve()))
            if len(found) >= _MAX_LISTED:
                return found
    return found


@api.get("/ui/options")
def form_options(settings: SettingsDep) -> dict[str, Any]:
    """What the submit form offers: models and text files this server allows, and the request schema."""
    return {
        "builtin_models": sorted(BUILTIN_MODELS),
        "local_models": local_models(settings.model_dirs),
        "text_files": text_files(settings.text_dirs),
        "upload_max_bytes": settings.upload_max_bytes,
        "request_schema": PruneRequest.model_json_schema(),
    }


def install(app: FastAPI) -> None:
    """Mount the dashboard, its static files and the offline docs (create the app with docs_url=None)."""
    app.include_router(pages)
    app.include_router(api)
    app.mount(STATIC, SecureStaticFiles(directory=HERE / "static"), name="ui-static")
