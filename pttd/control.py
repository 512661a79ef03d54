"""The local control endpoint: how ``pttctl`` talks to a running daemon.

A Unix socket (default ``<data-dir>/control.sock``, mode 0600 inside the 0700 data
directory: only the same user reaches it). Each connection carries one request and
its answer, as frames of 4-byte big-endian length + msgpack map:

    request   {"cmd": str, "args": map}
    answer    {"progress": map}*  {"chunk": bin}*  then  {"ok": map} | {"error": str}

The server side runs the same handlers as a local ``pttctl`` (pttd.commands) on the
daemon's open store, so a write through the daemon is pushed to its subscribers.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Callable

import msgpack
import trio

from protocol.framing import FrameDecoder, encode_frame

from . import commands
from .errors import USER_ERRORS, MissingBlock, PttError

log = logging.getLogger("pttd.control")

MAX_CONTROL_FRAME = 64 << 20
STREAM_PIECE = 1 << 20
FIRST_PIECE = 64 << 10  # read in place when the store is idle: kept short
MAX_INLINE_VALUE = 16 << 20  # larger stdin values go through a file


class DaemonNotRunning(PttError):
    pass


def _pack(obj) -> bytes:
    return encode_frame(msgpack.packb(obj, use_bin_type=True), MAX_CONTROL_FRAME)


MAX_WAIT = 7 * 86400.0  # seconds a wait or a sync may be given, at most


def _seconds(value, default: float = 60.0) -> float:
    """A timeout from a client: a finite number of seconds, 0 to MAX_WAIT."""
    if value is None:
        return default
    try:
        s = float(value)
    except (TypeError, ValueError):
        s = -1.0
    if not 0 <= s <= MAX_WAIT:  # NaN fails this too
        raise PttError(f"timeout must be a number of seconds from 0 to {MAX_WAIT:g}, not {value!r}")
    return s


def _hex_key(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise PttError(f"not a repository key (64 hex digits): {text!r}")
    return key


# --- server -------------------------------------------------------------------------


class ControlServer:
    def __init__(self, node, path: str, gateway=None):
        self.node = node
        self.path = path
        self.gateway = gateway

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):  # a typo in --control must not cost a file
                raise PttError(f"cannot create the control socket {self.path}: something else is there (not removed)")
            os.unlink(self.path)  # a leftover of a killed daemon (we hold the data-dir lock)
        plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # made 0600 (only this user connects): no await while it is set
        try:
            plain.bind(self.path)
        except OSError as exc:
            plain.close()
            why = exc.strerror or str(exc)
            if len(os.fsencode(self.path)) > 107:
                why += " (a socket's path is at most 107 bytes: give a shorter one with --control)"
            raise PttError(f"cannot create the control socket {self.path}: {why}") from None
        finally:
            os.umask(old)
        sock = trio.socket.from_stdlib_socket(plain)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, self._handle, [listener])
                task_status.started()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            decoder = FrameDecoder(MAX_CONTROL_FRAME)
            frames: list[bytes] = []
            try:
                with trio.fail_after(30):
                    while not frames:
                        data = await stream.receive_some(1 << 20)
                        if not data:
                            return
                        frames = decoder.feed(data)
                req = msgpack.unpackb(frames[0], raw=False)
                cmd, args = req["cmd"], dict(req.get("args") or {})
            except Exception as exc:
                log.warning("control: bad request: %s", exc)
                return

            async def send(obj) -> None:
                await stream.send_all(_pack(obj))

            try:
                result = await self.dispatch(cmd, args, send)
                await send({"ok": result})
            except USER_ERRORS as exc:
                await _try_send(send, {"error": str(exc)})
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception as exc:
                log.exception("control command %s failed", cmd)
                await _try_send(send, {"error": f"internal error: {exc.__class__.__name__}: {exc}"})

    async def dispatch(self, cmd: str, args: dict, send) -> dict:
        node = self.node
        dd = node.dd
        own = node.id  # the daemon's identity is its own repository's key
        if cmd == "id":
            return (await node.db(commands.repo_id, dd, args.get("repo"))).data
        if cmd in ("put", "rm"):
            if cmd == "put":
                write = (commands.put, dd, args["path"])
                kwargs = {"value": args.get("value"), "filename": args.get("filename")}
            else:
                write, kwargs = (commands.rm, dd, args["path"]), {}
            res, head = await node.db(node.write_and_head, own, node.has_subscribers(own), *write, **kwargs)
            if head is not None:
                # pushed as the answer goes out: the message was built with the write
                await node.publish(own, head)
            return res.data
        if cmd == "get":
            return await self._get(args, send)
        if cmd in ("ls", "log", "diff"):
            fn = getattr(commands, cmd)
            kwargs = {k: v for k, v in args.items() if k in ("version", "repo", "limit")}
            if cmd == "diff" and ("v1" not in args or "v2" not in args):
                raise PttError("diff needs two versions (v1 and v2)")
            pos = [args.get("prefix") or "/"] if cmd == "ls" else [args["v1"], args["v2"]] if cmd == "diff" else []
            for _attempt in range(3):
                try:
                    return (await node.db(fn, dd, *pos, **kwargs)).data
                except MissingBlock:
                    key = _hex_key(args.get("repo"))
                    if key is None:
                        raise
                    versions = [args["v1"], args["v2"]] if cmd == "diff" else [args.get("version")]
                    for v in versions:
                        await node.fetch_prefix(key, args.get("prefix", "/"), v)
            raise PttError("could not fetch what this listing needs")
        if cmd == "verify":
            res = await node.db(commands.verify, dd)
            return res.data
        if cmd == "gc":
            async with node.gate.alone():
                return (await node.db(commands.gc, dd, keep=args.get("keep"))).data
        if cmd == "status":
            st = node.status()
            if node.replicator is not None:
                st["pins"] = node.replicator.status()
            if self.gateway is not None and node.mode == "gateway":
                st["gateway"] = self.gateway.status()
            return st
        if cmd == "peers":
            return {"peers": node.status()["peers"]}
        if cmd == "follow":
            key = _hex_key(args["repo"])
            prefixes = args.get("prefixes") or []
            if node.replicator is not None and key in node.replicator.pinned and prefixes not in ([], ["/"]):
                raise PttError(
                    f"{key.hex()} is pinned here, so it is replicated whole: "
                    "unpin it first (pttctl unreplicate) to follow part of it"
                )
            f = await node.follow(key, prefixes, args.get("peers") or [])
            return f.info()
        if cmd == "unfollow":
            key = _hex_key(args["repo"])
            if not await node.unfollow(key):
                raise PttError(f"not following {key.hex()}")
            return {"repository": key.hex(), "unfollowed": True}
        if cmd == "wait":
            key = _hex_key(args["repo"])
            f = await node.wait_version(key, int(args["version"]), _seconds(args.get("timeout")))
            return f.info()
        if cmd == "sync":
            key = _hex_key(args["repo"])
            started = trio.current_time()
            last = [0.0]

            def progress(f) -> None:
                now = trio.current_time()
                if now - last[0] >= 0.1:
                    last[0] = now
                    pending.append(f.info())

            pending: list[dict] = []
            timeout = _seconds(args.get("timeout"))
            outcome: list = []
            async with trio.open_nursery() as nursery:

                async def pump() -> None:
                    while True:
                        while pending:
                            await send({"progress": pending.pop(0)})
                        await trio.sleep(0.1)

                nursery.start_soon(pump)
                try:  # its error is raised outside the nursery: a user's error, not a group
                    outcome.append(await node.sync_once(key, args.get("peers") or [], timeout, progress, rewalk=True))
                except USER_ERRORS as exc:
                    outcome.append(exc)
                nursery.cancel_scope.cancel()
            if isinstance(outcome[0], BaseException):
                raise outcome[0]
            f = outcome[0]
            info = f.info()
            info["seconds"] = round(trio.current_time() - started, 3)
            if f.local_seq is None:
                raise PttError(f"no peer holds {key.hex()} ({f.error or 'nothing offered'})")
            return info
        if cmd in ("replicate", "unreplicate"):
            rep = node.replicator
            if rep is None:
                raise PttError("this daemon is not a replicator (start it with --mode replicator)")
            key = _hex_key(args.get("repo"))
            return await (rep.pin(key) if cmd == "replicate" else rep.unpin(key))
        if cmd == "join":
            from .config import parse_address

            hub = args.get("hub")
            if not isinstance(hub, str):
                raise PttError("join: the hub's wire address (HOST:PORT) is needed")
            parse_address(hub, dial=True)
            key = _hex_key(args.get("repo")) or own
            message = await node.join_hub(hub, key, args.get("token") or "", float(args.get("timeout") or 30))
            return {"hub": hub, "repository": key.hex(), "joined": True, "message": message}
        users = ("user_add", "user_list", "user_passwd", "token_rotate", "user_export", "user_import")
        if cmd in users or cmd.startswith("chat_"):
            return await chat_command(self.gateway, cmd, args)
        raise PttError(f"unknown command {cmd!r}")

    async def _get(self, args: dict, send) -> dict:
        node = self.node
        key = _hex_key(args.get("repo"))
        fetched = None
        for attempt in range(3):
            try:
                # a short store call for the first piece (the whole value, most often)
                res, first, more = await node.db_quick(_start_get, node.dd, args, FIRST_PIECE)
                break
            except MissingBlock:
                if key is None or attempt == 2:
                    raise
            # Not stored here (outside a sparse follow's prefixes): fetched, and read in
            # the same trip to the store as the fetch's last write, at the version
            # fetched (a newer head may be accepted meanwhile).
            at = dict(args)
            if at.get("version") is None and key in node.follows:
                at["version"] = node.follows[key].local_seq
            try:
                fetched, (res, first, more) = await node.fetch_path(
                    key, args["path"], at.get("version"), then=lambda at=at: _start_get(node.dd, at, FIRST_PIECE)
                )
                break
            except MissingBlock:  # that version was pruned meanwhile: try again
                if attempt == 2:
                    raise
        if fetched is not None:
            res.data["fetched"] = fetched
        await send({"meta": res.data})
        if not (first and more):
            if first:
                await send({"chunk": first})
            return res.data
        # gc waits while the rest is read (it deleted a pruned version's chunks under a
        # slow reader's stream); past its wait it gives up, and the read goes on
        async with node.gate.sync():
            piece = first
            while piece:
                await send({"chunk": piece})
                if not more:
                    break
                if fetched is not None:  # the rest is read from the store: it must be there
                    await node.fetched_stored()
                piece, more = await node.db(_next_piece, res.stream, STREAM_PIECE)
        return res.data


async def chat_command(gw, cmd: str, args: dict) -> dict:
    """Users of a gateway, and the chat actions on the data directory's own repository."""
    from .gateway import chat

    if gw is None:
        raise PttError("this daemon runs no chat service")
    if cmd == "user_add":
        u = await gw.add_user(args.get("name"), args.get("password"), args.get("profile_name"))
        return {"name": u.name, "key": u.hex}
    if cmd == "user_list":
        return {"users": await gw.list_users()}
    if cmd == "user_passwd":
        ended = await gw.set_password(args.get("name"), args.get("password"))
        return {"name": args.get("name"), "sessions_ended": ended}
    if cmd == "token_rotate":
        return await gw.rotate_token_key()
    if cmd == "user_export":
        doc = await gw.export_user(args.get("name"), args.get("passphrase"), bool(args.get("keep")))
        return {"name": args.get("name"), "key": doc["key"], "moved": not args.get("keep"), "account": doc}
    if cmd == "user_import":
        peers = args.get("peers") or []
        if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
            raise PttError("peers must be a list of HOST:PORT")
        u = await gw.import_user(
            args.get("account"),
            args.get("passphrase"),
            args.get("name"),
            peers,
            float(args.get("timeout") or 60),
            keep_name=bool(args.get("keep_name")),
        )
        return {"name": u.name, "key": u.hex, "version": await gw.read(gw.store.head_seq, u.repo.row)}
    u = await gw.local_user()
    if cmd == "chat_topics":
        return {"topics": await gw.read(chat.topics, u.repo)}
    if cmd == "chat_post":
        topic = chat.check_id(args.get("topic"), "topic", topic=True)
        return {"post": await gw.post(u, topic, args.get("text"))}
    if cmd == "chat_read":
        topic = chat.check_id(args.get("topic"), "topic", topic=True)
        limit = args.get("limit")
        if limit is not None and (type(limit) is not int or limit < 1):
            raise PttError(f"limit must be a positive whole number, not {limit!r:.20}")
        return {"messages": await gw.read(gw.topic_index.messages, u.repo, topic, None, None, limit)}
    if cmd == "chat_friends":
        return {"friends": await gw.read(chat.sealed_list, u, "/friends/")}
    if cmd == "chat_friend_add":
        return {"friend": await gw.add_friend(u, {"key": args.get("key")})}
    if cmd == "chat_dm":
        key = chat.check_key(args.get("key"), "key")
        msg = chat.check_message(args.get("text"), "text")
        return {"dm": (await gw.send_dm(u, [key], msg, None))[0]}
    if cmd == "chat_dms":
        return {"conversations": await gw.read(gw.dm_channels, u, None, None)}
    raise PttError(f"unknown command {cmd!r}")


