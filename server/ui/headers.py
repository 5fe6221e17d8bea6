"""Security headers for the dashboard's pages and static files: a strict Content-Security-Policy.

Scripts and styles come from this origin only (no inline script, no eval, no inline style), data
from the same origin's API; nothing may frame the pages. ReDoc injects its styles as <style>
elements, so its page allows styles carrying a per-response nonce that it hands to ReDoc.
"""

from __future__ import annotations

import secrets

from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

_POLICY = {
    "default-src": "'none'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self' data: blob:",
    "font-src": "'self'",
    "connect-src": "'self'",
    "manifest-src": "'self'",
    "form-action": "'self'",
    "frame-ancestors": "'none'",
    "base-uri": "'none'",
    "object-src": "'none'",
}


def content_security_policy(**overrides: str) -> str:
    policy = _POLICY | {key.replace("_", "-"): value for key, value in overrides.items()}
    return "; ".join(f"{key} {value}" for key, value in policy.items())


CSP = content_security_policy()
_COMMON = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def secure(response: Response, csp: str = CSP) -> Response:
    response.headers["Content-Security-Policy"] = csp
    for name, value in _COMMON.items():
        response.headers.setdefault(name, value)
    return response


def new_nonce() -> str:
    return secrets.token_urlsafe(18)


class SecureStaticFiles(StaticFiles):
    """Static files with the same headers as the pages; revalidated by ETag on each use."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.setdefault("Cache-Control", "no-cache")
        return secure(response)
