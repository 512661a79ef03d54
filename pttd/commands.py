"""Command handlers behind ``pttctl``: plain data in, plain data out.

Each handler takes an open DataDir and keyword arguments and returns a Result: a
JSON-ready ``data`` dict and, for commands that produce a value, a byte ``stream``.
How a handler is reached (directly on a data directory, or later through a running
daemon's control endpoint) and how its result is shown are not its concern.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from protocol.commit import SignedCommit

from .datadir import DataDir
from .errors import NotFound, PttError
from .repo import collect_garbage, verify_store


@dataclass
class Result:
    data: dict = field(default_factory=dict)
    stream: Iterator[bytes] | None = None
    ok: bool = True  # False: the command ran but found a problem (exit status 1)


def commit_info(sc: SignedCommit) -> dict:
    c = sc.commit
    return {
        "version": c.seq,
        "commit": sc.address.hex(),
        "root": c.root.hex(),
        "prev": c.prev.hex() if c.prev else None,
        "time": c.time,
        "time_iso": _dt.datetime.fromtimestamp(c.time / 1000, _dt.UTC).isoformat(timespec="milliseconds"),
    }


def init(path: str) -> Result:
    dd = DataDir.init(path)
    try:
        return Result({"data_dir": dd.path, "repository": dd.default_repo_id()})
    finally:
        dd.close()


def repo_id(dd: DataDir, repo: str | None = None) -> Result:
    r = dd.repository(repo)
    return Result({"repository": r.id, "writable": r.writable, "version": r.head().seq})


def put(dd: DataDir, path: str, *, value: bytes | None = None, filename: str | None = None) -> Result:
    r = dd.repository()
    with r.batch() as b:
        if filename is not None:
            b.put_file(path, filename)
        else:
            b.put(path, value if value is not None else b"")
    head = b.commit or r.head()
    return Result({"path": path, "changed": b.commit is not None, **commit_info(head)})


def get(dd: DataDir, path: str, *, version: int | None = None, repo: str | None = None) -> Result:
    r = dd.repository(repo)
    seq = r.commit_at(version).seq  # one version for the size and the bytes, whatever is written meanwhile
    try:
        info = r.info(path, seq)
    except NotFound:
        if version is not None:
            raise
        raise NotFound(f"no such path: {path}") from None  # the newest version: not named
    return Result({"path": path, "size": info.size, "version": seq}, stream=r.read(path, seq))


def rm(dd: DataDir, path: str) -> Result:
    r = dd.repository()
    sc = r.delete(path)
    return Result({"path": path, **commit_info(sc)})


def ls(dd: DataDir, prefix: str = "/", *, version: int | None = None, repo: str | None = None) -> Result:
    r = dd.repository(repo)
    sc = r.commit_at(version)
    entries = [asdict(e) for e in r.list(prefix, sc.seq)]
    return Result({"version": sc.seq, "prefix": prefix, "entries": entries})


def log(dd: DataDir, *, limit: int | None = None, repo: str | None = None) -> Result:
    r = dd.repository(repo)
    return Result({"repository": r.id, "versions": [commit_info(sc) for sc in r.history(limit)]})


def diff(dd: DataDir, v1: int, v2: int, *, repo: str | None = None) -> Result:
    r = dd.repository(repo)
    changes = [asdict(c) for c in r.diff(v1, v2)]
    return Result({"from": v1, "to": v2, "changes": changes})


def verify(dd: DataDir) -> Result:
    rep = verify_store(dd.store)
    data = asdict(rep)
    data["ok"] = rep.ok
    return Result(data, ok=rep.ok)


def gc(dd: DataDir, *, keep: int | None = None) -> Result:
    if keep is not None and keep < 1:
        raise PttError("--keep must be at least 1 (the newest version is always kept)")
    rep = collect_garbage(dd.store, keep)
    return Result(asdict(rep))
