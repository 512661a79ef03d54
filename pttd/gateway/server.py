"""A small HTTP/1.1 server for ASGI apps on trio; httptools (llhttp, in C) parses.

Why not hypercorn: on this project's 2-core machines hypercorn's trio worker answered a
route that does no work about 900 times a second (1.1 ms of CPU each). Why not h11 (which
this server used first): parsing a request and framing its answer took ~130 us of CPU
in h11, ~6 us in httptools, and the gateway is bound by one core. The server only moves
bytes and ASGI events; httptools turns bytes into events, and answers are framed here
(Content-Length when the body is known, chunked when streamed).

What it does: HTTP/1.1 keep-alive and pipelining, request bodies streamed to the app
(chunked ones too), responses streamed from it (Server-Sent Events),
``http.disconnect`` when the client goes away, ``100 Continue``, limits on header size,
idle and read timeouts, at most ``max_connections`` at once. No HTTP/2, no TLS, no
upgrades: put a reverse proxy in front for those.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import unquote_to_bytes

import httptools
import trio

log = logging.getLogger("pttd.http")

App = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

MAX_HEADERS = 16 * 1024
READ = 65536
KEEPALIVE_TIMEOUT = 75.0  # between requests on one connection
READ_TIMEOUT = 30.0  # for each read of a request that has begun
HEADER_TIMEOUT = 15.0  # a request's head, complete, from its first byte
BODY_TIMEOUT = 120.0  # a request's body, complete, from the end of its head
SEND_TIMEOUT = 30.0  # a client that reads nothing for this long is dropped
MAX_DRAIN = 1 << 20  # an unread request body up to this is skipped to keep the connection
MAX_AHEAD = 64 * 1024  # bytes of pipelined requests read ahead while an answer streams
SEND_PIECE = 64 * 1024  # an answer is sent in pieces, each within SEND_TIMEOUT
MIN_BODY_RATE = 64 * 1024  # bytes/s a large request body may take beyond BODY_TIMEOUT

REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class _Closed(Exception):
    pass


class _BadRequest(Exception):
    def __init__(self, status: int, message: bytes):
        self.status, self.message = status, message


class _Head:
    __slots__ = ("method", "target", "headers", "version", "keep_alive", "expect_continue")

    def __init__(self, method, target, headers, version, keep_alive, expect_continue):
        self.method, self.target, self.headers = method, target, headers
        self.version, self.keep_alive, self.expect_continue = version, keep_alive, expect_continue


_BODY, _END, _EOF = 1, 2, 3  # event kinds besides a _Head


class _Parser:
    """httptools' callbacks turned into a queue of events: a _Head, (_BODY, bytes),
    (_END,), (_EOF,) when the client closed."""

    def __init__(self) -> None:
        self.events: deque = deque()
        self.parser = httptools.HttpRequestParser(self)
        self.in_head = False
        self.too_large = False
        self.head_bytes = 0
        self.trailer_bytes = 0
        self.upgrade = False  # an Upgrade was asked for (ignored): nothing after it is parsed
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []

    def feed(self, data: bytes) -> None:
        if not data:
            self.events.append((_EOF,))
            return
        if self.upgrade:
            return  # the bytes after an upgrade request are not HTTP/1.1: the connection closes
        if self.in_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # (curl --http2 asks for h2c): answered as HTTP/1.1, as a server may, then closed
            self.upgrade = True
        except httptools.HttpParserError:
            raise _BadRequest(400, b"malformed HTTP request") from None
        if self.too_large or (self.in_head and self.head_bytes > MAX_HEADERS):
            raise _BadRequest(431, b"request headers too large")

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_bytes = 0
        self.trailer_bytes = 0
        self._target = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:  # a trailer of a chunked body: counted, not kept
            self.trailer_bytes += len(name) + len(value) + 4
            if self.trailer_bytes > MAX_HEADERS:
                self.too_large = True
            return
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        size = len(self._target) + sum(len(k) + len(v) + 4 for k, v in self._headers)
        if size > MAX_HEADERS:
            self.too_large = True  # raised by feed: an exception here would be httptools' own
            return
        p = self.parser
        headers, self._headers = self._headers, []  # the app's own list: nothing added later
        version = p.get_http_version()
        expect = version == "1.1" and any(k == b"expect" and v.lower() == b"100-continue" for k, v in headers)
        self.events.append(_Head(p.get_method(), self._target, headers, version, p.should_keep_alive(), expect))

    def on_body(self, body: bytes) -> None:
        self.events.append((_BODY, body))

    def on_message_complete(self) -> None:
        self.events.append((_END,))


class _Connection:
    def __init__(self, app: App, stream: trio.SocketStream, server: tuple[str, int]):
        self.app = app
        self.stream = stream
        self.server = server
        self.parser = _Parser()
        self.body_deadline = float("inf")
        self.must_close = False
        try:
            host, port = stream.socket.getpeername()[:2]
            self.client = (host, port)
        except OSError:
            self.client = None

    async def _next_event(self, timeout: float, deadline: float = float("inf")):
        """The next event: each read within ``timeout``, all of them by ``deadline``."""
        events = self.parser.events
        while not events:
            with trio.move_on_at(min(trio.current_time() + timeout, deadline)) as scope:
                data = await self.stream.receive_some(READ)
            if scope.cancelled_caught:
                raise _Closed("timed out")
            self.parser.feed(data)
        return events.popleft()

    def _body_buffered(self) -> bool:
        """Whether the rest of the current request's body has already been read (its end
        is among the parsed events, after body pieces only)."""
        for ev in self.parser.events:
            if not isinstance(ev, tuple) or ev[0] != _BODY:
                return isinstance(ev, tuple) and ev[0] == _END
        return False

    async def _next_request(self):
        """A request's head: waited for up to KEEPALIVE_TIMEOUT, then (from its first
        byte) complete within HEADER_TIMEOUT, however slowly it trickles."""
        if self.parser.events:
            return self.parser.events.popleft()
        with trio.move_on_after(KEEPALIVE_TIMEOUT) as scope:
            data = await self.stream.receive_some(READ)
        if scope.cancelled_caught:
            raise _Closed("idle")
        self.parser.feed(data)
        return await self._next_event(READ_TIMEOUT, trio.current_time() + HEADER_TIMEOUT)

    async def _send(self, data: bytes) -> None:
        """Each piece within SEND_TIMEOUT: a slow reader of a large answer is fine, one
        that reads nothing is dropped."""
        view = memoryview(data)
        for i in range(0, len(view), SEND_PIECE):
            with trio.move_on_after(SEND_TIMEOUT) as scope:
                await self.stream.send_all(view[i : i + SEND_PIECE])
            if scope.cancelled_caught:
                raise _Closed("the client reads nothing")

    async def _simple(self, status: int, message: bytes) -> None:
        body = b'{"error":"' + message + b'"}'
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        try:
            await self._send(head % (status, REASONS.get(status, b""), len(body)) + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _Closed):
            pass

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as self.nursery:  # one per connection: a request's watcher
                await self._requests()
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _requests(self) -> None:
        try:
            while True:
                try:
                    ev = await self._next_request()
                except _BadRequest as exc:
                    await self._simple(exc.status, exc.message)
                    return
                if not isinstance(ev, _Head):
                    return  # the client closed (or sent a body with no head: impossible)
                length = next((v for k, v in ev.headers if k == b"content-length"), b"0")
                extra = int(length) / MIN_BODY_RATE if length.isdigit() else 0.0
                self.body_deadline = trio.current_time() + BODY_TIMEOUT + extra
                try:
                    await self._cycle(ev)
                except _BadRequest:
                    return  # its answer has begun: nothing more to say on this connection
                if self.must_close or not ev.keep_alive or self.parser.upgrade:
                    return
        except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async def _cycle(self, req: _Head) -> None:
        raw_path, _, query = req.target.partition(b"?")
        method = req.method.decode("ascii")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": req.version,
            "method": method,
            "scheme": "http",
            "path": unquote_to_bytes(raw_path).decode("utf-8", "replace"),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": req.headers,
            "client": self.client,
            "server": self.server,
        }
        body_done = False
        continue_sent = not req.expect_continue
        watching = False
        watch_scope = trio.CancelScope()
        watch_done = trio.Event()
        head_only = method == "HEAD"
        disconnected = trio.Event()
        started = False
        finished = False
        chunked = False
        response: dict | None = None
        refused: _BadRequest | None = None

        async def receive() -> dict:
            nonlocal body_done, continue_sent
            if not body_done:
                if not continue_sent:
                    continue_sent = True
                    try:
                        await self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
                    except (trio.BrokenResourceError, trio.ClosedResourceError, _Closed):
                        # the client went away before sending its body: a disconnect,
                        # not an error of the app's
                        self.must_close = True
                        disconnected.set()
                        return {"type": "http.disconnect"}
                try:
                    ev = await self._next_event(READ_TIMEOUT, self.body_deadline)
                except _BadRequest as exc:  # answered by the server once the app gives up
                    nonlocal refused
                    refused = exc
                    self.must_close = True
                    disconnected.set()
                    return {"type": "http.disconnect"}
                except _Closed:
                    self.must_close = True
                    disconnected.set()
                    return {"type": "http.disconnect"}
                kind = ev[0] if isinstance(ev, tuple) else None
                if kind == _BODY:
                    return {"type": "http.request", "body": ev[1], "more_body": True}
                if kind == _END:
                    body_done = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                self.must_close = True
                disconnected.set()
                return {"type": "http.disconnect"}
            # the app waits for the client to go away (a streamed answer): watch the socket
            nonlocal watching
            if not watching:
                watching = True
                self.nursery.start_soon(watch)
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def watch() -> None:
            try:
                with watch_scope:
                    await watching_socket()
            finally:
                watch_done.set()

        async def watching_socket() -> None:
            """After the request: notice a client that goes away (an event stream's end)."""
            ahead = 0
            while not finished:
                try:
                    data = await self.stream.receive_some(READ)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self.must_close = True
                    disconnected.set()
                    return
                ahead += len(data)
                try:
                    self.parser.feed(data)  # a pipelined next request: kept for its turn
                except _BadRequest:
                    ahead = MAX_AHEAD + 1
                if ahead > MAX_AHEAD:  # no more reading here: the answer is the last
                    self.must_close = True
                    disconnected.set()
                    return

        async def send(msg: dict) -> None:
            nonlocal started, finished, response, chunked
            if disconnected.is_set() or finished:
                return
            kind = msg["type"]
            if kind == "http.response.start":
                response = msg
                return
            if kind != "http.response.body" or response is None:
                return
            body = msg.get("body", b"")
            more = msg.get("more_body", False)
            out = []
            if not started:
                started = True
                status = response["status"]
                lines = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b""))]
                has_length = False
                for k, v in response.get("headers", ()):
                    k = k.lower() if isinstance(k, bytes) else k.encode("latin-1").lower()
                    v = v if isinstance(v, bytes) else v.encode("latin-1")
                    if k == b"content-length":
                        has_length = True
                    elif k in (b"transfer-encoding", b"connection"):
                        continue  # framing is this server's
                    lines.append(k + b": " + v + b"\r\n")
                if self.parser.upgrade or (not body_done and not self._body_buffered()):
                    # answered before the body came (a refusal, or one the client was to
                    # send after a 100 Continue), or after an upgrade was asked for: what
                    # follows cannot be told from the rest, so the connection ends here
                    self.must_close = True
                bodiless = head_only or status in (204, 304) or status < 200
                if not has_length and not bodiless:
                    if not more:
                        lines.append(b"content-length: %d\r\n" % len(body))
                    elif req.version == "1.1":
                        chunked = True
                        lines.append(b"transfer-encoding: chunked\r\n")
                    else:
                        self.must_close = True  # HTTP/1.0: the body ends with the connection
                if self.must_close or not req.keep_alive:
                    lines.append(b"connection: close\r\n")
                elif req.version == "1.0":  # kept open: an HTTP/1.0 client must be told
                    lines.append(b"connection: keep-alive\r\n")
                lines.append(b"\r\n")
                out.append(b"".join(lines))
                if bodiless:
                    body = b""
            if body and not head_only:  # the answer to HEAD is the head of GET's, no body
                out.append(b"%x\r\n%s\r\n" % (len(body), body) if chunked else body)
            if not more:
                if chunked:
                    out.append(b"0\r\n\r\n")
                finished = True
            if out:
                try:
                    await self._send(b"".join(out))
                except (trio.BrokenResourceError, trio.ClosedResourceError, _Closed):
                    self.must_close = True
                    disconnected.set()

        try:
            await self.app(scope, receive, send)
        except Exception:
            log.exception("%s %s failed", scope["method"], scope["path"])
            if not started and not disconnected.is_set():
                started = True
                await self._simple(500, b"internal error (logged by the daemon)")
            self.must_close = True
        finally:
            if watching:  # the stream is read by one task at a time: the watcher ends first
                watch_scope.cancel()
                with trio.CancelScope(shield=True):
                    await watch_done.wait()
        if not started:
            if refused is not None:  # the body broke the protocol (or its limits)
                await self._simple(refused.status, refused.message)
            elif not disconnected.is_set():
                await self._simple(500, b"the application sent no answer")
            self.must_close = True
        if not finished:
            raise _Closed("response not complete")
        drained = 0
        while not body_done and not self.must_close:  # a body the app did not read: skipped
            ev = await self._next_event(READ_TIMEOUT, self.body_deadline)
            kind = ev[0] if isinstance(ev, tuple) else None
            if kind == _BODY:
                drained += len(ev[1])
                if drained > MAX_DRAIN:
                    self.must_close = True
            elif kind == _END:
                body_done = True
            else:
                raise _Closed("the request ended early")
        finished = True


