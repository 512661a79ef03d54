"""The daemon core: holds a data directory while it runs.

This first version opens (or creates) the data directory, locks it against a second
daemon, announces itself in ``run.json`` and shuts down cleanly on SIGINT/SIGTERM.
The wire protocol, peers and the other modes are built on this core (issues 3-6).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal

import trio

from .datadir import DataDir
from .errors import DataDirError

log = logging.getLogger("pttd.daemon")

MODES = ("node", "gateway", "hub", "replicator")
IMPLEMENTED_MODES = ("node",)


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
    def __init__(self, data_dir: str, mode: str = "node"):
        if mode not in MODES:
            raise DataDirError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
        self.data_dir = os.path.abspath(data_dir)
        self.mode = mode
        self.ready = trio.Event()
        self.run_file = os.path.join(self.data_dir, "run.json")

    async def run(self) -> None:
        if self.mode not in IMPLEMENTED_MODES:
            raise DataDirError(f"mode {self.mode!r} is not available in this version of pttd (only: node)")
        dd, created = await trio.to_thread.run_sync(DataDir.open_or_init, self.data_dir)
        if created:
            log.info("created data directory %s", dd.path)
        lock = DataDirLock(dd.path)
        try:
            await trio.to_thread.run_sync(lock.acquire)
            node_id = dd.default_repo_id()
            run_info = {"pid": os.getpid(), "mode": self.mode, "node_id": node_id}
            await trio.to_thread.run_sync(_write_json_atomic, self.run_file, run_info)
            log.info("ready: mode=%s node=%s data_dir=%s", self.mode, node_id, dd.path)
            self.ready.set()
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    break
        finally:
            if self.ready.is_set():
                try:
                    os.remove(self.run_file)
                except FileNotFoundError:
                    pass
            with trio.CancelScope(shield=True):  # closing checkpoints the WAL: off the event loop
                await trio.to_thread.run_sync(dd.close)
            lock.release()
            log.info("stopped")
