"""The server's API key: 'Authorization: Bearer KEY' on every path except /health.

Decision (with a key set): everything but /health needs the key, including /openapi.json (the
schema lists every endpoint and field) and unknown paths (a client without the key learns
nothing, not even which paths exist). The interactive /docs and /redoc pages are switched off
(create_app), because a browser opening them cannot send the header: they would only show an
error. Without a key the server is open and the pages are on, for local use. /health stays open
for liveness probes (Docker, load balancers), which carry no key.
"""
from __future__ import annotations

import secrets
from typing import Any, Callable

from .protocol import error_response

OPEN_PATHS = frozenset({"/health"})


def key_problem(header: bytes, api_key: bytes) -> str | None:
    """Why an Authorization header does not carry `api_key` (None when it does).

    The scheme is matched case-insensitively ("bearer", "BEARER"), as RFC 7235 says auth schemes are.
    """
    if not header.strip():
        return "missing API key; send the header 'Authorization: Bearer KEY'"
    scheme, _, credentials = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return "the Authorization header must use the Bearer scheme; send 'Authorization: Bearer KEY'"
    if not secrets.compare_digest(credentials.strip(), api_key):
        return "incorrect API key; send the key the server was started with"
    return None


class ApiKeyMiddleware:
    """Answer 401 to requests without the key (except OPEN_PATHS), before the body is read.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware (`@app.middleware`) wraps `receive`,
    which hides a client's disconnect from `request.is_disconnected()`.
    """

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and _route_path(scope) not in OPEN_PATHS:
            problem = key_problem(dict(scope["headers"]).get(b"authorization", b""), self.api_key)
            if problem is not None:
                await error_response(401, problem, code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route_path(scope: dict) -> str:
    """The path inside this app: without the prefix it is mounted under (scope["root_path"])."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
