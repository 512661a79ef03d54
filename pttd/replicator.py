"""Replicator mode: pinned repositories kept whole and live, and served to anyone.

A pin is a row of ``pins`` and a persistent follow of the whole repository (``/``) from
any peer that serves it (static peers, hubs' rendezvous, whoever connects). Pins come
from ``[replicator] pins``, ``pttctl replicate KEY``, the old ``POST /load {"key": HEX}``
on the replicator's HTTP port, and a gateway's ``pin`` over the wire (when one of its
users adds a friend). Past ``max_repos`` pinned repositories, or a store of ``max_bytes``,
a new pin is refused with a clear error. A replicator with ``[peers] hubs`` announces
what it holds, so others find it through their hubs.
"""

from __future__ import annotations

import logging
import time

import trio
from starlette.requests import Request

from .errors import Forbidden, NotFound
from .gateway.chat import check_key
from .web import make_app, read_object, table_routes

log = logging.getLogger("pttd.replicator")


class PinRefused(Forbidden):
    """A pin past the replicator's limits (HTTP 403)."""


class Replicator:
    def __init__(self, node):
        self.node = node
        self.store = node.store
        self.cfg = node.cfg.replicator
        self.pinned: set[bytes] = set()
        self._lock = trio.Lock()  # the limit check and the pin are one step

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        rows = await self.node.db(self.store.query, "SELECT repo FROM pins")
        self.pinned = {r[0] for r in rows}
        for k in self.cfg.pins:
            await self.pin(bytes.fromhex(k))
        self.node.replicator = self  # pins over the wire from here on
        for key in list(self.pinned):
            f = self.node.follows.get(key)
            if f is None or f.prefixes != ["/"]:
                await self.node.follow(key, ["/"], [])
        log.info("replicator: %d pinned repositories", len(self.pinned))
        task_status.started()

    async def pin(self, key: bytes) -> dict:
        check_key(key.hex(), "repository")  # a valid Ed25519 public key
        if key == self.node.id:
            raise PinRefused("that is the replicator's own repository")
        async with self._lock:
            if key not in self.pinned:
                await self._add(key)
        f = await self.node.follow(key, ["/"], [])  # the whole repository, live, from anyone
        return self.describe(key, f)

    async def pin_from_peer(self, peer_id: bytes, key: bytes) -> dict:
        """A ``pin`` over the wire, from the daemon whose node key is ``peer_id`` (the
        handshake proved it): only from ``pinners`` when the operator lists them."""
        if self.cfg.pinners and peer_id.hex() not in self.cfg.pinners:
            log.info("replicator: pin of %s refused: peer %s is not in pinners", key.hex()[:16], peer_id.hex()[:16])
            raise PinRefused("this replicator takes pins only from the daemons its operator lists (pinners)")
        return await self.pin(key)

    async def _add(self, key: bytes) -> None:
        if len(self.pinned) >= self.cfg.max_repos:
            raise PinRefused(f"this replicator is full ({self.cfg.max_repos} repositories pinned)")
        if self.cfg.max_bytes:
            size = await self.node.db(self.store.file_size)
            if size >= self.cfg.max_bytes:
                raise PinRefused(f"this replicator's store is full ({size} of {self.cfg.max_bytes} bytes)")
        await self.node.db(
            self.store.execute, "INSERT OR IGNORE INTO pins(repo, added) VALUES (?, ?)", (key, int(time.time()))
        )
        self.pinned.add(key)
        log.info("replicator: pinned %s", key.hex()[:16])
        self.node.announce_soon()  # not under the lock: a slow hub holds up no pin

    async def unpin(self, key: bytes) -> dict:
        if key not in self.pinned:
            raise NotFound(f"{key.hex()} is not pinned here")
        await self.node.db(self.store.execute, "DELETE FROM pins WHERE repo=?", (key,))
        self.pinned.discard(key)
        await self.node.unfollow(key)
        log.info("replicator: unpinned %s (what was synced of it stays in the store)", key.hex()[:16])
        return {"repository": key.hex(), "pinned": False}

    def describe(self, key: bytes, f=None) -> dict:
        f = f or self.node.follows.get(key)
        info = f.info() if f is not None else {"repository": key.hex(), "state": "not followed"}
        info["pinned"] = True
        return info

    def status(self) -> list[dict]:
        return [self.describe(k) for k in sorted(self.pinned)]


def build_replicator_app(rep: Replicator, cors_origins: list[str]):
    """The old replicator's HTTP call, ``POST /load {"key": HEX}``, and a status page."""

    async def load(request: Request):
        body = await read_object(request, 64 * 1024)
        if rep.cfg.load_token and body.get("token") != rep.cfg.load_token:
            raise PinRefused('this replicator needs a token to pin (POST /load {"key", "token"})')
        return await rep.pin(check_key(body.get("key"), "key"))

    async def pins(request: Request):
        return rep.status()

    async def health(request: Request):
        return "ok"

    table = {"/load": {"POST": load}, "/pins": {"GET": pins}, "/health": {"GET": health}}

    routes = table_routes(table)
    return make_app(routes, cors_origins, ["GET", "POST"], ["Content-Type"])
