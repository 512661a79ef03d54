"""What the gateway's and the hub's HTTP APIs share: JSON answers and errors, routes that
answer 405 themselves, and the Starlette app around them (404 as JSON, CORS)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocol.errors import FormatError, PathError

from .errors import USER_ERRORS, Conflict, Forbidden, NotFound, ServerError, TooLarge, TooMany, Unauthorized

log = logging.getLogger("pttd.http")


_STATUS = (
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (TooLarge, 413),
    (TooMany, 429),
    (ServerError, 500),
)


def status_of(exc: BaseException) -> int:
    """The HTTP status of an error pttd reports: 400 unless its kind says otherwise."""
    if isinstance(exc, (PathError, FormatError)):
        return 400
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 400


async def read_object(request, limit: int) -> dict:
    """A JSON object body of at most ``limit`` bytes, bare or wrapped as ``{"data": {...}}``
    (the hub's and the replicator's calls take both, as the earlier clients sent them)."""
    import json

    from .gateway.chat import BadInput

    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise TooLarge(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadInput("body", "is not JSON") from None
    if isinstance(body, dict) and isinstance(body.get("data"), dict):
        body = body["data"]
    if not isinstance(body, dict):
        raise BadInput("body", "must be a JSON object")
    return body


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def answer(request: Request, call: Callable[[], Awaitable]) -> Response:
    """``{"result": ...}`` of ``call()``, or ``{"error": ...}`` with the status its error has."""
    try:
        result = await call()
    except USER_ERRORS as exc:
        status = status_of(exc)
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return error(status, str(exc), getattr(exc, "headers", None))
    except ClientDisconnect:
        return error(400, "the client went away before its request was complete")
    except Exception:
        log.exception("%s %s failed", request.method, request.url.path)
        return error(500, "internal error (logged by the daemon)")
    if isinstance(result, Response):
        return result
    return JSONResponse({"result": result})


def not_allowed(request: Request, methods) -> Response:
    return error(405, f"{request.method} is not allowed here", {"Allow": ", ".join(sorted(methods))})


class AsgiEndpoint:
    """A route's handler as an ASGI app: Starlette then passes it every method (it answers
    405 itself, naming the methods it has)."""

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]):
        self.handler = handler

    async def __call__(self, scope, receive, send) -> None:
        response = await self.handler(Request(scope, receive))
        await response(scope, receive, send)


def make_app(routes: list[Route], cors_origins: list[str], methods: list[str], headers: list[str]) -> Starlette:
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error(404, f"no such route: {request.method} {request.url.path}")
        return error(exc.status_code, exc.detail or "request refused", getattr(exc, "headers", None))

    middleware = []
    if cors_origins:
        middleware.append(
            Middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=methods, allow_headers=headers)
        )
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error})