async def serve(
    app: App,
    listeners,
    max_connections: int = 1024,
    max_per_address: int = 0,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listeners``; started with their addresses ["http://host:port", ...].
    At most ``max_connections`` at once, and ``max_per_address`` from one client address
    (0: no limit), so that one client cannot hold every slot."""
    addresses = []
    for lst in listeners:
        h, p = lst.socket.getsockname()[:2]
        addresses.append(f"http://[{h}]:{p}" if ":" in h else f"http://{h}:{p}")
    limit = trio.CapacityLimiter(max_connections)
    per_address: dict[str, int] = {}

    async def refuse(conn: _Connection, message: bytes) -> None:
        """A 503 at once (never queued holding a socket), then what the client sent is
        read for a moment, so that closing does not reset the answer away."""
        await conn._simple(503, message)
        with trio.move_on_after(1.0):
            try:
                await conn.stream.send_eof()
                while await conn.stream.receive_some(READ):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        with trio.CancelScope(shield=True):
            await conn.stream.aclose()

    async def handle(stream: trio.SocketStream) -> None:
        h, p = stream.socket.getsockname()[:2]
        conn = _Connection(app, stream, (h, p))
        who = conn.client[0] if conn.client else "?"
        if max_per_address and per_address.get(who, 0) >= max_per_address:
            await refuse(conn, b"too many connections from your address: try again later")
            return
        try:
            limit.acquire_nowait()
        except trio.WouldBlock:
            await refuse(conn, b"too many connections: try again later")
            return
        per_address[who] = per_address.get(who, 0) + 1
        try:
            await conn.run()
        except Exception:  # a bug of ours: this connection ends, never the server
            log.exception("HTTP connection from %s failed", conn.client)
        finally:
            limit.release()
            per_address[who] -= 1
            if not per_address[who]:
                del per_address[who]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started(addresses)