def _start_get(dd, args: dict, limit: int):
    res = commands.get(dd, args["path"], version=args.get("version"), repo=args.get("repo"))
    first, more = _next_piece(res.stream, limit)
    return res, first, more


def _next_piece(stream, limit: int) -> tuple[bytes, bool]:
    """Up to about ``limit`` bytes of the value, and whether there may be more."""
    out = bytearray()
    for piece in stream:
        out += piece
        if len(out) >= limit:
            return bytes(out), True
    return bytes(out), False


async def _try_send(send, obj) -> None:
    try:
        await send(obj)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


# --- client (used by pttctl; plain blocking sockets) ----------------------------------


class ControlClient:
    def __init__(self, path: str):
        self.path = path

    @classmethod
    def for_data_dir(cls, data_dir: str) -> ControlClient | None:
        """The client of the daemon running on ``data_dir``, or None if none runs."""
        try:
            with open(os.path.join(data_dir, "run.json")) as f:
                info = json.load(f)
        except (OSError, ValueError):
            return None
        path = info.get("control")
        if not path:
            return None
        client = cls(path)
        try:
            client._connect().close()
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                return None  # a killed daemon's leftover run.json
            raise
        return client

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            raise
        return s

    def call(
        self,
        cmd: str,
        args: dict,
        on_progress: Callable[[dict], None] | None = None,
        on_chunk: Callable[[bytes], None] | None = None,
        on_meta: Callable[[dict], None] | None = None,
    ) -> dict:
        try:
            request = _pack({"cmd": cmd, "args": args})
        except UnicodeEncodeError as exc:  # a command-line argument the system gave undecoded
            bad = exc.object[exc.start : exc.end] if isinstance(exc.object, str) else ""
            raise PttError(f"an argument is not valid UTF-8 (near {bad!r})") from None
        s = self._connect()
        try:
            try:
                s.sendall(request)
            except OSError as exc:  # not the output's pipe: pttctl's own errors stay its own
                raise PttError(
                    f"the daemon closed the control connection while the request was sent ({exc.strerror or exc})"
                ) from None
            decoder = FrameDecoder(MAX_CONTROL_FRAME)
            while True:
                data = s.recv(1 << 20)
                if not data:
                    raise PttError("the daemon closed the control connection without an answer")
                for frame in decoder.feed(data):
                    msg = msgpack.unpackb(frame, raw=False)
                    if "ok" in msg:
                        return msg["ok"]
                    if "error" in msg:
                        raise PttError(msg["error"])
                    if "progress" in msg and on_progress:
                        on_progress(msg["progress"])
                    if "chunk" in msg and on_chunk:
                        on_chunk(msg["chunk"])
                    if "meta" in msg and on_meta:
                        on_meta(msg["meta"])
        finally:
            s.close()
