"""The messages of the wire protocol, sans-IO: dicts in, bytes out, and back.

After the handshake every frame carries one ChaCha20-Poly1305 ciphertext of one
msgpack map. The map's ``"t"`` field names the message type; the other fields are
checked here, strictly, so that the daemon only ever sees well-formed messages.
``decode`` raises ``ProtocolError`` (a FormatError) on anything else, whatever the
bytes. The byte-level description is in docs/protocol.md.

Message types (fields besides ``t``):

=========  ===========================================================================
hello      versions [int], mode str, agent str: the first message each way
sub        repo bin32, prefixes [str], live bool: send me this repository's head
unsub      repo bin32
head       repo bin32, commit bin|nil, sig bin64|nil, blocks [bin]: a signed head
           (nil: "I hold none"), with optional blocks the receiver will likely want
want       id uint, hashes [bin32]: send me these blocks
blocks     id uint, blocks [bin], missing [bin32]: the answer to want or get
get        id uint, repo bin32, path str, root bin32: the nodes from root to path and
           its value block, in one answer (``blocks``)
ping/pong  id uint
error      code str, message str: the sender closes the connection after it
=========  ===========================================================================
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import FormatError
from .hashing import HASH_SIZE
from .paths import MAX_PATH_BYTES

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_HASHES = 4096  # per want
MAX_BLOCKS = 8192  # per blocks message (the frame limit bounds the bytes)
MAX_PREFIXES = 64
MAX_TEXT = 1024
MAX_ID = 2**32 - 1
MAX_ADDRESSES = 16  # per join, found or announce


class ProtocolError(FormatError):
    """A peer sent a message that is not well-formed."""


def encode(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def _bin32(v: Any, field: str) -> bytes:
    if not (isinstance(v, bytes) and len(v) == HASH_SIZE):
        raise ProtocolError(f"field {field!r} must be 32 bytes")
    return v


def _uint(v: Any, field: str) -> int:
    if not (type(v) is int and 0 <= v <= MAX_ID):
        raise ProtocolError(f"field {field!r} must be an integer from 0 to {MAX_ID}")
    return v


def _text(v: Any, field: str, limit: int = MAX_TEXT) -> str:
    if not (isinstance(v, str) and len(v) <= limit):
        raise ProtocolError(f"field {field!r} must be a string of at most {limit} characters")
    return v


def _list(v: Any, field: str, limit: int) -> list:
    if not (isinstance(v, list) and len(v) <= limit):
        raise ProtocolError(f"field {field!r} must be a list of at most {limit} items")
    return v


def _hashes(v: Any, field: str, limit: int = MAX_HASHES) -> list[bytes]:
    return [_bin32(h, field) for h in _list(v, field, limit)]


def _blocks(v: Any) -> list[bytes]:
    out = _list(v, "blocks", MAX_BLOCKS)
    for b in out:
        if not (isinstance(b, bytes) and len(b) >= 1):
            raise ProtocolError("field 'blocks' must hold non-empty byte strings")
    return out


def _prefixes(v: Any) -> list[str]:
    out = []
    for p in _list(v, "prefixes", MAX_PREFIXES):
        p = _text(p, "prefixes", MAX_PATH_BYTES)
        if not p.startswith("/"):
            raise ProtocolError(f"prefix {p!r} does not start with /")
        out.append(p)
    return out


def _check_hello(m: dict) -> None:
    versions = _list(m.get("versions"), "versions", 16)
    if not versions or not all(type(v) is int and 0 < v < 2**16 for v in versions):
        raise ProtocolError("field 'versions' must list protocol versions")
    _text(m.get("mode"), "mode", 32)
    _text(m.get("agent"), "agent", 256)


def _check_sub(m: dict) -> None:
    _bin32(m.get("repo"), "repo")
    _prefixes(m.get("prefixes"))
    if not isinstance(m.get("live"), bool):
        raise ProtocolError("field 'live' must be true or false")


def _check_repo(m: dict) -> None:
    _bin32(m.get("repo"), "repo")


def _check_head(m: dict) -> None:
    _bin32(m.get("repo"), "repo")
    commit, sig = m.get("commit"), m.get("sig")
    if commit is None and sig is None:
        pass
    elif not (isinstance(commit, bytes) and 0 < len(commit) <= 4096 and isinstance(sig, bytes) and len(sig) == 64):
        raise ProtocolError("head: 'commit' must be a commit block and 'sig' a 64-byte signature (or both nil)")
    _blocks(m.get("blocks"))


def _check_want(m: dict) -> None:
    _uint(m.get("id"), "id")
    if not _hashes(m.get("hashes"), "hashes"):
        raise ProtocolError("want: no hashes")


def _check_blocks(m: dict) -> None:
    _uint(m.get("id"), "id")
    _blocks(m.get("blocks"))
    _hashes(m.get("missing"), "missing")


def _check_get(m: dict) -> None:
    _uint(m.get("id"), "id")
    _bin32(m.get("repo"), "repo")
    _bin32(m.get("root"), "root")
    _text(m.get("path"), "path", MAX_PATH_BYTES)


def _check_ping(m: dict) -> None:
    _uint(m.get("id"), "id")


def _addresses(v: Any, field: str) -> list[str]:
    out = _list(v, field, MAX_ADDRESSES)
    for a in out:
        _text(a, field, 255)
    return out


def _ports(v: Any) -> list[int]:
    out = _list(v, "ports", MAX_ADDRESSES)
    if not all(type(p) is int and 0 < p < 65536 for p in out):
        raise ProtocolError("field 'ports' must list TCP ports")
    return out


def _check_join(m: dict) -> None:
    _uint(m.get("id"), "id")
    _bin32(m.get("repo"), "repo")
    _addresses(m.get("addresses"), "addresses")
    _ports(m.get("ports"))
    _text(m.get("token"), "token", 256)


def _check_joined(m: dict) -> None:
    _uint(m.get("id"), "id")
    if not isinstance(m.get("ok"), bool):
        raise ProtocolError("field 'ok' must be true or false")
    _text(m.get("message"), "message")


def _check_lookup(m: dict) -> None:
    _uint(m.get("id"), "id")
    _bin32(m.get("repo"), "repo")


def _check_found(m: dict) -> None:
    _uint(m.get("id"), "id")
    _addresses(m.get("addresses"), "addresses")


def _check_announce(m: dict) -> None:
    for r in _list(m.get("repos"), "repos", MAX_HASHES):
        _bin32(r, "repos")
    _ports(m.get("ports"))


def _check_pin(m: dict) -> None:
    _uint(m.get("id"), "id")
    _bin32(m.get("repo"), "repo")


def _check_error(m: dict) -> None:
    _text(m.get("code"), "code", 64)
    _text(m.get("message"), "message")


FIELDS: dict[str, tuple[frozenset[str], Any]] = {
    "hello": (frozenset({"versions", "mode", "agent"}), _check_hello),
    "sub": (frozenset({"repo", "prefixes", "live"}), _check_sub),
    "unsub": (frozenset({"repo"}), _check_repo),
    "head": (frozenset({"repo", "commit", "sig", "blocks"}), _check_head),
    "want": (frozenset({"id", "hashes"}), _check_want),
    "blocks": (frozenset({"id", "blocks", "missing"}), _check_blocks),
    "get": (frozenset({"id", "repo", "root", "path"}), _check_get),
    "ping": (frozenset({"id"}), _check_ping),
    "pong": (frozenset({"id"}), _check_ping),
    "error": (frozenset({"code", "message"}), _check_error),
    "join": (frozenset({"id", "repo", "addresses", "ports", "token"}), _check_join),
    "joined": (frozenset({"id", "ok", "message"}), _check_joined),
    "lookup": (frozenset({"id", "repo"}), _check_lookup),
    "found": (frozenset({"id", "addresses"}), _check_found),
    "announce": (frozenset({"repos", "ports"}), _check_announce),
    "pin": (frozenset({"id", "repo"}), _check_pin),
}


def decode(payload: bytes) -> dict[str, Any]:
    """Decode and check one message. Unknown fields are ignored (forward compatibility)
    and not kept: a request queued for its answer holds only what it needs, not a
    peer's padding."""
    try:
        msg = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True, max_bin_len=len(payload))
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"message is not valid msgpack ({exc.__class__.__name__})") from None
    if not isinstance(msg, dict):
        raise ProtocolError("message is not a map")
    t = msg.get("t")
    if not isinstance(t, str):
        raise ProtocolError("message has no type: 't' must be a str key with a str value")
    spec = FIELDS.get(t)
    if spec is None:
        raise ProtocolError(f"unknown message type {t[:40]!r}")
    fields, check = spec
    missing = fields - msg.keys()
    if missing:
        raise ProtocolError(f"{t}: missing field {sorted(missing)[0]!r}")
    check(msg)
    return {"t": t, **{k: msg[k] for k in fields}}


def negotiate(ours: tuple[int, ...], theirs: list[int]) -> int | None:
    common = set(ours) & set(theirs)
    return max(common) if common else None
