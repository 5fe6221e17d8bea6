"""The API's gate, as plain ASGI middleware in front of every route: the bearer token, then the body size.

Both are checked before a route reads a byte of the body (FastAPI parses a body before it runs a
route's dependencies, so a dependency would check the token only after a 100 MB JSON was parsed).
Answers it gives itself leave a request body unread, so then they say `Connection: close`.
"""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shears.server.problems import problem_response
from shears.server.settings import Settings

# Reachable without the token: probes for load balancers and orchestrators, which carry none.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
# A job request is a few hundred bytes; this bounds what one body (and so one stored job) can hold.
MAX_JSON_BODY = 64 << 10
# Multipart framing around an uploaded file (boundaries, part headers).
MULTIPART_OVERHEAD = 64 << 10
UPLOADS = "/v1/calibration"


def body_limit(path: str, settings: Settings) -> int:
    if path == UPLOADS:
        return settings.upload_max_bytes + MULTIPART_OVERHEAD
    return MAX_JSON_BODY


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        public_paths: frozenset[str] = frozenset(),
        public_prefixes: tuple[str, ...] = (),
    ) -> None:
        """public_paths/public_prefixes: also reachable without the token (pages that ask for it)."""
        self.app = app
        self.settings = settings
        self.public_paths = PUBLIC_PATHS | public_paths
        self.public_prefixes = public_prefixes
        token = settings.token.get_secret_value() if settings.token is not None else ""
        self.token = token.encode() if token else None

    def authorized(self, scope: Scope) -> bool:
        path = scope["path"]
        public = path in self.public_paths or path.startswith(self.public_prefixes)
        if self.token is None or public:
            return True
        value = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, given = value.partition(b" ")
        # compare_digest on bytes takes constant time for equal lengths, and never short-cuts on content.
        return scheme.lower() == b"bearer" and hmac.compare_digest(given, self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.authorized(scope):
            await self._answer(
                scope,
                receive,
                send,
                401,
                "unauthorized",
                "a valid bearer token is required (Authorization: Bearer <token>)",
                {"WWW-Authenticate": 'Bearer realm="shears"'},
            )
            return
        limit = body_limit(scope["path"], self.settings)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            detail = f"request bodies are capped at {limit} bytes"
            await self._answer(scope, receive, send, 413, "payload_too_large", detail)
            return
        await self.app(scope, _capped(receive, limit), send)

    @staticmethod
    async def _answer(
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        code: str,
        detail: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        headers = dict(headers or {})
        if _body_pending(scope):  # left unread: the connection cannot carry another request
            headers["Connection"] = "close"
        await problem_response(status, code, detail, headers=headers)(scope, receive, send)


def _body_pending(scope: Scope) -> bool:
    headers = dict(scope["headers"])
    return headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers


def _capped(receive: Receive, limit: int) -> Receive:
    """`receive` that stops a chunked body at `limit` bytes: the route sees a 413 (an HTTPException)."""
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(
                    413, f"request bodies are capped at {limit} bytes", headers={"Connection": "close"}
                )
        return message

    return capped
