"""Helpers for tests that run real daemons as trio tasks on 127.0.0.1, port 0."""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager

import trio

from pttd.config import Config
from pttd.control import ControlClient
from pttd.daemon import Daemon


def fast_config(
    data_dir: str,
    mode: str = "node",
    gateway: dict | None = None,
    peers=(),
    hub: dict | None = None,
    hubs=(),
    replicator: dict | None = None,
    oidc=(),
    **wire,
) -> Config:
    cfg = Config(data_dir=data_dir, synchronous="NORMAL", mode=mode, peers=list(peers), hubs=list(hubs))
    cfg.oidc = list(oidc)
    cfg.wire.listen = "127.0.0.1:0"
    cfg.gateway.http = "127.0.0.1:0"
    cfg.hub.http = "127.0.0.1:0"
    for k, v in (gateway or {}).items():
        setattr(cfg.gateway, k, v)
    for k, v in (hub or {}).items():
        setattr(cfg.hub, k, v)
    cfg.replicator.http = "127.0.0.1:0"
    for k, v in (replicator or {}).items():
        setattr(cfg.replicator, k, v)
    cfg.wire.reconnect_min = 0.05
    cfg.wire.reconnect_max = 0.5
    for k, v in wire.items():
        setattr(cfg.wire, k, v)
    return cfg


class Running:
    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.node = daemon.node
        self.address = daemon.node.listen_addresses[0]
        self.id = daemon.node.id.hex()
        self.client = ControlClient(daemon.control_path)
        self.http = daemon.http_addresses[0] if daemon.http_addresses else None
        self.gateway = daemon.gateway

    async def call(self, cmd: str, **args):
        return await trio.to_thread.run_sync(lambda: self.client.call(cmd, args))

    async def stop(self) -> None:
        self.daemon.stop()
        await self.stopped.wait()


@asynccontextmanager
async def daemons(tmp_path, n: int, **wire):
    """Start ``n`` daemons in data directories d0..d(n-1) under tmp_path."""
    async with trio.open_nursery() as nursery:
        running = []
        for i in range(n):
            r = await start_daemon(nursery, os.path.join(tmp_path, f"d{i}"), **wire)
            running.append(r)
        yield running
        for r in running:
            r.daemon.stop()


async def start_daemon(nursery, data_dir: str, **options) -> Running:
    daemon = Daemon(fast_config(data_dir, **options))
    stopped = trio.Event()

    async def run() -> None:
        try:
            await daemon.run()
        finally:
            stopped.set()

    nursery.start_soon(run)
    with trio.fail_after(10):
        await daemon.ready.wait()
    r = Running(daemon)
    r.stopped = stopped
    return r


async def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until ``predicate()`` is true, checking after every scheduler pass."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


def log_lines(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]
