"""The chat service over hosted repositories: users, logins, group commit, live events.

Writes: every call that changes a repository is a ``WriteRequest`` naming an operation
of ``writes.OPS``, handed to one writer task. It takes every request waiting (up to
``group_max``) and hands them as one group to the ``GroupWriter`` (in a writer process
of its own by default, see ``pttd/gateway/writes.py``), which applies them in one store
transaction with one sync to the disk. Each caller gets its answer only after that
commit, so an answered write is durable. Writes to one repository are serialized by the
same order; writes of many users share the sync.

Events: a write may record events (a post in a topic, a direct message for a hosted
user) in the same transaction, so a live stream resumed with ``Last-Event-ID`` finds
exactly what was committed. After the commit they are handed to the open streams.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import pickle
import re
import sqlite3
import subprocess
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import jwt
import trio
from blake3 import blake3
from nacl import pwhash
from nacl.exceptions import BadSignatureError, InvalidkeyError
from nacl.secret import SecretBox
from nacl.signing import SigningKey, VerifyKey
from nacl.utils import random

from protocol import tree
from protocol.commit import Commit, sign_commit

from .. import __version__
from ..errors import (
    USER_ERRORS,
    Conflict,
    Forbidden,
    MissingBlock,
    NotFound,
    PttError,
    ServerError,
    TooLarge,
    TooMany,
    Unauthorized,
)
from ..repo import Repository
from ..store import Checkpointer
from ..web import BodyBudget
from . import account, chat, writes
from .chat import GOSSIP, BadInput, ChatUser
from .keys import GatewayKey
from .oidc import Verifier
from .writes import Event

log = logging.getLogger("pttd.gateway")


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@\-]{0,63}")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
TOKEN_CACHE = 65536
CHALLENGE_TTL = 120  # seconds a key-login challenge stays valid
REFRESH_GRACE = 60.0  # seconds a refresh may be retried with the same token (its answer was lost)
MAX_CHALLENGES = 10_000
MAX_FRIENDS = 1000  # each friend hosted elsewhere is a repository this daemon follows
BACKLOG_PAGE = 1000
FILE_FETCH_TIMEOUT = 20.0  # seconds to find a repository's head before fetching a file of it
REMOTE_FILE_READS = 8  # files of repositories not held fetched at once (more wait their turn)
REMOTE_FILE_READS_PER_USER = 2  # of them for one user: one client cannot hold them all
ON_DEMAND_FOLLOWS = 64  # repositories followed only to read their files: the least recently used go
FILE_REFRESH_TIMEOUT = 5.0  # seconds to ask peers for a newer head when a file is not in the one held
CHECKPOINT_EVERY = 2.0  # seconds between looks at the WAL's size, with a writer process
SESSION_PRUNE_EVERY = 3600.0  # seconds between removals of ended login sessions
WRITE_GROUPS_IN_FLIGHT = 2  # groups handed to the writer and not yet answered, at most
SPLIT_MIN = 16  # writes that find the writer idle, from which on they go as two groups
WRITER_EXIT_TIMEOUT = 30.0  # seconds the writer process gets to finish its group on the way out
STREAM_BUFFER = 1024  # events queued for one slow stream before it is closed (it resumes)


class Failures:
    """Failed attempts per key (an account, a client address) within a sliding window."""

    def __init__(self, window: float, limit: int, cap: int = 100_000, counted: str = "failed logins"):
        self.window, self.limit, self.cap, self.counted = window, limit, cap, counted
        self._seen: dict[str, deque[float]] = {}

    def check(self, key: str, what: str) -> None:
        times = self._seen.get(key)
        if not times:
            return
        now = time.monotonic()
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.limit:
            retry = int(times[0] + self.window - now) + 1
            raise TooMany(f"too many {self.counted} for this {what}: try again in {retry} s", retry)

    def add(self, key: str) -> float:
        """Count an attempt; its stamp, for ``forget``."""
        if len(self._seen) >= self.cap:  # a flood of keys: the oldest counts go first
            for k in list(self._seen)[: self.cap // 4]:
                del self._seen[k]
        stamp = time.monotonic()
        self._seen.setdefault(key, deque()).append(stamp)
        return stamp

    def forget(self, key: str, stamp: float) -> None:
        """Uncount an attempt counted before it was known to fail (it did not)."""
        times = self._seen.get(key)
        if times:
            try:
                times.remove(stamp)
            except ValueError:
                pass

    def clear(self, key: str) -> None:
        self._seen.pop(key, None)


@dataclass
class WriteRequest:
    user: ChatUser | None  # None: rows and events only, no commit (delivered direct messages)
    op: str  # one of writes.OPS
    args: tuple
    done: trio.Event = field(default_factory=trio.Event)
    result: object = None
    error: BaseException | None = None
    events: list = field(default_factory=list)
    follows: list = field(default_factory=list)
    committed: bool = False


class Stream:
    """One open live stream (``GET /events``) of one user."""

    def __init__(self, user: ChatUser, topics: set[str]):
        self.user = user
        self.topics = topics
        self.send, self.receive = trio.open_memory_channel[Event](STREAM_BUFFER)
        self.overflowed = False

    def offer(self, ev: Event) -> None:
        try:
            self.send.send_nowait(ev)
        except trio.WouldBlock:
            self.overflowed = True  # the client resumes from its Last-Event-ID
            self.send.close()
        except trio.ClosedResourceError:
            pass


class Unsendable(Exception):
    """A group that cannot be handed to the writer process as it is (a request in it
    does not pickle); nothing of it was sent."""


class ThreadWrites:
    """The GroupWriter on the daemon's store thread (``[gateway] writer = "thread"``)."""

    def __init__(self, gw: Gateway):
        self._node = gw.node
        self._writer = writes.GroupWriter(gw.store, gw.node.id, gw.cfg.event_retention)
        self._sent: deque[list[dict]] = deque()

    async def start(self) -> None:
        pass

    def status(self) -> dict:
        return {}

    async def send(self, reqs: list[dict], finish_checkpoint: bool = False) -> None:
        self._sent.append(reqs)  # the daemon's store checkpoints after its own writes

    async def receive(self) -> list[dict]:
        """The answers to the oldest group sent (applied now, on the store thread)."""
        return await self._node.db(self._writer.apply, self._sent.popleft())

    async def aclose(self) -> None:
        pass


