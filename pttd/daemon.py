"""The daemon: holds a data directory while it runs.

It opens (or creates) the data directory, locks it against a second daemon, runs the
node (wire protocol, sync), the chat service and the control socket, in gateway mode
also the HTTP API; announces itself in ``run.json`` and shuts down cleanly on
SIGINT/SIGTERM.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal

import trio

from .config import Config, parse_address
from .control import ControlServer
from .datadir import DataDir, default_data_dir, make_dir
from .errors import DataDirError, PttError
from .gateway import server as http_server
from .gateway.http import build_app
from .gateway.keys import GatewayKey
from .gateway.service import Gateway
from .gctune import quiet_gc
from .hub.http import build_hub_app
from .hub.service import Hub
from .node import Node
from .replicator import Replicator, build_replicator_app

log = logging.getLogger("pttd.daemon")

MODES = ("node", "gateway", "hub", "replicator")
IMPLEMENTED_MODES = MODES
# A gateway makes many small commits, each writing a page of the blocks' address index
# per new block (addresses are random): smaller pages cost less to rewrite and to
# checkpoint. Measured: the store thread's CPU per post 0.50 -> 0.43 ms from 64 to 16 KiB;
# from 16 to 4 KiB the WAL written per group of 30 posts 1,200 -> 545 KiB and posts/s
# +9% (bench/README); 2 KiB was no faster.
GATEWAY_PAGE_SIZE = 4096


async def serve_http(app, address: str, limits, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The HTTP API (pttd.gateway.server); started with the real bound addresses.
    ``limits``: the [gateway] settings (their HTTP limits apply to every mode's API)."""
    host, port = parse_address(address)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
    except OSError as exc:
        raise PttError(f"cannot serve HTTP on {address}: {exc.strerror or exc}") from None
    await http_server.serve(
        app,
        listeners,
        limits.http_max_connections,
        limits.http_max_per_address,
        task_status=task_status,
    )


class DataDirLock:
    """An exclusive advisory lock on ``<data-dir>/lock``, released when the process ends."""

    def __init__(self, path: str):
        self.path = os.path.join(path, "lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                holder = _read_pid(self.path)
                who = f" (pid {holder})" if holder else ""
                raise DataDirError(f"another pttd{who} is already running on {os.path.dirname(self.path)}") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _warn_if_open(path: str) -> None:
    """The store holds secrets (sealed keys, password hashes, the users' data): say so
    when others on this machine can read the directory (a restore into a directory
    made by hand, say); its mode is the operator's to change."""
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        log.warning("data directory %s can be read by other users of this machine (mode %o): chmod 700 it", path, mode)


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Daemon:
    def __init__(self, cfg: Config, own_process: bool = False):
        self.own_process = own_process  # the whole process is this daemon's (pttd start): tune its GC
        if cfg.mode not in MODES:
            raise DataDirError(f"unknown mode {cfg.mode!r} (one of {', '.join(MODES)})")
        self.cfg = cfg
        self.data_dir = os.path.abspath(os.path.expanduser(cfg.data_dir or default_data_dir()))
        self.mode = cfg.mode
        # absolute: run.json tells pttctl where it is, from whatever directory it runs in
        self.control_path = os.path.abspath(
            os.path.expanduser(cfg.control or os.path.join(self.data_dir, "control.sock"))
        )
        self.ready = trio.Event()
        self.run_file = os.path.join(self.data_dir, "run.json")
        self.node: Node | None = None
        self.gateway: Gateway | None = None
        self.hub: Hub | None = None
        self.replicator: Replicator | None = None
        self.http_addresses: list[str] = []  # http://host:port, once serving
        self._stop = trio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        if self.mode not in IMPLEMENTED_MODES:
            raise DataDirError(
                f"mode {self.mode!r} is not available in this version of pttd (only: node, gateway, hub)"
            )
        page_size = self.cfg.page_size or (GATEWAY_PAGE_SIZE if self.mode == "gateway" else 0)
        # The lock before the store: two daemons started at once on a new directory both
        # created it, each removing the other's half-made store.
        await trio.to_thread.run_sync(make_dir, self.data_dir)
        lock = DataDirLock(self.data_dir)
        await trio.to_thread.run_sync(lock.acquire)
        dd = None
        try:
            dd, created = await trio.to_thread.run_sync(
                DataDir.open_or_init, self.data_dir, self.cfg.synchronous, page_size
            )
            if created:
                log.info("created data directory %s", dd.path)
            _warn_if_open(dd.path)
            node_id = await trio.to_thread.run_sync(dd.default_repo_id)
            identity = await trio.to_thread.run_sync(dd.keys.load, node_id)
            node = self.node = Node(dd, self.cfg, identity, self.mode)
            gw_key = None
            if self.mode == "gateway":
                g = self.cfg.gateway
                key_file = os.path.abspath(os.path.expanduser(g.key_file or os.path.join(dd.path, "gateway.key")))
                passphrase = os.environ.get(g.passphrase_env) if g.passphrase_env else None
                gw_key = await trio.to_thread.run_sync(
                    GatewayKey.load, dd.store, key_file, passphrase, g.passphrase_env
                )
            gateway = self.gateway = Gateway(node, gw_key)
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run)
                await nursery.start(gateway.run)
                await nursery.start(ControlServer(node, self.control_path, gateway).serve)
                run_info = {
                    "pid": os.getpid(),
                    "mode": self.mode,
                    "node_id": node_id,
                    "listen": node.listen_addresses,
                    "control": self.control_path,
                }
                if self.mode == "replicator":
                    rep = self.replicator = Replicator(node)
                    await nursery.start(rep.run)
                    app = build_replicator_app(rep, self.cfg.gateway.cors_origins)
                    self.http_addresses = await nursery.start(
                        serve_http, app, self.cfg.replicator.http, self.cfg.gateway
                    )
                    run_info["http"] = self.http_addresses
                    log.info("replicator HTTP API on %s", ", ".join(self.http_addresses))
                if self.mode == "hub":
                    hub = self.hub = Hub(node)
                    await nursery.start(hub.run)
                    app = build_hub_app(hub, self.cfg.gateway.cors_origins)
                    self.http_addresses = await nursery.start(serve_http, app, self.cfg.hub.http, self.cfg.gateway)
                    run_info["http"] = self.http_addresses
                    log.info("hub HTTP API on %s", ", ".join(self.http_addresses))
                if self.mode == "gateway":
                    self.http_addresses = await nursery.start(
                        serve_http, build_app(gateway), self.cfg.gateway.http, self.cfg.gateway
                    )
                    run_info["http"] = self.http_addresses
                    log.info("HTTP API on %s", ", ".join(run_info["http"]))
                    if self.cfg.gateway.test_login:
                        log.warning("POST /test-login is ENABLED: anyone can log in by a bare id (development only)")
                    else:
                        log.info("POST /test-login is disabled (enable it only for development: [gateway] test_login)")
                await trio.to_thread.run_sync(_write_json_atomic, self.run_file, run_info)
                log.info("ready: mode=%s node=%s data_dir=%s", self.mode, node_id, dd.path)
                if self.own_process:
                    quiet_gc()
                self.ready.set()
                nursery.start_soon(self._signals)
                await self._stop.wait()
                log.info("shutting down")
                nursery.cancel_scope.cancel()
        finally:
            if self.ready.is_set():
                try:
                    os.remove(self.run_file)
                except FileNotFoundError:
                    pass
            if dd is not None:
                with trio.CancelScope(shield=True):  # closing checkpoints the WAL: off the event loop
                    await trio.to_thread.run_sync(dd.close)
            lock.release()
            log.info("stopped")

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                self.stop()
                return
