"""What an HTTP user may ask for: model specs and text sources checked before a job is queued.

A path from an HTTP user is never trusted: local models and text files are accepted only when they
resolve (symlinks followed) inside a folder the operator listed. The worker runs the same checks
again before it starts, so a path swapped after submission gains nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from shears.calibration.sources import UPLOAD_ID, is_local_path, parse_hf_spec
from shears.errors import InvalidRequest
from shears.pruning.config import PruneRequest
from shears.pruning.models import BUILTIN_MODELS, check_request_fits, check_spec
from shears.pruning.runtimes import check_configured
from shears.pruning.structure.plan import check_config_file
from shears.server.problems import quoted
from shears.server.settings import Settings

_PATHLIKE_PREFIXES = ("/", ".", "~", "\\")


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root.resolve()) for root in roots)


def _allowed_path(spec: str, roots: list[Path], what: str, setting: str) -> Path:
    path = Path(spec)
    if not roots:
        raise InvalidRequest(
            f"{what} {spec!r}: local paths are refused by this server (the operator lists "
            f"allowed folders in {setting})"
        )
    if not path.is_absolute():
        raise InvalidRequest(f"{what} {spec!r}: give an absolute path inside an allowed folder")
    resolved = path.resolve()
    if not _inside(resolved, roots):
        raise InvalidRequest(f"{what} {spec!r} is outside the folders this server allows ({setting})")
    return resolved


def looks_like_path(spec: str) -> bool:
    return spec.startswith(_PATHLIKE_PREFIXES) or spec.endswith(".gguf") or ".." in spec or "\\" in spec


def check_model(request: PruneRequest, settings: Settings) -> None:
    spec = request.model
    options = settings.engine_options()
    if spec in BUILTIN_MODELS:
        return
    if looks_like_path(spec):
        path = _allowed_path(spec, settings.model_dirs, "model", "SHEARS_MODEL_DIRS")
        check_spec(spec, request.revision, options)
        if request.structure is not None and path.is_dir():
            check_config_file(request.structure, path)  # impossible counts: 422 now, not a failed job
        return
    if Path(spec).exists():
        # Relative to the server's folder it names a file, but a job never reads relative paths (its
        # worker runs in an empty folder): it is a hub id, checked as such.
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(spec)
        except HFValidationError as exc:
            raise InvalidRequest(f"model {spec!r} is not a valid hub repo id: {exc}") from exc
        return
    check_spec(spec, request.revision, options)


def check_source(spec: str, settings: Settings, upload_exists: Callable[[str], bool], field: str) -> None:
    if spec in ("builtin", "self"):
        return
    if spec.startswith("upload:"):
        upload_id = spec.removeprefix("upload:")
        if not UPLOAD_ID.fullmatch(upload_id) or not upload_exists(upload_id):
            raise InvalidRequest(f"{field} {spec!r}: no such upload; POST the file to /v1/calibration first")
        return
    if spec.startswith("hf:"):
        if is_local_path(spec):
            raise InvalidRequest(f"{field} {spec!r}: datasets from local folders are refused by this server")
        parse_hf_spec(spec)
        return
    path = _allowed_path(spec, settings.text_dirs, field, "SHEARS_TEXT_DIRS")
    if not path.is_file():
        raise InvalidRequest(f"{field} {spec!r}: no such file")


def admit(request: PruneRequest, settings: Settings, upload_exists: Callable[[str], bool]) -> None:
    """Raise a shears.errors.ShearsError (its code says which) if the request may not run here."""
    with _unusable_path("model", request.model):
        check_model(request, settings)
    check_configured(request.verify_runtimes, settings.engine_options().runtime_pythons)
    # Before queueing: windows longer than the model's positions (a built-in alias or an allowed
    # folder; a hub model's config is checked by the engine before any work).
    if request.model in BUILTIN_MODELS or looks_like_path(request.model):
        with _unusable_path("model", request.model):
            check_request_fits(request)
    with _unusable_path("calibration.source", request.calibration.source):
        check_source(request.calibration.source, settings, upload_exists, "calibration.source")
    if request.evaluation.enabled and request.evaluation.source is not None:
        with _unusable_path("evaluation.source", request.evaluation.source):
            check_source(request.evaluation.source, settings, upload_exists, "evaluation.source")


@contextmanager
def _unusable_path(field: str, spec: str) -> Iterator[None]:
    """A name the file system refuses to look up (a part over 255 bytes: OSError; a NUL: ValueError)
    is the user's error."""
    try:
        yield
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InvalidRequest(f"{field} {quoted(spec)} cannot name a file or model here ({reason})") from exc
