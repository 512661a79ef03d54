"""What the gateway's and the hub's HTTP APIs share: JSON answers and errors, routes that
answer 405 themselves, and the Starlette app around them (404 as JSON, CORS)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocol.errors import FormatError, PathError

from . import jsonvalue
from .errors import USER_ERRORS, Busy, Conflict, Forbidden, NotFound, ServerError, TooLarge, TooMany, Unauthorized
from .jsonvalue import parse_json

log = logging.getLogger("pttd.http")


_STATUS = (
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (TooLarge, 413),
    (TooMany, 429),
    (Busy, 503),
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


class BodyBudget:
    """The bytes of request bodies held in memory at once, over all requests: each
    connection may send up to its limit, but not all at once (1,024 connections of
    16 MiB files would be 16 GiB)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    @contextmanager
    def reservation(self) -> Iterator[_Reservation]:
        """What one request takes, given back when it is done with its body."""
        r = _Reservation(self)
        try:
            yield r
        finally:
            self.used -= r.taken


class _Reservation:
    def __init__(self, budget: BodyBudget):
        self.budget = budget
        self.taken = 0

    def take(self, n: int) -> None:
        b = self.budget
        if b.used + n > b.limit:
            raise Busy("the server holds as many request bodies as it takes at once: try again shortly")
        b.used += n
        self.taken += n


async def read_bytes(request, limit: int, what: str = "the request body", held: _Reservation | None = None) -> bytes:
    """A request's body, refused (413) past ``limit`` bytes: by its Content-Length before
    reading any of it, else counted as it arrives. With ``held``: its bytes taken from
    a budget of bytes in memory as they arrive (503 when it is spent); a body announced
    and not sent holds nothing."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"{what} is larger than {limit} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise TooLarge(f"{what} is larger than {limit} bytes")
        if held is not None:
            held.take(len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


async def read_object(request, limit: int) -> dict:
    """A JSON object body of at most ``limit`` bytes, bare or wrapped as ``{"data": {...}}``
    (the hub's and the replicator's calls take both, as the earlier clients sent them)."""
    from .gateway.chat import BadInput

    raw = await read_bytes(request, limit)
    try:
        body = parse_json(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadInput("body", "is not JSON") from None
    if isinstance(body, dict) and isinstance(body.get("data"), dict):
        body = body["data"]
    if not isinstance(body, dict):
        raise BadInput("body", "must be a JSON object")
    return body


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class JsonAnswer:
    """A JSON answer as ASGI messages, without Starlette's Response machinery (an API
    call's answer is always this: one body, its length known)."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, value, headers: dict | None = None):
        self.status = status
        self.body = jsonvalue.dumps(value)
        self.headers = headers

    async def __call__(self, scope, receive, send) -> None:
        head = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body)).encode()),
            (b"x-content-type-options", b"nosniff"),  # a browser never reads an answer as a page or a script
        ]
        if self.headers:
            head += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": head})
        await send({"type": "http.response.body", "body": self.body})


async def answer(request: Request, call: Callable[[], Awaitable]):
    """``{"result": ...}`` of ``call()``, or ``{"error": ...}`` with the status its error has."""
    try:
        result = await call()
    except USER_ERRORS as exc:
        status = status_of(exc)
        if status >= 500 and not isinstance(exc, Busy):  # busy is the clients' to wait out, not a failure
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return JsonAnswer(status, {"error": str(exc)}, getattr(exc, "headers", None))
    except ClientDisconnect:
        return JsonAnswer(400, {"error": "the client went away before its request was complete"})
    except Exception:
        log.exception("%s %s failed", request.method, request.url.path)
        return JsonAnswer(500, {"error": "internal error (logged by the daemon)"})
    if isinstance(result, Response):
        return result
    return JsonAnswer(200, {"result": result})


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


def table_routes(table: dict[str, dict[str, Callable[[Request], Awaitable]]]) -> list[Route]:
    """Routes from ``{path: {method: fn(request)}}``: each call's result (or error)
    answered as JSON, a method not in the table 405."""

    def endpoint(methods: dict):
        async def handle(request: Request) -> Response:
            fn = methods.get(request.method)
            if fn is None:
                return not_allowed(request, methods)
            return await answer(request, lambda: fn(request))

        return handle

    return [Route(p, AsgiEndpoint(endpoint(m))) for p, m in table.items()]


def make_app(routes: list[Route], cors_origins: list[str], methods: list[str], headers: list[str]) -> FastApp:
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error(404, f"no such route: {request.method} {request.url.path}")
        return error(exc.status_code, exc.detail or "request refused", getattr(exc, "headers", None))

    middleware = []
    if cors_origins:
        middleware.append(
            Middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=methods, allow_headers=headers)
        )
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error})
    return FastApp(app, routes, cors_origins)


class FastApp:
    """The routes whose handlers are ``AsgiEndpoint``s, dispatched straight to them,
    without Starlette's middleware stack and router (measured here: about half the CPU of
    a gateway request went there, and the gateway is bound by one core). The endpoints
    already answer every error themselves; this adds the CORS header of a simple
    request. Everything else (preflights, other routes, 404s) goes to the whole app."""

    def __init__(self, app: Starlette, routes: list[Route], cors_origins: list[str]):
        self.app = app
        self.exact: dict[str, AsgiEndpoint] = {}
        self.patterns: list[tuple] = []
        for r in routes:
            if not isinstance(r.endpoint, AsgiEndpoint):
                continue
            if r.param_convertors:
                self.patterns.append((r.path_regex, r.param_convertors, r.endpoint))
            else:
                self.exact.setdefault(r.path, r.endpoint)
        self.any_origin = "*" in cors_origins
        self.origins = {o.encode("latin-1") for o in cors_origins}
        self.routes = app.routes  # as Starlette's (the tests and the OpenAPI builder read them)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS":
            path = scope["path"]
            endpoint = self.exact.get(path)
            params: dict = {}
            if endpoint is None:
                for regex, convertors, ep in self.patterns:
                    m = regex.match(path)
                    if m is not None:
                        params = {k: convertors[k].convert(v) for k, v in m.groupdict().items()}
                        endpoint = ep
                        break
            if endpoint is not None:
                scope["path_params"] = params
                scope["app"] = self.app
                await endpoint(scope, receive, self._cors(scope, send))
                return
        await self.app(scope, receive, send)

    def _cors(self, scope, send):
        origin = next((v for k, v in scope["headers"] if k == b"origin"), None)
        if origin is None or not (self.any_origin or origin in self.origins):
            return send
        extra = (
            [(b"access-control-allow-origin", b"*")]
            if self.any_origin
            else [
                (b"access-control-allow-origin", origin),
                (b"vary", b"Origin"),
            ]
        )

        async def with_cors(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", ()), *extra]}
            await send(msg)

        return with_cors