class ProcessWrites:
    """The GroupWriter in a process of its own (``python -m pttd.gateway.writes``, the
    default in gateway mode), fed groups on its stdin and answering them in order on
    its stdout. Started with the gateway; if it ends, the answers it wrote are still
    read, the groups it had not answered are answered 500 (each may or may not be
    stored, as after a crash), and the next write starts a new one."""

    def __init__(self, gw: Gateway):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self._env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        level = logging.getLevelName(logging.getLogger("pttd").getEffectiveLevel())
        self._args = [sys.executable, "-m", "pttd.gateway.writes", gw.store.path, gw.node.cfg.synchronous]
        self._args += [gw.node.id.hex(), str(gw.cfg.event_retention), str(level)]
        self._proc: trio.Process | None = None
        self._generation = 0  # processes started so far
        # groups sent and not yet answered: (the process's generation, None), or
        # (None, why it was not sent)
        self._sent: deque[tuple[int | None, BaseException | None]] = deque()
        self._buf = bytearray()

    async def start(self) -> None:
        if self._proc is not None and self._proc.poll() is not None and not self._sent:
            await self._end()  # it ended with nothing of ours in it (or all read back)
        if self._proc is None:
            self._proc = await trio.lowlevel.open_process(
                self._args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self._env
            )
            self._generation += 1
            log.info("writer process %d started", self._proc.pid)

    def status(self) -> dict:
        running = self._proc is not None and self._proc.returncode is None
        return {"writer_pid": self._proc.pid if running else None, "writer_starts": self._generation}

    async def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            data = await self._proc.stdout.receive_some(1 << 20)
            if not data:
                raise EOFError
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def send(self, reqs: list[dict], finish_checkpoint: bool = False) -> None:
        """Hand a group to the writer process (its answers come from ``receive``, in
        the order the groups were sent); with ``finish_checkpoint``, once it has
        answered the group it copies the rest of the WAL (see Gateway._checkpoints)."""
        try:
            data = pickle.dumps((reqs, finish_checkpoint), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # a request that does not pickle (Gateway._hand_over finds it)
            raise Unsendable(exc) from exc
        if len(data) >= 1 << 32:
            self._sent.append((None, ServerError("a group of writes too large to hand to the writer")))
            return
        try:
            await self.start()
        except OSError as exc:
            self._sent.append((None, ServerError(f"cannot start the writer process: {exc}")))
            return
        if self._proc.poll() is not None:  # it ended; earlier groups' answers are read first
            self._sent.append((None, ServerError("the writer process ended: this write was not stored")))
            return
        try:
            await self._proc.stdin.send_all(len(data).to_bytes(4, "big") + data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self._sent.append((None, ServerError("the writer process ended: this write was not stored")))
            return
        except BaseException:  # cancelled halfway through a frame: the pipe cannot be used again
            await self._end()
            raise
        self._sent.append((self._generation, None))

    async def receive(self) -> list[dict]:
        """The answers to the oldest group sent."""
        generation, error = self._sent.popleft()
        if error is not None:
            raise error
        if generation != self._generation or self._proc is None:
            raise ServerError("the writer process ended before answering: this write may or may not be stored")
        try:
            answer = pickle.loads(await self._read(int.from_bytes(await self._read(4), "big")))
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            code = await self._end()
            raise ServerError(
                f"the writer process ended (exit status {code}; see the log) before answering: "
                "this write may or may not be stored"
            ) from None
        except BaseException:  # cancelled halfway through a frame: the pipe cannot be used again
            await self._end()
            raise
        if "failed" in answer:
            raise ServerError(f"the store could not write: {answer['failed']}")
        return answer["answers"]

    async def _end(self) -> int | None:
        """Close the writer's input and output, wait for it to finish the group it holds
        and exit (killed after WRITER_EXIT_TIMEOUT); its exit status."""
        proc, self._proc = self._proc, None
        self._buf = bytearray()
        if proc is None:
            return None
        with trio.CancelScope(shield=True):
            for pipe in (proc.stdin, proc.stdout):  # a writer blocked on a full pipe gets EPIPE
                try:
                    await pipe.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            with trio.move_on_after(WRITER_EXIT_TIMEOUT):
                await proc.wait()
            if proc.returncode is None:
                log.error("writer process %d did not exit within %g s: killed", proc.pid, WRITER_EXIT_TIMEOUT)
                proc.kill()
                await proc.wait()
        if proc.returncode:
            log.error("writer process %d ended with status %s", proc.pid, proc.returncode)
        return proc.returncode

    async def aclose(self) -> None:
        await self._end()


class Gateway:
    def __init__(self, node, key: GatewayKey | None):
        self.node = node
        self.store = node.store
        self.cfg = node.cfg.gateway
        self.bodies = BodyBudget(self.cfg.bodies_in_memory)
        self.key = key
        self._send, self._recv = trio.open_memory_channel[WriteRequest](self.cfg.group_max * 4)
        self._users: OrderedDict[bytes, ChatUser] = OrderedDict()
        self._streams: dict[bytes, set[Stream]] = {}
        self._by_topic: dict[str, set[Stream]] = {}
        self._hash_limiter = trio.CapacityLimiter(2)  # Argon2id: 64 MiB and ~0.1 s each
        self._dummy_hash: bytes | None = None
        # Key-login challenges are not stored: each carries its expiry and a MAC with a
        # secret of this process, so that no number of requests fills a table; only
        # the nonces used (with a valid signature) are kept until they expire.
        self._challenge_secret = os.urandom(32)
        self._used_challenges: dict[str, float] = {}  # nonce -> expiry (monotonic)
        self._failed_accounts = Failures(self.cfg.login_window, self.cfg.login_failures_per_account)
        self._failed_addresses = Failures(self.cfg.login_window, self.cfg.login_failures_per_address)
        self._new_key_users = Failures(
            self.cfg.login_window, self.cfg.key_accounts_per_address, counted="new users by key login"
        )
        self._nursery: trio.Nursery | None = None
        self._tokens: dict[str, tuple] = {}  # verified token -> (user, expiry, session id, its secret)
        self._revoked: set[str] = set()  # sessions logged out (or revoked) and not yet expired
        self._refresh_locks: dict[str, trio.Lock] = {}
        self._recent_refresh: dict[bytes, tuple] = {}  # spent refresh hash -> (until, answer, new hash)
        self.oidc = Verifier(node.cfg.oidc)
        self._joined: set[bytes] = set()
        self._remote_reads = trio.CapacityLimiter(REMOTE_FILE_READS)
        self._remote_reads_of: dict[bytes, trio.CapacityLimiter] = {}  # per user, while in use
        self._on_demand: OrderedDict[bytes, None] = OrderedDict()  # followed only to read files
        self._moved: set[bytes] = (
            set()
        )  # users exported elsewhere: writes refused  # hosted users the hubs were asked to take in, this run
        # the other modes write only the data directory's own repository here (pttctl)
        in_process = self.cfg.writer == "process" and node.mode == "gateway"
        self._writes = ProcessWrites(self) if in_process else ThreadWrites(self)
        self._wal_copied = False  # a passive checkpoint ran: the writer finishes it after its next group
        self._checkpointer: Checkpointer | None = None  # with a writer process: opened by _checkpoints
        node.others_write = in_process
        self.topic_index = chat.TopicIndex()  # GET /topics/:id reads a page, not the topic
        self.groups = 0  # transactions the writer made (for the bench and status)
        self.writes = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.node.synced_hooks.append(self._on_synced)
        if self.key is not None:
            self._revoked = await self.node.db(self._load_revoked)
            rows = await self.node.db(self.store.query, "SELECT repo FROM gw_moved")
            self._moved = {r for (r,) in rows}
        try:
            await self._serve(task_status)
        finally:
            with trio.CancelScope(shield=True):
                await self._writes.aclose()
                if self._checkpointer is not None:
                    await trio.to_thread.run_sync(self._checkpointer.close)

    async def _serve(self, task_status) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._writer)
            if isinstance(self._writes, ProcessWrites):
                nursery.start_soon(self._checkpoints)
            if self.key is not None:
                nursery.start_soon(self._prune_sessions)
            if self.cfg.replicators and self.key is not None:
                # every start: a pin asked before may have failed, or the replicator is new
                rows = await self.node.db(
                    self.store.query,
                    "SELECT DISTINCT friend FROM gw_friends WHERE friend NOT IN "
                    "(SELECT repo FROM gw_users WHERE repo NOT IN (SELECT repo FROM gw_moved))",
                )
                friends = [f for (f,) in rows if f != self.node.id]
                for rep in self.cfg.replicators:
                    nursery.start_soon(self._ask_pins, rep, friends)
            task_status.started()

    def status(self) -> dict:
        """For ``pttctl status``: where writes are built and how many were."""
        kind = "process" if isinstance(self._writes, ProcessWrites) else "thread"
        return {"writer": kind, **self._writes.status(), "groups": self.groups, "writes": self.writes}

    # --- users ------------------------------------------------------------------------

    def _own_user(self) -> ChatUser:
        repo = self.node.dd.repository()
        return ChatUser("local", repo)

    async def local_user(self) -> ChatUser:
        """The data directory's own repository (for pttctl's chat actions)."""
        u = self._users.get(self.node.id)
        if u is None:
            u = await self.node.db(self._own_user)
            self._remember(u)
        return u

    def _remember(self, u: ChatUser) -> None:
        self._users[u.key] = u
        self._users.move_to_end(u.key)
        while len(self._users) > self.cfg.user_cache:
            self._users.popitem(last=False)

    def _load_user(self, key: bytes) -> ChatUser | None:
        rows = self.store.query("SELECT name, sealed_key FROM gw_users WHERE repo=?", (key,))
        if not rows:
            return None
        name, sealed = rows[0]
        sk = self.key.unseal(sealed) if sealed else None  # none: the user brought their own key
        row = self.store.find_repo(key)
        if row is None:
            if sk is not None:
                raise PttError(f"hosted user {name}: repository {key.hex()} is missing from the store")
            row = self.store.add_repo(key, owned=False)  # followed; nothing synced yet
        return ChatUser(name, Repository(self.store, row, sk))

    async def user(self, key: bytes) -> ChatUser | None:
        u = self._users.get(key)
        if u is not None:
            self._users.move_to_end(key)
            return u
        if key == self.node.id:
            return await self.local_user()
        if self.key is None:
            return None
        u = await self.node.db(self._load_user, key)
        if u is not None:
            self._remember(u)
        return u

    def _create_user(self, name: str, password_hash: str | None, profile_name: str) -> ChatUser:
        return create_users(self.store, self.key, [(name, password_hash, profile_name)])[0]

    def _check_name(self, name, field: str = "data.username") -> str:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise BadInput(field, "must be 1-64 of A-Z a-z 0-9 _ . @ - (not starting with . @ -)")
        return name

    def check_password(self, password, field: str = "data.password") -> bytes:
        if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise BadInput(field, f"must be a string of {MIN_PASSWORD}-{MAX_PASSWORD} characters")
        return password.encode()

    async def _hash(self, password: bytes) -> str:
        async with self._hash_limiter:
            h = await trio.to_thread.run_sync(pwhash.argon2id.str, password)
        return h.decode()

    async def add_user(self, name, password, profile_name: str | None = None) -> ChatUser:
        self._require_key()
        name = self._check_name(name)
        pw = None if password is None else await self._hash(self.check_password(password))
        u = await self.node.db(self._create_user, name, pw, profile_name or name)
        self._remember(u)
        log.info("created hosted user %s, repository %s", name, u.hex)
        return u

    async def set_password(self, name, password, keep_session: str | None = None) -> int:
        """A new password for the local account ``name``. Every login session of the
        user but ``keep_session`` ends (a password is often changed because the old one
        leaked). Returns how many ended."""
        self._require_key()
        name = self._check_name(name, "name")
        pw = await self._hash(self.check_password(password, "password"))
        rows = await self.node.db(self.store.query, "SELECT repo FROM gw_users WHERE name=?", (name,))
        if not rows:
            raise NotFound(f"no user {name!r} on this gateway")
        repo = rows[0][0]
        await self.node.db(self.store.execute, "UPDATE gw_users SET password=? WHERE name=?", (pw, name))
        live = await self.node.db(self.store.query, "SELECT id FROM gw_sessions WHERE user=? AND revoked=0", (repo,))
        ended = [sid for (sid,) in live if sid != keep_session]
        for sid in ended:
            await self.revoke(sid)
        self._failed_accounts.clear(name)
        log.info("password of %s changed; %d of its login sessions ended", name, len(ended))
        return len(ended)

    async def has_password_login(self, u: ChatUser) -> bool:
        """A local account with a password (not a test, key or OpenID Connect login, nor
        one an operator added with --no-password)."""
        if not _NAME.fullmatch(u.name):
            return False
        rows = await self.node.db(self.store.query, "SELECT password IS NOT NULL FROM gw_users WHERE name=?", (u.name,))
        return bool(rows and rows[0][0])

    def _require_key(self) -> None:
        if self.key is None:
            raise Forbidden("this daemon hosts no users (start it with --mode gateway)")

    async def login(self, name, password, client: str | None = None) -> ChatUser:
        """A password login; refused (429) after too many failures for the account or
        the client address within ``login_window``."""
        name = self._check_name(name)
        pw = self.check_password(password)
        self._failed_accounts.check(name, "account")
        if client:
            self._failed_addresses.check(client, "address")
        # Counted as failed before the check, not after: attempts sent at once would all
        # pass the limit while the first were still being checked.
        stamp = self._failed_accounts.add(name)
        at = self._failed_addresses.add(client) if client else None
        try:
            u = await self._login(name, pw)
        except Unauthorized:
            log.info("failed login for %r from %s", name, client or "?")
            raise
        except BaseException:  # not a wrong password (cancelled, a store error)
            self._failed_accounts.forget(name, stamp)
            if client:
                self._failed_addresses.forget(client, at)
            raise
        self._failed_accounts.clear(name)
        if client:
            self._failed_addresses.forget(client, at)
        return u

    async def _login(self, name: str, pw: bytes) -> ChatUser:
        rows = await self.node.db(self.store.query, "SELECT repo, password FROM gw_users WHERE name=?", (name,))
        stored = rows[0][1].encode() if rows and rows[0][1] else None
        if stored is None:
            # the same work as a real check, so that timing does not tell which names exist
            if self._dummy_hash is None:
                self._dummy_hash = (await self._hash(os.urandom(16))).encode()
            stored = self._dummy_hash
        async with self._hash_limiter:
            try:
                ok = await trio.to_thread.run_sync(pwhash.verify, stored, pw)
            except InvalidkeyError:
                ok = False
        if not ok or not rows or not rows[0][1]:
            raise Unauthorized("wrong username or password")
        u = await self.user(rows[0][0])
        if u is None:
            raise Unauthorized("wrong username or password")
        return u

    # --- account moves ------------------------------------------------------------------

    async def export_user(self, name, passphrase, keep: bool = False) -> dict:
        """The account file of hosted user ``name`` (see pttd.gateway.account). Unless
        ``keep``, the user's writes here are refused from now on: the repository moves,
        and two homes signing versions of it would fork it. Its data stays here, served
        to peers, until the operator removes it."""
        self._require_key()
        rows = await self.node.db(
            self.store.query, "SELECT repo, sealed_key, password FROM gw_users WHERE name=?", (name,)
        )
        if not rows:
            raise NotFound(f"no user {name!r} on this gateway")
        repo, sealed, password = rows[0]
        if not sealed:
            raise Conflict(f"user {name!r} brought their own key: this gateway holds no key to export")
        sk = self.key.unseal(sealed)
        was_moved = repo in self._moved
        if not keep:
            # No write after the head recorded in the file: the mark is stored before the
            # head is read, and the writer checks it inside each group's transaction, so
            # a write that was already waiting either is in that head or is refused.
            self._moved.add(repo)
            if not was_moved:
                await self.node.db(
                    self.store.execute,
                    "INSERT OR REPLACE INTO gw_moved(repo, moved) VALUES (?, ?)",
                    (repo, int(time.time())),
                )
        try:
            head = await self.node.db(self._head_seq, repo)
            doc = await trio.to_thread.run_sync(account.seal_account, sk, name, password, passphrase, head)
        except BaseException:
            if not keep and not was_moved:  # nothing exported: the user writes here as before
                with trio.CancelScope(shield=True):
                    await self.node.db(self.store.execute, "DELETE FROM gw_moved WHERE repo=?", (repo,))
                self._moved.discard(repo)
            raise
        if not keep:
            log.info("user %r exported: its writes here are refused from now on", name)
            # no longer hosted: what it writes at its new home reaches its friends here
            # as anyone's does, by following its direct-message envelopes
            if await self.node.db(self.store.query, "SELECT 1 FROM gw_friends WHERE friend=? LIMIT 1", (repo,)):
                await self._follow_gossip(repo)
        return doc

    def _head_seq(self, key: bytes) -> int | None:
        row = self.store.find_repo(key)
        return self.store.head_seq(row) if row is not None else None

    async def import_user(
        self, doc, passphrase, name=None, peers=(), timeout: float = 60.0, keep_name: bool = False
    ) -> ChatUser:
        """Host the account of an account file: its repository is first brought whole
        from the network (its old home, a replicator, anyone found through the hubs), at
        least up to the version the file names, so that the next version signed here
        follows the last one signed there. The login name is the file's only if it is a
        local account's (a file anyone can make could name another login's account, an
        OpenID Connect subject say) or the operator says so (``keep_name``)."""
        self._require_key()
        sk, old_name, password, head = await trio.to_thread.run_sync(account.open_account, doc, passphrase)
        if name is not None:
            name = self._check_name(name, "name")
        elif _NAME.fullmatch(old_name) or (keep_name and 0 < len(old_name) <= 512):
            name = old_name
        else:
            raise Forbidden(
                f"the file names the account {old_name[:100]!r}, which is not a local account's: "
                "give --name for a local name, or --keep-name if you trust the file to name it"
            )
        key = bytes(sk.verify_key)
        taken = await self.node.db(
            self.store.query, "SELECT name, repo FROM gw_users WHERE name=? OR repo=?", (name, key)
        )
        for n, r in taken:
            moved = await self.node.db(self.store.query, "SELECT 1 FROM gw_moved WHERE repo=?", (r,))
            if r == key and moved:
                continue  # coming back: taken in again below
            raise Conflict(f"user {n!r} already exists here" + (" with that repository" if r == key else ""))
        try:
            f = await self.node.sync_once(key, list(peers), timeout)
        except PttError as exc:
            raise PttError(
                f"cannot bring repository {key.hex()} here: {exc}. Give --peer HOST:PORT of its old "
                "gateway (or a replicator of it): taking it in without its history would fork it"
            ) from None
        if f.local_seq is None:
            raise PttError(f"no peer served repository {key.hex()} (give --peer HOST:PORT of its old gateway)")
        if head is not None and f.local_seq < head:
            try:
                f = await self.node.wait_version(key, head, timeout)
            except PttError:
                raise PttError(
                    f"the peers serve repository {key.hex()} up to version {f.local_seq}, the file says "
                    f"{head} was signed: taking it in now would fork it (give --peer of its old gateway)"
                ) from None
        before = self.node.follows.get(key)
        kept = (list(before.prefixes), list(before.peers)) if before is not None and before.persistent else None
        await self.node.unfollow(key)  # hosted from now on: this daemon signs its versions

        def take_in() -> None:
            with self.store.write():
                # the name may have been taken while the repository was brought
                if self.store.query("SELECT 1 FROM gw_users WHERE name=? AND repo!=?", (name, key)):
                    raise Conflict(f"user {name!r} already exists here (made while the repository was brought)")
                self.store.execute("UPDATE repos SET owned=1 WHERE key=?", (key,))
                self.store.execute("DELETE FROM gw_users WHERE repo=?", (key,))
                self.store.execute(
                    "INSERT INTO gw_users(name, repo, sealed_key, password, created) VALUES (?, ?, ?, ?, ?)",
                    (name, key, self.key.seal(sk), password, int(time.time())),
                )
                self.store.execute("DELETE FROM gw_moved WHERE repo=?", (key,))

        try:
            await self.node.db(take_in)
        except Exception:
            if kept is not None:  # followed as before (a friend's envelopes, say)
                await self.node.follow(key, *kept)
            raise
        self._moved.discard(key)
        self._users.pop(key, None)
        u = await self.user(key)
        await self._index_account(u)
        log.info("user %r imported: repository %s at version %d", name, key.hex()[:16], f.local_seq)
        self.node.announce_soon()
        return u

    async def _index_account(self, u: ChatUser) -> None:
        """The gateway's indexes for an account taken in: its topics, its friends (whose
        envelopes it follows) and the direct messages it sent them."""
        topics = await self.read(chat.topics, u.repo)
        friends = [bytes.fromhex(f["key"]) for f in await self.read(chat.sealed_list, u, "/friends/")]

        def index() -> None:
            with self.store.write():
                for t in topics:
                    self.store.execute("INSERT OR IGNORE INTO gw_topics(topic, repo) VALUES (?, ?)", (t, u.key))
                for f in friends:
                    self.store.execute("INSERT OR IGNORE INTO gw_friends(friend, user) VALUES (?, ?)", (f, u.key))
                root = self.store.load_commit(u.repo.row, self.store.head_seq(u.repo.row)).commit.root
                prefix = f"/topics/{GOSSIP}/".encode()
                # A message to a channel is one envelope per member: indexed once, as
                # when it was sent (by its date, channel and content).
                seen: set[tuple] = set()
                for k, ref in tree.iterate(root, prefix, self.store.load_node):
                    raw = ref if isinstance(ref, bytes) else b"".join(u.repo._read_ref(ref))
                    for f in friends:
                        plain = chat.open_envelope(u.repo._key, f, raw, u.key, f)
                        if plain is not None:
                            members = chat.members_blob(plain)
                            channel = plain.get("channel")
                            same = (plain["date"], chat.dumps(channel) if channel else f, chat.dumps(plain["message"]))
                            if same not in seen:
                                seen.add(same)
                                self.store.execute(
                                    "INSERT OR IGNORE INTO gw_dms(user, sender, path, peer, date, members) "
                                    "VALUES (?, ?, ?, ?, ?, ?)",
                                    (u.key, u.key, k.decode(), f, plain["date"], members),
                                )
                            break

        await self.node.db(index)
        for f in friends:
            if not await self.node.db(self.is_hosted, f):
                await self._follow_gossip(f)
            await self._catch_up(f, u)

    # --- OpenID Connect -----------------------------------------------------------------

    async def oidc_login(self, token, client: str | None = None) -> ChatUser:
        """A login with a provider's ``id_token``: its issuer and subject name one hosted
        repository, created at the first login with the token's ``name`` as profile name.
        A refused token is logged with its reason and counts as a failed login."""
        self._require_key()
        at = None
        if client:  # counted before the check, as in login()
            self._failed_addresses.check(client, "address")
            at = self._failed_addresses.add(client)
        try:
            provider, claims = await self.oidc.verify(token)
        except Unauthorized as exc:
            log.warning("OpenID Connect login refused (from %s): %s", client or "?", exc)
            raise
        except BaseException:  # not a refused token (cancelled, the provider unreachable)
            if client:
                self._failed_addresses.forget(client, at)
            raise
        if client:
            self._failed_addresses.forget(client, at)
        profile_name = _display_name(claims)
        u, created = await self._user_named(f"oidc:{provider.issuer} {claims['sub']}", profile_name)
        if created:
            log.info("OpenID Connect: new user %r of %s, repository %s", profile_name, provider.name, u.hex[:16])
        return u

    async def _user_named(self, name: str, profile_name: str) -> tuple[ChatUser, bool]:
        """The hosted user of a login name without a password (a test login, an OpenID
        Connect subject), made with a new repository on first use; (user, made now)."""
        rows = await self.node.db(self.store.query, "SELECT repo FROM gw_users WHERE name=?", (name,))
        if rows:
            u = await self.user(rows[0][0])
            if u is not None:
                return u, False
        self._require_key()
        try:
            u = await self.node.db(self._create_user, name, None, profile_name)
        except Conflict:  # made by a concurrent login
            rows = await self.node.db(self.store.query, "SELECT repo FROM gw_users WHERE name=?", (name,))
            return await self.user(rows[0][0]), False
        self._remember(u)
        return u, True

    # --- bring your own key --------------------------------------------------------------

    def challenge(self, key_hex) -> dict:
        """A fresh single-use nonce for a key login, valid for CHALLENGE_TTL seconds: 16
        random bytes, the expiry (ms of this process's monotonic clock, 8 bytes) and a
        16-byte MAC of the key and both, so that nothing is stored until it is used."""
        key = chat.check_key(key_hex, "key")
        expires = max(0, int((time.monotonic() + CHALLENGE_TTL) * 1000))
        body = os.urandom(16) + expires.to_bytes(8, "big")
        nonce = (body + self._challenge_mac(key, body)).hex()
        return {"nonce": nonce, "sign": self.challenge_message(key, nonce).hex(), "expires_in": CHALLENGE_TTL}

    def _challenge_mac(self, key: bytes, body: bytes) -> bytes:
        return blake3(key + body, key=self._challenge_secret).digest(16)

    def _take_challenge(self, key: bytes, nonce) -> str | None:
        """The nonce, if this process made it for ``key``, unexpired and not yet used."""
        try:
            raw = bytes.fromhex(nonce) if isinstance(nonce, str) and len(nonce) == 80 else b""
        except ValueError:
            raw = b""
        if len(raw) != 40 or not hmac.compare_digest(raw[24:], self._challenge_mac(key, raw[:24])):
            return None
        now = time.monotonic()
        if int.from_bytes(raw[16:24], "big") < now * 1000 or nonce in self._used_challenges:
            return None
        return nonce

    def _spend_challenge(self, nonce: str) -> None:
        now = time.monotonic()
        if len(self._used_challenges) >= MAX_CHALLENGES:
            for n in [n for n, exp in self._used_challenges.items() if exp < now]:
                del self._used_challenges[n]
            if len(self._used_challenges) >= MAX_CHALLENGES:
                raise TooMany("too many key logins under way: try again shortly", 5)
        self._used_challenges[nonce] = int.from_bytes(bytes.fromhex(nonce)[16:24], "big") / 1000

    def challenge_message(self, key: bytes, nonce: str) -> bytes:
        """What the key signs: it names this gateway and the key, so it serves nowhere else."""
        return b"pttd gateway login\n" + self.node.id + key + bytes.fromhex(nonce)

    async def key_login(self, key_hex, nonce, signature, client: str | None = None) -> ChatUser:
        key = chat.check_key(key_hex, "data.key")
        if self._take_challenge(key, nonce) is None:
            raise Unauthorized("unknown, used or expired challenge: ask GET /login/challenge again")
        try:
            VerifyKey(key).verify(self.challenge_message(key, nonce), bytes.fromhex(signature))
        except (BadSignatureError, ValueError, TypeError):
            raise Unauthorized("the signature does not match the key and the challenge") from None
        self._spend_challenge(nonce)  # no await since it was checked: used once only
        u = await self.user(key)
        if u is not None:
            return u
        self._require_key()
        if client is not None:  # each new one is a user and a repository followed: not without end
            self._new_key_users.check(client, "address")
            self._new_key_users.add(client)
        name = f"key:{key.hex()}"
        await self.node.db(
            self.store.execute,
            "INSERT OR IGNORE INTO gw_users(name, repo, sealed_key, password, created) VALUES (?, ?, ?, NULL, ?)",
            (name, key, b"", int(time.time())),
        )
        try:  # the owner runs their own node: this gateway follows the repository whole
            await self.node.follow(key, ["/"], [])
        except PttError as exc:
            log.warning("cannot follow %s: %s", key.hex()[:16], exc)
        log.info("key login of %s, not hosted here before: following it", key.hex()[:16])
        return await self.user(key)

    async def test_login(self, ident) -> ChatUser:
        if not isinstance(ident, str) or not _NAME.fullmatch(ident):
            raise BadInput("data.id", "must be 1-64 of A-Z a-z 0-9 _ . @ -")
        return (await self._user_named(f"test:{ident}", ident))[0]

    async def list_users(self) -> list[dict]:
        rows = await self.node.db(self.store.query, "SELECT name, repo, password IS NOT NULL, created FROM gw_users")
        return [{"name": n, "key": k.hex(), "password": bool(p), "created": c} for n, k, p, c in rows]

    # --- tokens -----------------------------------------------------------------------

    def issue_token(self, u: ChatUser, sid: str | None = None) -> str:
        """A short-lived access token (``token_ttl``), of login session ``sid``."""
        now = int(time.time())
        claims = {"sub": u.hex, "name": u.name, "iat": now, "exp": now + int(self.cfg.token_ttl)}
        if sid is not None:
            claims["sid"] = sid
        kid = self.key.kid(self.key.token_secret)
        return jwt.encode(claims, self.key.token_secret, algorithm="HS256", headers={"kid": kid})

    async def rotate_token_key(self) -> dict:
        """A new token-signing secret; tokens signed before stay valid until they expire."""
        self._require_key()
        keep = self.cfg.token_ttl + 60
        kid = await self.node.db(self.key.rotate_token_secret, self.store, keep)
        log.info("token-signing key rotated: new kid %s, the previous one accepted for %d s more", kid, keep)
        return {"kid": kid, "previous_accepted_for_seconds": int(keep)}

    async def start_session(self, u: ChatUser) -> dict:
        """A login: a session with a refresh token (``refresh_ttl``) and an access token."""
        self.join_hubs(u)
        sid, refresh = os.urandom(16).hex(), os.urandom(32).hex()
        expires = int(time.time() + self.cfg.refresh_ttl)
        await self.node.db(
            self.store.execute,
            "INSERT INTO gw_sessions(id, user, refresh_hash, expires) VALUES (?, ?, ?, ?)",
            (sid, u.key, _hash_token(refresh), expires),
        )
        return {
            "token": self.issue_token(u, sid),
            "refresh_token": f"{sid}.{refresh}",
            "expires_in": int(self.cfg.token_ttl),
        }

    async def refresh(self, refresh_token) -> tuple[ChatUser, dict]:
        """A new access token and a new refresh token for a session; the refresh token
        used is spent, and a spent one used again ends the session (it was copied).
        Except a retry: the same token again within REFRESH_GRACE seconds, while the
        token it was traded for is unused, gets the same answer (the client lost it)."""
        if not isinstance(refresh_token, str) or refresh_token.count(".") != 1:
            raise BadInput("data.refresh_token", "is not a refresh token")
        sid, secret = refresh_token.split(".")
        lock = self._refresh_locks.setdefault(sid, trio.Lock())
        try:
            async with lock:  # one at a time per session: a retry racing its original sees it done
                return await self._refresh(sid, _hash_token(secret))
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._refresh_locks.pop(sid, None)

    async def _refresh(self, sid: str, spent: bytes) -> tuple[ChatUser, dict]:
        rows = await self.node.db(
            self.store.query, "SELECT user, refresh_hash, expires, revoked FROM gw_sessions WHERE id=?", (sid,)
        )
        if not rows or rows[0][3] or rows[0][2] < time.time():
            raise Unauthorized("the session has ended (logged out, expired or revoked): log in again")
        key, stored, _expires, _revoked = rows[0]
        now = time.monotonic()
        for h in [h for h, (until, _, _) in self._recent_refresh.items() if until < now]:
            del self._recent_refresh[h]
        recent = self._recent_refresh.get(spent)
        if recent is not None and recent[2] == stored:
            u = await self.user(key)
            if u is not None:
                log.info("refresh of session %s retried within the grace period: the same answer", sid[:8])
                return u, recent[1]
        if stored != spent:
            await self.revoke(sid)
            log.warning("a spent refresh token was used again: session %s of %s revoked", sid[:8], key.hex()[:16])
            raise Unauthorized("this refresh token was used already: the session is revoked, log in again")
        new = os.urandom(32).hex()
        await self.node.db(
            self.store.execute, "UPDATE gw_sessions SET refresh_hash=? WHERE id=?", (_hash_token(new), sid)
        )
        u = await self.user(key)
        if u is None:
            raise Unauthorized("the session names no user of this gateway")
        answer = {
            "token": self.issue_token(u, sid),
            "refresh_token": f"{sid}.{new}",
            "expires_in": int(self.cfg.token_ttl),
        }
        while len(self._recent_refresh) >= MAX_CHALLENGES:  # the oldest grace goes first
            del self._recent_refresh[next(iter(self._recent_refresh))]
        self._recent_refresh[spent] = (now + REFRESH_GRACE, answer, _hash_token(new))
        return u, answer

    async def revoke(self, sid: str) -> None:
        await self.node.db(self.store.execute, "UPDATE gw_sessions SET revoked=1 WHERE id=?", (sid,))
        self._revoked.add(sid)
        for t in [t for t, v in self._tokens.items() if v[2] == sid]:
            del self._tokens[t]

    def _load_revoked(self) -> set[str]:
        self._drop_ended_sessions()
        return {r[0] for r in self.store.query("SELECT id FROM gw_sessions WHERE revoked=1")}

    def _drop_ended_sessions(self) -> set[str]:
        """Delete the sessions whose every token has expired (an access token made at a
        session's last refresh lives token_ttl past it); their ids."""
        ended = int(time.time() - self.cfg.token_ttl)
        with self.store.write():
            gone = {r[0] for r in self.store.query("SELECT id FROM gw_sessions WHERE expires < ?", (ended,))}
            self.store.execute("DELETE FROM gw_sessions WHERE expires < ?", (ended,))
        return gone

    async def _prune_sessions(self) -> None:
        """Every SESSION_PRUNE_EVERY seconds: the ended sessions go from the store, and
        from the revoked ones held in memory (both grew with every login and logout
        until a restart)."""
        while True:
            await trio.sleep(SESSION_PRUNE_EVERY)
            try:
                self._revoked -= await self.node.db(self._drop_ended_sessions)
            except sqlite3.Error as exc:
                log.warning("removing ended login sessions failed (tried again later): %s", exc)

    async def authenticate(self, token: str | None) -> ChatUser:
        if not token:
            raise Unauthorized("a login token is required (?token= or Authorization: Bearer)")
        if self.key is None:
            raise Unauthorized("this daemon hosts no users")
        now = time.time()
        known = self._tokens.get(token)
        # (a rotation of the signing key ends what it signed, cached or not)
        if known is not None and known[1] > now and known[2] not in self._revoked and self.key.accepts(known[3], now):
            u = await self.user(known[0])
            if u is not None:
                return u
        try:
            secret = self.key.secret_for(jwt.get_unverified_header(token).get("kid"), now)
            if secret is None:
                raise jwt.InvalidTokenError("signed with a key this gateway no longer accepts")
            claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]}, leeway=5)
            key = bytes.fromhex(claims["sub"])
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the login token has expired: log in again") from None
        except (jwt.InvalidTokenError, ValueError, TypeError):
            raise Unauthorized("the login token is not valid") from None
        sid = claims.get("sid")
        if sid is not None and sid in self._revoked:
            raise Unauthorized("this login was logged out: log in again")
        u = await self.user(key)
        if u is None:
            raise Unauthorized("the login token names no user of this gateway")
        # checked once: later calls with it cost a lookup (until it expires)
        if len(self._tokens) >= TOKEN_CACHE:
            self._tokens.clear()
        self._tokens[token] = (key, claims["exp"], sid, secret)
        return u

    def session_of(self, token: str | None) -> str | None:
        try:
            secret = self.key.secret_for(jwt.get_unverified_header(token).get("kid"), time.time())
            if secret is None:  # signed with a key no longer accepted: of no session here
                return None
            claims = jwt.decode(token, secret, algorithms=["HS256"], options={"verify_exp": False})
        except (jwt.PyJWTError, TypeError):
            return None
        sid = claims.get("sid")
        return sid if isinstance(sid, str) else None

    # --- writes -----------------------------------------------------------------------

    async def write(self, user: ChatUser, op: str, *args):
        """Apply the operation ``op`` (of ``writes.OPS``) with ``args`` to the user's
        repository as one commit; its result, once durable (shared with the writes that
        arrived together)."""
        if not user.repo.writable:
            raise Forbidden(
                "this gateway does not hold your repository's key (you logged in with your own key): "
                "write through your own node; reading works here"
            )
        if user.key in self._moved:
            raise Forbidden(
                "this account was exported to another home (pttctl user export): it is written there, "
                "not here, so that its repository does not fork"
            )
        return await self._submit(WriteRequest(user, op, args))

    async def _submit(self, req: WriteRequest):
        try:  # queued at once while there is room: an awaited send costs a scheduler round
            self._send.send_nowait(req)
        except trio.WouldBlock:
            await self._send.send(req)
        await req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    async def _writer(self) -> None:
        """Groups the waiting writes and hands them to the writer; up to
        WRITE_GROUPS_IN_FLIGHT groups at once, so that the next group is already there
        when the writer finishes one (while it waits for its sync to the disk, say)."""
        try:
            await self._writes.start()
        except OSError as exc:  # tried again at the first write
            log.error("cannot start the writer process: %s", exc)
        slots = trio.Semaphore(WRITE_GROUPS_IN_FLIGHT)
        sent_send, sent_recv = trio.open_memory_channel[list[WriteRequest]](WRITE_GROUPS_IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._answer_groups, sent_recv, slots)
            while True:
                first = await self._recv.receive()
                await slots.acquire()
                reqs = [first]
                while len(reqs) < self.cfg.group_max:
                    try:
                        reqs.append(self._recv.receive_nowait())
                    except trio.WouldBlock:
                        break
                if len(reqs) >= SPLIT_MIN and slots.value > 0:
                    # The writer is idle: hand it half now and half as the next group,
                    # so that it builds the second while the first one's answers go
                    # out and their clients' next requests come in.
                    half = len(reqs) // 2
                    await self._hand_over(reqs[:half], sent_send, slots)
                    await slots.acquire()
                    reqs = reqs[half:]
                await self._hand_over(reqs, sent_send, slots)

    async def _hand_over(self, reqs: list[WriteRequest], sent_send: trio.MemorySendChannel, slots) -> None:
        plain = [
            writes.request(r.op, r.args, r.user.key, r.user.repo.row.id, r.user.name, bytes(r.user.repo._key))
            if r.user is not None
            else writes.request(r.op, r.args, None, 0, "", b"")
            for r in reqs
        ]
        finish, self._wal_copied = self._wal_copied, False

        def refuse(refused: list[WriteRequest], exc: BaseException) -> None:
            log.error("%d writes cannot be handed to the writer process: %r", len(refused), exc)
            for r in refused:
                r.error = ServerError(f"this write cannot be handed to the writer: {exc.__class__.__name__}")
                r.done.set()

        try:
            await self._writes.send(plain, finish)
        except Unsendable:
            # Refuse the requests that do not pickle, alone (the others of the group
            # must not pay for them), and hand over the rest; if even they do not go
            # together, none does.
            keep = []
            for r, p in zip(reqs, plain):
                try:
                    pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL)
                    keep.append((r, p))
                except Exception as exc:
                    refuse([r], exc)
            reqs = [r for r, _p in keep]
            if reqs:
                try:
                    await self._writes.send([p for _r, p in keep], finish)
                except Unsendable as exc:
                    refuse(reqs, exc)
                    reqs = []
            if not reqs:
                self._wal_copied = self._wal_copied or finish  # the writer did not see it
                slots.release()
                return
        await sent_send.send(reqs)

    async def _checkpoints(self) -> None:
        """With a writer process: the WAL it grows is copied into the database file here.

        Every CHECKPOINT_EVERY seconds a passive checkpoint copies what the writer has
        committed, beside it, on a connection and a thread of its own: neither the
        writer nor this process's reads wait for it (a few ms per 10 MB of WAL). Under steady
        load that never copies the whole log (the writer commits meanwhile), and SQLite
        starts the log afresh only at a write that finds it all copied: the file would
        grow without end, and appending past a file's end costs each COMMIT's sync a
        journal commit of the file system (a group's COMMIT took 1.6 ms overwriting a
        log and 1.9-4.9 ms growing one, more the larger the file). So the next group
        handed over after a passive checkpoint asks the writer to copy, once it has
        answered that group, the little written meanwhile: then its next write starts
        the log from the beginning, overwriting the same file. Only if the file still
        grows past WAL_CHECKPOINT_BYTES (a reader held the old log at each chance, say)
        does a TRUNCATE checkpoint hold the writer while it copies what is left."""
        limiter = trio.CapacityLimiter(1)
        while True:
            await trio.sleep(CHECKPOINT_EVERY)
            try:
                if self._checkpointer is None:
                    self._checkpointer = await trio.to_thread.run_sync(Checkpointer, self.store.path)
                await trio.to_thread.run_sync(self._checkpointer.checkpoint, "PASSIVE", limiter=limiter)
                self._wal_copied = True
                if self.store.checkpoint_due():
                    await trio.to_thread.run_sync(self._checkpointer.checkpoint, "TRUNCATE", limiter=limiter)
            except sqlite3.Error as exc:
                log.warning("checkpoint failed (tried again in %g s): %s", CHECKPOINT_EVERY, exc)

    async def _answer_groups(self, sent: trio.MemoryReceiveChannel, slots: trio.Semaphore) -> None:
        async for reqs in sent:
            try:
                answers = await self._writes.receive()
            except Exception as exc:  # the transaction failed (disk full, I/O error, a bug): nothing of it is stored
                log.error("a group of %d writes failed, nothing of it stored: %r", len(reqs), exc)
                error = exc if isinstance(exc, ServerError) else ServerError(f"the store could not write: {exc}")
                answers = [{"error": error}] * len(reqs)
            slots.release()
            for r, a in zip(reqs, answers):
                if "error" in a:
                    r.error = a["error"]
                else:
                    r.result, r.committed, r.events, r.follows = a["result"], a["committed"], a["events"], a["follows"]
            self.groups += 1
            self.writes += len(reqs)
            for r in reqs:
                r.done.set()
            try:
                await self._after_group(reqs)
            except Exception:  # the group is stored and answered; what follows must not stop the writer
                log.exception("after a group of %d writes", len(reqs))

    async def _after_group(self, reqs: list[WriteRequest]) -> None:
        changed: dict[bytes, None] = {}
        for r in reqs:
            if r.error is None and r.committed and r.user is not None:
                changed[r.user.key] = None
            if r.error is None:
                self._dispatch(r.events)
                for k in r.follows:  # not in the writer's way
                    self._nursery.start_soon(self._follow_gossip, k)
                    self._nursery.start_soon(self._catch_up, k, r.user)
        for key in changed:
            await self.node.publish(key)

    async def read(self, fn, *args):
        return await self.node.db(fn, *args)

    # --- the chat calls ---------------------------------------------------------------

    def is_hosted(self, key: bytes) -> bool:
        return bool(self.store.query(writes.HOSTED_SQL, (key,)))

    async def post(self, u: ChatUser, topic: str, data):
        return await self.write(u, "post", topic, data)

    async def create_topic(self, u: ChatUser, topic: str):
        return await self.write(u, "create_topic", topic)

    async def edit(self, u: ChatUser, topic: str, post_id: str, data):
        return await self.write(u, "edit", topic, post_id, data)

    async def delete(self, u: ChatUser, topic: str, post_id: str):
        return await self.write(u, "delete", topic, post_id)

    async def add_friend(self, u: ChatUser, data):
        return await self.write(u, "add_friend", data, MAX_FRIENDS)

    async def _follow_gossip(self, key: bytes) -> None:
        """Follow a friend's direct-message envelopes (hosted elsewhere) from any peer,
        and ask the configured replicators to keep the friend's repository (so that the
        envelopes arrive while the friend's gateway is offline)."""
        for rep in self.cfg.replicators:
            self._nursery.start_soon(self._ask_pin, rep, key)
        f = self.node.follows.get(key)
        prefix = f"/topics/{GOSSIP}/"
        if f is not None and f.persistent and any(prefix.startswith(p) for p in f.prefixes):
            return
        prefixes = sorted(set((f.prefixes if f is not None and f.persistent else []) + [prefix]))
        try:
            await self.node.follow(key, prefixes, [])
        except Exception as exc:
            log.warning("cannot follow %s for its direct messages: %s", key.hex()[:16], exc)

    async def _catch_up(self, friend: bytes, u: ChatUser) -> None:
        """A new friend whose envelopes this daemon already holds (another user follows
        them): the ones for ``u`` are delivered now, not only those of later syncs."""
        try:
            root = await self.node.db(self.node._stored_root, friend, None)
        except USER_ERRORS:
            return  # nothing stored yet: the follow's first sync brings them
        try:
            await self._deliver(await self.node.db(self._open_envelopes, friend, None, root, [u]))
        except Exception:
            log.exception("envelopes of %s for %s not taken", friend.hex()[:16], u.name)

    async def _ask_pins(self, replicator: str, keys: list[bytes]) -> None:
        for key in keys:  # one after the other, over one session
            await self._ask_pin(replicator, key)

    async def _ask_pin(self, replicator: str, key: bytes) -> None:
        try:
            await self.node.ask_to_pin(replicator, key)
            log.info("replicator %s keeps %s", replicator, key.hex()[:16])
        except Exception as exc:
            log.warning("replicator %s did not pin %s: %s", replicator, key.hex()[:16], exc)

    async def send_dm(self, u: ChatUser, recipients: list[bytes], msg: dict, channel: dict | None):
        return await self.write(u, "send_dm", recipients, msg, channel)

    def dm_channels(
        self,
        u: ChatUser,
        peer: bytes | None,
        since: int | None,
        before: int | None = None,
        limit: int | None = None,
    ) -> list[dict]:
        """The user's direct-message conversations with their opened messages (``peer``:
        only those with that key: the direct one and channels it is a member of), of
        the messages with ``since <= date <= before``, the newest ``limit``. Envelopes
        are opened newest first and only until ``limit`` are found: a page costs its
        own size, not the user's whole history. With ``peer``, only the envelopes that
        can be of its conversations are opened: its direct messages, and those of
        channels it is a member of (``members``; NULL in rows older than that column,
        which are opened to see)."""
        q = "SELECT sender, path, peer, date FROM gw_dms WHERE user=?"
        params: list = [u.key]
        if peer is not None:
            q += " AND (peer=? OR members IS NULL OR instr(members, ?) > 0)"
            params += [peer, peer]
        if since is not None:
            q += " AND date>=?"
            params.append(since)
        if before is not None:
            q += " AND date<=?"
            params.append(before)
        q += " ORDER BY date DESC, sender DESC, path DESC"
        picked: list[tuple[bytes, dict]] = []
        for sender, path, other, _date in self.store.query(q, params):
            if limit is not None and len(picked) >= limit:
                break
            plain = self._open(u, sender, path, other)
            if plain is None:
                continue
            ch = plain.get("channel")
            if peer is not None and other != peer and (ch is None or peer.hex() not in ch["members"]):
                continue
            picked.append((other, plain))
        convs: dict[str, dict] = {}
        last: dict[str, int] = {}  # each conversation's newest message: its place in the page
        for i, (other, plain) in enumerate(reversed(picked)):  # oldest first
            ch = plain.get("channel")
            ckey = chat.conversation_key(plain, other)
            if ch is not None:
                conv = convs.setdefault(ckey, {"channel": ch, "messages": []})
            else:
                conv = convs.setdefault(ckey, {"key": other.hex(), "messages": []})
            conv["messages"].append(plain)
            last[ckey] = i
        return [convs[k] for k in sorted(convs, key=last.__getitem__, reverse=True)]

    def _open(self, u: ChatUser, sender: bytes, path: str, other: bytes) -> dict | None:
        """An envelope in ``sender``'s repository between ``u`` and ``other``, opened."""
        row = self.store.find_repo(sender)
        if row is None:
            return None
        try:
            raw = Repository(self.store, row, None).value(path)
        except USER_ERRORS:
            return None
        if raw is None:
            return None
        recipient = other if sender == u.key else u.key
        return chat.open_envelope(u.repo._key, other, raw, sender, recipient)

    def info(self) -> dict:
        """What a client (the web page) needs to know before logging in."""
        return {
            "version": __version__,
            "key": self.node.id.hex(),
            "hub": self.cfg.hub_url or None,
            "max_file": self.cfg.max_file,
            "login": {
                "password": self.key is not None,
                "register": bool(self.cfg.registration) and self.key is not None,
                "key": True,
                "test_login": bool(self.cfg.test_login) and self.key is not None,
                "oidc": self.oidc.public() if self.key is not None else [],
            },
        }

    # --- files ------------------------------------------------------------------------

    async def store_file(self, u: ChatUser, content: bytes, name: str, sealed: bool = False) -> dict:
        """A file attached to a message, stored in the user's repository as one value
        (chunked when large, so sync and dedupe apply) at ``/files/<id>``; the id is the
        stored bytes' hash, so the same file twice is stored once and a link never
        changes. ``sealed`` (for a direct message): the bytes stored are the file
        encrypted with a new random key (XSalsa20-Poly1305), answered as ``secret``, to
        travel inside the encrypted message; the repository holds only ciphertext."""
        if not content:
            raise BadInput("body", "is empty: send the file's bytes")
        ctype = chat.sniff_image(content) or "application/octet-stream"
        size = len(content)
        secret = None
        if sealed:
            secret = random(SecretBox.KEY_SIZE)
            content = bytes(SecretBox(secret).encrypt(content))
        fid = blake3(content).hexdigest()[:32]

        await self.write(u, "store_file", fid, content)
        info = {"id": fid, "key": u.hex, "name": name, "size": size, "type": ctype, "url": f"/files/{u.hex}/{fid}"}
        if secret is not None:
            info["secret"] = secret.hex()
        return info

    async def read_file(self, key: bytes, fid: str, who: bytes | None = None) -> bytes:
        """A file of any repository: read here if stored, else fetched from a peer that
        serves it (found through the hubs). At most ``max_file`` bytes; at most
        REMOTE_FILE_READS fetched at once, REMOTE_FILE_READS_PER_USER of them for user
        ``who``; the repositories followed only to fetch files are the ON_DEMAND_FOLLOWS
        used last (a client cannot make the gateway follow and dial keys without end)."""
        path = f"/files/{fid}"
        limit = self.cfg.max_file
        try:
            found = await self.node.db(_read_value, self.store, key, path, None, limit)
        except MissingBlock:
            found = False  # the repository is followed sparsely: the file is elsewhere
        if isinstance(found, bytes):
            return found  # the id is the content's hash: any version that has it will do
        if found is None and await self.node.db(self.is_hosted, key):
            raise NotFound(f"no file {fid} in repository {key.hex()}")
        mine = self._remote_reads_of.get(who) if who is not None else None
        if who is not None and mine is None:
            mine = self._remote_reads_of[who] = trio.CapacityLimiter(REMOTE_FILE_READS_PER_USER)
        try:
            async with mine or contextlib.nullcontext(), self._remote_reads:
                return await self._fetch_file(key, fid, path, limit)
        finally:
            if mine is not None and mine.borrowed_tokens == 0 and mine.statistics().tasks_waiting == 0:
                self._remote_reads_of.pop(who, None)

    async def _fetch_file(self, key: bytes, fid: str, path: str, limit: int) -> bytes:
        # Not hosted here: the copy held (if any) may be older than the link, or sparse.
        f = self.node.follows.get(key)
        if f is None:
            f = await self.node.follow(key, ["/profile.json"], [], persistent=False)
            if f.local_seq is not None:  # held from before: find who serves it now
                await self._find_servers(f)
        if not f.persistent:
            self._on_demand[key] = None
            self._on_demand.move_to_end(key)
            while len(self._on_demand) > ON_DEMAND_FOLLOWS:
                old, _ = self._on_demand.popitem(last=False)
                g = self.node.follows.get(old)
                if g is not None and not g.persistent:
                    await self.node.unfollow(old)
        if f.local_seq is None:
            try:
                f = await self.node.wait_version(key, 0, FILE_FETCH_TIMEOUT)
            except PttError:
                raise NotFound(
                    f"repository {key.hex()} was not found on the network within {FILE_FETCH_TIMEOUT:g} s"
                ) from None
        else:
            try:  # the newest head the peers have (one round trip; a one-off follow is not live)
                f = await self.node.sync_once(key, [], FILE_REFRESH_TIMEOUT)
            except PttError as exc:
                log.info("file %s of %s: no newer head (%s); reading the version held", fid, key.hex()[:16], exc)
        at = f.local_seq
        _, value = await self.node.fetch_path(
            key, path, at, then=lambda: _read_value(self.store, key, path, at, limit), max_value=limit
        )
        if value is None or value is False:
            raise NotFound(f"no file {fid} in repository {key.hex()}")
        return value

    async def _find_servers(self, f) -> None:
        """Dial (a few of) the peers the hubs say serve a repository followed anew."""
        for a in (await self.node.look_up(f.key))[:4]:
            if a in self.node.listen_addresses or a in f.found:
                continue
            f.found.add(a)
            try:
                await self.node.peer_for(a, FILE_REFRESH_TIMEOUT)
            except PttError as exc:
                log.info("file read: %s does not answer: %s", a, exc)

    # --- hubs --------------------------------------------------------------------------

    def join_hubs(self, u: ChatUser) -> None:
        """Ask the hubs of ``[peers] hubs`` to take a hosted user in, so that what they
        post shows in the hubs' combined view: once for each hub and user (recorded), so
        that a user who leaves a hub stays out; one that failed is asked again at the
        user's next login."""
        if not self.node.cfg.hubs or u.key in self._joined or self._nursery is None:
            return
        self._joined.add(u.key)  # looked at once per run
        self._nursery.start_soon(self._join_new_hubs, u)

    async def _join_new_hubs(self, u: ChatUser) -> None:
        rows = await self.node.db(self.store.query, "SELECT hub FROM gw_hub_joins WHERE user=?", (u.key,))
        done = {h for (h,) in rows}
        for hub in self.node.cfg.hubs:
            if hub not in done:
                self._nursery.start_soon(self._join_hub, hub, u)

    async def _join_hub(self, hub: str, u: ChatUser) -> None:
        try:
            await self.node.join_hub(hub, u.key, "")
        except Exception as exc:
            self._joined.discard(u.key)  # asked again at the next login
            log.warning("hub %s did not take in %s: %s", hub, u.name, exc)
            return
        await self.node.db(
            self.store.execute,
            "INSERT OR IGNORE INTO gw_hub_joins(user, hub, joined) VALUES (?, ?, ?)",
            (u.key, hub, int(time.time())),
        )
        log.info("hub %s took in %s (%s)", hub, u.name, u.hex[:16])

    # --- envelopes arriving by sync ---------------------------------------------------

    async def _on_synced(self, key: bytes, old_root: bytes | None, new_root: bytes) -> None:
        users = await self.node.db(self.store.query, "SELECT user FROM gw_friends WHERE friend=?", (key,))
        if not users:
            return
        candidates = [u for u in [await self.user(r[0]) for r in users] if u is not None]
        await self._deliver(await self.node.db(self._open_envelopes, key, old_root, new_root, candidates))

    async def _deliver(self, found: list[tuple]) -> None:
        """Direct messages for hosted users, opened: recorded (and their events numbered)
        by the writer like any write, so that every event reaches the streams in the order
        of its id; a stream resumed with Last-Event-ID then misses none."""
        if found:
            await self._submit(WriteRequest(None, "deliver_dms", (found,)))

    def _open_envelopes(self, sender: bytes, old_root, new_root, candidates: list[ChatUser]) -> list[tuple]:
        """The new envelopes of ``sender`` that ``candidates`` can open: (recipient,
        sender, path, date, message) each."""
        prefix = f"/topics/{GOSSIP}/".encode()
        load = self.store.load_node
        try:
            if old_root is None:
                new = list(tree.iterate(new_root, prefix, load))
            else:  # work in proportion to what changed under the prefix
                new = [(k, v) for k, was, v in tree.diff(old_root, new_root, load, [prefix]) if was is None and v]
        except USER_ERRORS as exc:
            log.info("envelopes of %s not readable yet: %s", sender.hex()[:16], exc)
            return []
        if not new:
            return []
        repo = Repository(self.store, self.store.find_repo(sender), None)
        found = []
        for k, ref in new:
            path = k.decode()
            try:
                raw = ref if isinstance(ref, bytes) else b"".join(repo._read_ref(ref))
            except USER_ERRORS:
                continue
            for u in candidates:
                plain = chat.open_envelope(u.repo._key, sender, raw, sender, u.key)
                if plain is not None:
                    found.append((u.key, sender, path, plain["date"], plain))
        return found

    # --- live streams -----------------------------------------------------------------

    async def open_stream(self, u: ChatUser) -> Stream:
        # Registered before its topics are read: a first post of the user in a topic,
        # dispatched while they are read, adds that topic to it (it was lost for good).
        s = Stream(u, set())
        self._streams.setdefault(u.key, set()).add(s)
        try:
            rows = await self.node.db(self.store.query, "SELECT topic FROM gw_topics WHERE repo=?", (u.key,))
        except BaseException:
            self.close_stream(s)
            raise
        for (t,) in rows:
            if t not in s.topics:
                s.topics.add(t)
                self._by_topic.setdefault(t, set()).add(s)
        return s

    def close_stream(self, s: Stream) -> None:
        _discard(self._streams, s.user.key, s)
        for t in s.topics:
            _discard(self._by_topic, t, s)

    def _dispatch(self, events: list[Event]) -> None:
        for ev in events:
            if ev.kind == "dm":
                for s in list(self._streams.get(ev.user, ())):
                    s.offer(ev)
            elif ev.kind == "post":
                author = bytes.fromhex(ev.body["author"])
                for s in self._streams.get(author, ()):
                    if ev.topic not in s.topics:
                        s.topics.add(ev.topic)
                        self._by_topic.setdefault(ev.topic, set()).add(s)
                for s in list(self._by_topic.get(ev.topic, ())):
                    s.offer(ev)

    def backlog(self, u: ChatUser, after: int) -> tuple[list[Event], bool]:
        """Events for ``u`` after id ``after`` (at most BACKLOG_PAGE: ask again after the
        last); and whether some after ``after`` were already dropped."""
        oldest = self.store.query("SELECT min(id) FROM gw_events")[0][0]
        rows = self.store.query(
            "SELECT id, kind, topic, user, body FROM gw_events WHERE id > ? AND (user = ? OR topic IN "
            "(SELECT topic FROM gw_topics WHERE repo = ?)) ORDER BY id LIMIT ?",
            (after, u.key, u.key, BACKLOG_PAGE),
        )
        lost = oldest is not None and after + 1 < oldest
        return [Event(i, k, t, usr, chat.parse_json(b)) for i, k, t, usr, b in rows], lost

    def last_event_id(self) -> int:
        return self.store.query("SELECT coalesce(max(id), 0) FROM gw_events")[0][0]

    def event_payload(self, u: ChatUser, ev: Event) -> dict | None:
        """What the stream sends for ``ev`` (a dm opened for its recipient)."""
        if ev.kind != "dm":
            return ev.body
        if ev.plain is not None:
            return ev.plain
        sender = bytes.fromhex(ev.body["sender"])
        other = bytes.fromhex(ev.body["peer"]) if "peer" in ev.body else sender  # one the user sent: its recipient
        return self._open(u, sender, ev.body["path"], other)


