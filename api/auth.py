"""Who may change things through the HTTP API, and errors aiohttp answers on its own.

Reading the fleet is harmless on loopback, so GET/HEAD stay open; anything that changes the
fleet or spends it (POST /api/placements, DELETE, and generation: POST /v1/completions and
/v1/chat/completions, where OpenAI clients send the token as their ``api_key``) takes a bearer token,
``SHARDPLANE_API_TOKEN``, compared in constant time. Binding beyond loopback without a token
would hand placement to anyone on the network, so the API refuses to start then
(:func:`check_binding`).

aiohttp answers some malformed requests itself before any handler or middleware runs (an
oversize request line or header, a bad HTTP method) with a text/plain 400; :class:`JsonErrorRunner`
renders those in the same JSON error shape as every other answer.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from shardplane.api.errors import ApiError
from shardplane.bus.errors import ApiServerError

TOKEN_ENV = "SHARDPLANE_API_TOKEN"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InsecureBinding(ApiServerError, RuntimeError):
    """The API would serve mutating endpoints to the network without a token."""


def env_token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> None:
    if token or is_loopback(host):
        return
    raise InsecureBinding(
        f"refusing to serve the API on {host!r} without a token: anyone who reaches it could "
        f"place models; set {TOKEN_ENV} (clients send `Authorization: Bearer <token>`) or "
        "bind 127.0.0.1"
    )


def token_middleware(token: str | None) -> Any:
    """Mutating requests need ``Authorization: Bearer <token>``; with no token configured they
    are still accepted (loopback only, by :func:`check_binding`)."""
    expected = token.encode() if token else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is None or request.method in SAFE_METHODS:
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(
                401,
                "unauthorized",
                f"{request.method} {request.path} needs `Authorization: Bearer <token>` "
                f"(the {TOKEN_ENV} the API was started with)",
            )
        if not hmac.compare_digest(given.strip().encode(), expected):
            raise ApiError(403, "forbidden", "the bearer token is not this API's token")
        return await handler(request)

    return middleware


# --- aiohttp's own errors as JSON --------------------------------------------------------------


class _JsonErrorHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)  # logs; may raise
        code = "internal" if status >= 500 else "invalid_request"
        text = (message or "").strip() or getattr(exc, "message", "") or str(exc or "")
        if status >= 500:
            text = "internal server error"
        body = ApiError(status, code, f"malformed HTTP request: {text}"[:500]).body()
        response = web.Response(body=body, status=status, content_type="application/json")
        response.force_close()
        del plain
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """An AppRunner whose protocol-level errors (before any middleware) answer JSON too."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer
        return server
