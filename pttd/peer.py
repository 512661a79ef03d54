"""One peer session: a Connection plus who asked what.

Tasks per session: the reader (routes answers to the requests waiting for them, heads
to the node, requests to the server tasks; it never blocks, and a peer that queues
more requests than allowed is closed), the servers (answer the peer's requests in
order, the next read from the store while the last is sent; subscriptions apart), and the keepalive/pusher (pings the peer every ``keepalive`` seconds, sends the newest
head of each repository the peer subscribed to, coalescing bursts).
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

import trio

from .wire import Connection, WireError

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("pttd.peer")

# Requests of the peer waiting to be answered. Our own requests to one peer are limited
# to MAX_OUTSTANDING, and an honest peer does the same, so a full queue is a protocol
# violation; the reader never blocks on it (blocking would also stop it reading
# answers, and two busy peers could then wait on each other). The bound keeps a
# session's queued requests to a few MB (a want names at most 4096 hashes).
REQUEST_QUEUE = 64
MAX_OUTSTANDING = 32
# Subscriptions are small and come in bursts (one per followed repository when a
# session starts): their own, longer queue.
SUB_QUEUE = 8192


class PeerGone(Exception):
    """The session ended before the answer came."""


class Misbehaved(Exception):
    """The peer broke the protocol; the session is closed with this reason."""


class Peer:
    def __init__(self, node: Node, conn: Connection, outbound: bool, dialed: str | None = None):
        self.node = node
        self.conn = conn
        self.outbound = outbound
        self.dialed = dialed  # the address we dialed, if we did
        self.subs: set[bytes] = set()  # repositories the peer follows live from us (at most MAX_SUBS)
        self._ids = itertools.count(1)
        self._pending: dict[int, list] = {}  # id -> [event, answer]
        self._pushes: dict[bytes, dict] = {}
        self._push_ready = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._outstanding = trio.Semaphore(MAX_OUTSTANDING)
        self.reason: str | None = None
        self._peer_said_error = False
        self.connected_at = trio.current_time()

    @property
    def id(self) -> bytes:
        return self.conn.peer_id

    @property
    def name(self) -> str:
        return self.conn.name

    def info(self) -> dict:
        return {
            "id": self.id.hex(),
            "address": self.conn.remote,
            "direction": "out" if self.outbound else "in",
            "mode": self.conn.peer_mode,
            "protocol": self.conn.version,
            "bytes_in": self.conn.bytes_in,
            "bytes_out": self.conn.bytes_out,
            "subscribed": [k.hex() for k in self.subs],
        }

    # --- life -----------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the session until it ends; returns the reason it ended."""
        requests_send, requests_recv = trio.open_memory_channel(REQUEST_QUEUE)
        self._subs_send, subs_recv = trio.open_memory_channel(SUB_QUEUE)
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keepalive)
                    nursery.start_soon(self._pusher)
                    nursery.start_soon(self._server, requests_recv)
                    nursery.start_soon(self._sub_server, subs_recv)
                    await self._reader(requests_send)
                    nursery.cancel_scope.cancel()
        except* (WireError, Misbehaved) as group:
            self.reason = self.reason or "; ".join(str(e) for e in _leaves(group))
        finally:
            for slot in self._pending.values():
                slot[0].set()
            self._pending.clear()
            if self.reason and not self.conn.closed and not self._peer_said_error:
                await self.conn.send_error("closing", self.reason)
            await self.conn.aclose()

    def close(self, reason: str) -> None:
        """End the session (from another task) with ``reason``."""
        if self.reason is None:
            self.reason = reason
        if self._scope is not None:
            self._scope.cancel()

    # --- requests we make -----------------------------------------------------------

    async def request(self, msg: dict) -> dict:
        if self.conn.closed or self.reason:
            raise PeerGone(f"{self.name} is gone")
        async with self._outstanding:
            return await self._request(msg)

    async def _request(self, msg: dict) -> dict:
        rid = next(self._ids) % (2**32)
        slot = [trio.Event(), None]
        self._pending[rid] = slot
        try:
            await self.conn.send({**msg, "id": rid})
            with trio.move_on_after(self.node.cfg.wire.request_timeout) as scope:
                await slot[0].wait()
            if scope.cancelled_caught:
                self.close(f"no answer to a {msg['t']} within {self.node.cfg.wire.request_timeout:g} s")
                raise PeerGone(f"{self.name} did not answer")
        except WireError as exc:
            self.close(str(exc))
            raise PeerGone(f"{self.name}: {exc}") from None
        finally:
            self._pending.pop(rid, None)
        if slot[1] is None:
            raise PeerGone(f"{self.name} is gone ({self.reason or 'closed'})")
        return slot[1]

    async def send(self, msg: dict) -> None:
        try:
            await self.conn.send(msg)
        except WireError as exc:
            self.close(str(exc))
            raise PeerGone(f"{self.name}: {exc}") from None

    def push(self, repo: bytes, msg: dict) -> None:
        """Queue the newest head of ``repo`` for the peer (replacing an unsent older one)."""
        self._pushes[repo] = msg
        self._push_ready.set()

    # --- tasks ----------------------------------------------------------------------

    async def _reader(self, requests: trio.MemorySendChannel) -> None:
        while True:
            msg = await self.conn.receive()
            t = msg["t"]
            if t in ("blocks", "pong", "joined", "found"):
                slot = self._pending.get(msg["id"])
                if slot is not None and slot[1] is None:
                    slot[1] = msg
                    slot[0].set()
                # else: the answer to a request that timed out; dropped
            elif t == "head":
                self.node.on_head(self, msg)
            elif t == "announce":
                self.node.on_announce(self, msg)
            elif t in ("want", "get", "ping", "join", "lookup", "pin"):
                try:
                    requests.send_nowait(msg)
                except trio.WouldBlock:
                    raise Misbehaved(f"more than {REQUEST_QUEUE} requests waiting for answers") from None
            elif t in ("sub", "unsub"):
                try:
                    self._subs_send.send_nowait(msg)
                except trio.WouldBlock:
                    raise Misbehaved(f"more than {SUB_QUEUE} subscriptions waiting") from None
            elif t == "error":
                self._peer_said_error = True
                # quoted: the peer's words must not pass for lines of our log
                raise Misbehaved(f"peer closed with error {msg['code']!r}: {msg['message']!r}")
            else:
                raise Misbehaved(f"unexpected {t} message")

    async def _server(self, requests: trio.MemoryReceiveChannel) -> None:
        """Answers in order; the next answer is read from the store while the previous
        one is being sent."""
        answers_send, answers_recv = trio.open_memory_channel(1)

        async def prepare() -> None:
            async with answers_send:
                async for msg in requests:
                    try:
                        answer = await self.node.answer(self, msg)
                    except PeerGone:
                        return
                    if answer is not None:
                        await answers_send.send(answer)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(prepare)
            async for answer in answers_recv:
                try:
                    await self.send(answer)
                except PeerGone:
                    nursery.cancel_scope.cancel()
                    return

    async def _sub_server(self, subs: trio.MemoryReceiveChannel) -> None:
        async for msg in subs:
            try:
                answer = await self.node.answer(self, msg)
                if answer is not None:
                    await self.send(answer)
            except PeerGone:
                return

    async def _keepalive(self) -> None:
        interval = self.node.cfg.wire.keepalive
        while True:
            await trio.sleep(interval)
            try:
                await self.request({"t": "ping"})
            except PeerGone:
                return

    async def _pusher(self) -> None:
        while True:
            await self._push_ready.wait()
            self._push_ready = trio.Event()
            while self._pushes:
                repo = next(iter(self._pushes))
                msg = self._pushes.pop(repo)
                try:
                    await self.send(msg)
                except PeerGone:
                    return


def _leaves(group: BaseException):
    if isinstance(group, BaseExceptionGroup):
        for e in group.exceptions:
            yield from _leaves(e)
    else:
        yield group