def create_users(store, key: GatewayKey, users: list[tuple[str, str | None, str]]) -> list[ChatUser]:
    """Hosted users made in one transaction: (login name, password hash or None, profile
    name) each. A new key pair, sealed with the gateway key; the repository's first
    version empty, its second holding /profile.json."""
    made = []
    with store.write() as w:
        for name, password_hash, profile_name in users:
            if store.query("SELECT 1 FROM gw_users WHERE name=?", (name,)):
                raise Conflict(f"user {name!r} already exists")
            sk = SigningKey.generate()
            pub = bytes(sk.verify_key)
            row = store.add_repo(pub, owned=True)
            root = tree.empty_tree(w.emit)
            store.insert_commit(row, sign_commit(Commit(pub, 0, root, None, chat.now_ms()), sk))
            repo = Repository(store, row, sk)
            with repo.batch_in(w) as b:
                b.put("/profile.json", chat.dumps({"name": profile_name}))
            store.execute(
                "INSERT INTO gw_users(name, repo, sealed_key, password, created) VALUES (?, ?, ?, ?, ?)",
                (name, pub, key.seal(sk), password_hash, int(time.time())),
            )
            made.append(ChatUser(name, repo))
    return made


def _display_name(claims: dict) -> str:
    """The profile name of a new OpenID Connect user: the token's ``name``, else the
    email's local part; printable, at most 64 characters."""
    for raw in (claims.get("name"), str(claims.get("email") or "").split("@")[0]):
        if isinstance(raw, str):
            name = "".join(c for c in raw if c.isprintable()).strip()[:64]
            if name:
                return name
    return "user"


def _read_value(store, key: bytes, path: str, version: int | None, limit: int | None = None):
    """The value at ``path`` of a stored repository (None: no such path); False when no
    version of the repository is stored. MissingBlock: the path is not stored here.
    TooLarge: the value is larger than ``limit`` bytes (nothing of it is read)."""
    row = store.find_repo(key)
    if row is None or store.head_seq(row) is None:
        return False
    repo = Repository(store, row, None)
    if limit is not None:
        try:
            size = repo.info(path, version).size
        except NotFound:
            return None
        if size > limit:
            raise TooLarge(f"{path} is {size} bytes, more than this gateway serves ({limit})")
    return repo.value(path, version)


def _discard(index: dict, key, item) -> None:
    """Remove ``item`` from the set at ``index[key]``, and the set once it is empty."""
    group = index.get(key)
    if group is not None:
        group.discard(item)
        if not group:
            del index[key]


def _hash_token(secret: str) -> bytes:
    return blake3(secret.encode(), derive_key_context="pttd gateway refresh tokens v1").digest()
