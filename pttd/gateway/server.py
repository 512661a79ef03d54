"""A small HTTP/1.1 server for ASGI apps on trio, with h11 doing the protocol.

Why not hypercorn: on this project's 2-core machines hypercorn's trio worker answered a
route that does no work about 900 times a second (1.1 ms of CPU each), h11 on a trio
socket about 4,000; at 64 concurrent clients that is ~100 ms of queueing per request
before any work is done, over the gateway's whole latency budget. h11 (sans-IO, by
trio's author) parses and frames; this module only moves bytes and ASGI events.

What it does: HTTP/1.1 keep-alive, request bodies streamed to the app, responses
streamed from it (Server-Sent Events), ``http.disconnect`` when the client goes away,
``100 Continue``, limits on header size, idle and read timeouts, at most
``max_connections`` at once. No HTTP/2, no TLS: put a reverse proxy in front for those.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import unquote_to_bytes

import h11
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


class _Closed(Exception):
    pass


class _Connection:
    def __init__(self, app: App, stream: trio.SocketStream, server: tuple[str, int]):
        self.app = app
        self.stream = stream
        self.server = server
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        self.body_deadline = float("inf")
        try:
            host, port = stream.socket.getpeername()[:2]
            self.client = (host, port)
        except OSError:
            self.client = None

    async def _next_event(self, timeout: float, deadline: float = float("inf")):
        """The next h11 event: each read within ``timeout``, all of them by ``deadline``."""
        while True:
            ev = self.conn.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            with trio.move_on_at(min(trio.current_time() + timeout, deadline)) as scope:
                data = await self.stream.receive_some(READ)
            if scope.cancelled_caught:
                raise _Closed("timed out")
            self.conn.receive_data(data)  # b"" means the client closed

    async def _next_request(self):
        """A request's head: waited for up to KEEPALIVE_TIMEOUT, then (from its first
        byte) complete within HEADER_TIMEOUT, however slowly it trickles."""
        ev = self.conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        with trio.move_on_after(KEEPALIVE_TIMEOUT) as scope:
            data = await self.stream.receive_some(READ)
        if scope.cancelled_caught:
            raise _Closed("idle")
        self.conn.receive_data(data)
        return await self._next_event(READ_TIMEOUT, trio.current_time() + HEADER_TIMEOUT)

    async def _send(self, *events) -> None:
        data = b"".join(self.conn.send(ev) or b"" for ev in events)
        if data:
            with trio.move_on_after(SEND_TIMEOUT) as scope:
                await self.stream.send_all(data)
            if scope.cancelled_caught:
                raise _Closed("the client reads nothing")

    async def _simple(self, status: int, message: bytes) -> None:
        body = b'{"error":"' + message + b'"}'
        headers = [("content-type", "application/json"), ("content-length", str(len(body))), ("connection", "close")]
        try:
            await self._send(h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage())
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, _Closed):
            pass

    async def run(self) -> None:
        try:
            while True:
                try:
                    ev = await self._next_request()
                except h11.RemoteProtocolError as exc:
                    status = exc.error_status_hint
                    await self._simple(status, b"malformed HTTP request" if status == 400 else b"request refused")
                    return
                if isinstance(ev, h11.ConnectionClosed) or ev is h11.PAUSED:
                    return
                if not isinstance(ev, h11.Request):
                    return
                if len(ev.target) + sum(len(k) + len(v) + 4 for k, v in ev.headers) > MAX_HEADERS:
                    await self._simple(431, b"request headers too large")
                    return
                self.body_deadline = trio.current_time() + BODY_TIMEOUT
                await self._cycle(ev)
                if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is not h11.DONE:
                    return
                self.conn.start_next_cycle()
        except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _cycle(self, req: h11.Request) -> None:
        raw_path, _, query = req.target.partition(b"?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": req.http_version.decode(),
            "method": req.method.decode("ascii"),
            "scheme": "http",
            "path": unquote_to_bytes(raw_path).decode("utf-8", "replace"),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": [(k.lower(), v) for k, v in req.headers],
            "client": self.client,
            "server": self.server,
        }
        body_done = False
        watching = False
        head_only = req.method == b"HEAD"
        disconnected = trio.Event()
        started = False
        finished = False
        response: dict | None = None

        async def receive() -> dict:
            nonlocal body_done
            if not body_done:
                if self.conn.they_are_waiting_for_100_continue:
                    await self._send(h11.InformationalResponse(status_code=100, headers=[]))
                try:
                    ev = await self._next_event(READ_TIMEOUT, self.body_deadline)
                except (_Closed, h11.RemoteProtocolError):
                    disconnected.set()
                    return {"type": "http.disconnect"}
                if isinstance(ev, h11.Data):
                    return {"type": "http.request", "body": bytes(ev.data), "more_body": True}
                if isinstance(ev, h11.EndOfMessage):
                    body_done = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                disconnected.set()
                return {"type": "http.disconnect"}
            # the app waits for the client to go away (a streamed answer): watch the socket
            nonlocal watching
            if not watching:
                watching = True
                nursery.start_soon(watch)
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def watch() -> None:
            """After the request: notice a client that goes away (an event stream's end)."""
            while not finished:
                try:
                    data = await self.stream.receive_some(READ)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    disconnected.set()
                    return
                self.conn.receive_data(data)  # a pipelined next request: kept for its turn
                if len(self.conn.trailing_data[0]) > MAX_HEADERS:
                    return

        async def send(msg: dict) -> None:
            nonlocal started, finished, response
            if disconnected.is_set() or finished:
                return
            kind = msg["type"]
            if kind == "http.response.start":
                response = msg
                return
            if kind != "http.response.body" or response is None:
                return
            events = []
            if not started:
                started = True
                headers = [(k, v) for k, v in response.get("headers", [])]
                events.append(h11.Response(status_code=response["status"], headers=headers))
            body = msg.get("body", b"")
            if body and not head_only:  # the answer to HEAD is the head of GET's, no body
                events.append(h11.Data(data=body))
            if not msg.get("more_body", False):
                events.append(h11.EndOfMessage())
                finished = True
            try:
                await self._send(*events)
            except (trio.BrokenResourceError, trio.ClosedResourceError, _Closed):
                disconnected.set()

        async with trio.open_nursery() as nursery:
            try:
                await self.app(scope, receive, send)
            except Exception:
                log.exception("%s %s failed", scope["method"], scope["path"])
                if not started:
                    await self._simple(500, b"internal error (logged by the daemon)")
                    finished = True
            finally:
                finished = True
                nursery.cancel_scope.cancel()
        if not started:
            await self._simple(500, b"the application sent no answer")
        if self.conn.our_state is not h11.DONE:
            raise _Closed("response not complete")
        drained = 0
        while not body_done and drained <= MAX_DRAIN:  # a body the app did not read: skipped
            ev = await self._next_event(READ_TIMEOUT, self.body_deadline)
            if isinstance(ev, h11.Data):
                drained += len(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                body_done = True
            else:
                raise _Closed("the request ended early")


async def serve(app: App, listeners, max_connections: int = 1024, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on ``listeners``; started with their addresses ["http://host:port", ...]."""
    addresses = []
    for lst in listeners:
        h, p = lst.socket.getsockname()[:2]
        addresses.append(f"http://[{h}]:{p}" if ":" in h else f"http://{h}:{p}")
    limit = trio.CapacityLimiter(max_connections)

    async def handle(stream: trio.SocketStream) -> None:
        h, p = stream.socket.getsockname()[:2]
        conn = _Connection(app, stream, (h, p))
        try:
            limit.acquire_nowait()
        except trio.WouldBlock:  # at capacity: refused at once, never queued holding a socket
            await conn._simple(503, b"too many connections: try again later")
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        try:
            await conn.run()
        finally:
            limit.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started(addresses)
