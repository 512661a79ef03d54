"""The chat application's schema over a user's repository (MISSION.md).

Paths: ``/profile.json``; ``/topics/{topic}/{messageID}``; ``/topics/{topic}/moderation/{id}``,
``/reactions/{id}``, ``/curators/{id}``; ``/topics/__gossiping/{id}`` (direct-message
envelopes, ``crypto_box`` from the sender to one recipient); ``/friends/{id}`` and
``/pchannels/{id}`` (sealed to the owner's own key). Values are compact JSON.

Everything a client sends is checked here: ids from a bounded set of characters, keys as
64 hex digits, values of bounded size and shape. A check that fails raises ``BadInput``
naming the field; nothing is written.
"""

from __future__ import annotations

import base64
import os
import re
import threading
import time
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from dataclasses import dataclass

from blake3 import blake3
from msgpack import ExtType
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

from protocol import tree

from .. import jsonvalue
from ..errors import Conflict, MissingBlock, NotFound, PttError
from ..jsonvalue import parse_json
from ..keys import is_public_key
from ..repo import Batch, Repository

ID_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}"
_ID = re.compile(ID_PATTERN)
_TYPE = re.compile(r"[a-z][a-z0-9_\-]{0,31}")
_KEY_HEX = re.compile(r"[0-9a-f]{64}")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f]")  # all below space but tab and newline
GOSSIP = "__gossiping"
# names inside a topic that are folders, not messages
RESERVED_IDS = frozenset({"moderation", "reactions", "curators"})
MAX_VALUE = 64 * 1024  # one message, reaction, profile ... as JSON
MAX_RECIPIENTS = 64


class BadInput(PttError):
    """A request whose content is refused (HTTP 400), naming the field."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def __reduce__(self):  # rebuilt from its parts (it crosses from the writer process)
        return (BadInput, (self.field, self.problem))


@dataclass
class ChatUser:
    """A repository this daemon can write: its key pair and row."""

    name: str
    repo: Repository

    @property
    def key(self) -> bytes:
        return self.repo.key

    @property
    def hex(self) -> str:
        return self.repo.id


IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def sniff_image(content: bytes) -> str | None:
    """The type of an image a browser may show inline, from its first bytes (never from
    what the uploader claims: an "image" that is HTML or SVG could run a script)."""
    for magic, ctype in IMAGE_MAGIC:
        if content.startswith(magic):
            return ctype
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return "image/webp"
    return None


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    """Sortable by time, unique without coordination: ``<ms>-<8 hex>``."""
    return f"{now_ms():013d}-{os.urandom(4).hex()}"


def dumps(obj) -> bytes:
    return jsonvalue.dumps(obj, sort_keys=True)


def loads(raw: bytes, what: str):
    try:
        return parse_json(raw)
    except ValueError:
        raise PttError(f"{what} is not JSON") from None


# --- checks ---------------------------------------------------------------------------


def check_id(value, field: str, *, topic: bool = False) -> str:
    if not isinstance(value, str):
        raise BadInput(field, "must be a string")
    if not _ID.fullmatch(value) or ".." in value:
        raise BadInput(
            field, f"must be 1-64 of A-Z a-z 0-9 _ . - (not starting with . and without ..), not {value!r:.80}"
        )
    if topic and value == GOSSIP:
        raise BadInput(field, f"{GOSSIP} is reserved for direct messages")
    if not topic and value in RESERVED_IDS:
        raise BadInput(field, f"{value!r} is reserved")
    return value


def check_key(value, field: str) -> bytes:
    if not isinstance(value, str) or len(value) != 64:
        raise BadInput(field, "must be a repository key: 64 hex digits")
    try:
        key = bytes.fromhex(value)
    except ValueError:
        raise BadInput(field, "must be a repository key: 64 hex digits") from None
    if not is_public_key(key):
        raise BadInput(field, "is not a valid Ed25519 public key")
    return key


def check_text(value, field: str, max_len: int = 256) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadInput(field, "must be a non-empty string")
    if len(value.encode()) > max_len:
        raise BadInput(field, f"must be at most {max_len} bytes")
    if _CONTROL_CHARS.search(value):
        raise BadInput(field, "must not contain control characters")
    return value


def check_size(obj, field: str) -> bytes:
    raw = dumps(obj)
    if len(raw) > MAX_VALUE:
        raise BadInput(field, f"is {len(raw)} bytes as JSON, at most {MAX_VALUE}")
    return raw


def check_message(data, field: str = "data") -> dict:
    """A message body: ``"text"``, ``{"type", "value"}`` or ``{"message": one of those}``."""
    if isinstance(data, dict) and "message" in data:
        data, field = data["message"], f"{field}.message"
    if isinstance(data, str):
        check_text(data, field, MAX_VALUE // 2)
        return {"type": "text", "value": data}
    if not isinstance(data, dict):
        raise BadInput(field, 'must be a text or {"type": ..., "value": ...}')
    mtype = data.get("type", "text")
    if not isinstance(mtype, str) or not _TYPE.fullmatch(mtype):
        raise BadInput(f"{field}.type", "must be a lowercase word such as text, action or file")
    if "value" not in data:
        raise BadInput(f"{field}.value", "is missing")
    value = data["value"]
    if not isinstance(value, (str, dict, list, int, float)) or isinstance(value, bool):
        raise BadInput(f"{field}.value", "must be a string, number, object or list")
    if isinstance(value, str) and mtype == "text":
        check_text(value, f"{field}.value", MAX_VALUE // 2)
    msg = {"type": mtype, "value": value}
    check_size(msg, field)
    return msg


def data_object(data, field: str = "data") -> dict:
    if not isinstance(data, dict):
        raise BadInput(field, "must be an object")
    return data


# --- sealing to oneself and boxes between users ---------------------------------------


def x25519(sk: SigningKey) -> PrivateKey:
    return sk.to_curve25519_private_key()


def x25519_public(key: bytes) -> PublicKey:
    return VerifyKey(key).to_curve25519_public_key()


def seal_to_self(sk: SigningKey, obj) -> dict:
    """Encrypted so that only the holder of ``sk`` can read it (a sealed box to its own key)."""
    cipher = SealedBox(sk.verify_key.to_curve25519_public_key()).encrypt(dumps(obj))
    return {"cipher": base64.b64encode(cipher).decode()}


def open_sealed(sk: SigningKey | None, stored: bytes, what: str):
    if sk is None:
        raise PttError(f"{what} cannot be opened here: this gateway does not hold the repository's key")
    try:
        env = loads(stored, what)
        cipher = base64.b64decode(env["cipher"], validate=True)
        return parse_json(SealedBox(x25519(sk)).decrypt(cipher))
    except (KeyError, TypeError, ValueError, CryptoError):
        raise PttError(f"{what} cannot be opened with this repository's key") from None


def private_id(sk: SigningKey, what: bytes) -> str:
    """An id that does not reveal ``what`` (a friend's key) to readers of the public tree."""
    return blake3(what, key=blake3(bytes(sk) + b"pttd friend ids").digest()).hexdigest()[:32]


def make_envelope(sk: SigningKey, recipient: bytes, plain: dict) -> dict:
    box = Box(x25519(sk), x25519_public(recipient))
    sealed = box.encrypt(dumps(plain))
    return {
        "id": plain["id"],
        "nonce": base64.b64encode(sealed.nonce).decode(),
        "cipher": base64.b64encode(sealed.ciphertext).decode(),
    }


def open_envelope(sk: SigningKey | None, other: bytes, raw: bytes, sender: bytes, recipient: bytes) -> dict | None:
    """The plaintext of an envelope between the holder of ``sk`` and ``other`` (either
    direction), or None when it was not made for that pair or does not say truthfully
    who sent it to whom (``sender``: whose repository holds it; ``recipient``). None
    too without ``sk`` (a user who logged in with their own key)."""
    if sk is None:
        return None
    try:
        env = parse_json(raw)
        nonce = base64.b64decode(env["nonce"], validate=True)
        cipher = base64.b64decode(env["cipher"], validate=True)
        plain = parse_json(Box(x25519(sk), x25519_public(other)).decrypt(cipher, nonce))
    except (KeyError, TypeError, ValueError, CryptoError):
        return None
    return plain if _well_formed_dm(plain, sender.hex(), recipient.hex()) else None


def _well_formed_dm(plain, sender: str, recipient: str) -> bool:
    """Everything a client will be shown is of the shape the gateway makes: a friend's
    hand-made envelope must not break a reader's conversation list."""
    if not isinstance(plain, dict) or plain.get("from") != sender or plain.get("to") != recipient:
        return False
    pid, date = plain.get("id"), plain.get("date")
    # a date a browser's Date can hold (8.64e15 ms; more threw in the reader's drawing)
    if not isinstance(pid, str) or not _ID.fullmatch(pid) or type(date) is not int or not 0 <= date <= 8.64e15:
        return False
    try:
        plain["message"] = check_message(plain.get("message"), "message")
    except BadInput:
        return False
    ch = plain.get("channel")
    if ch is None:
        return True
    if not isinstance(ch, dict) or not isinstance(ch.get("id"), str) or not _ID.fullmatch(ch["id"]):
        return False
    name = ch.get("name")
    if not isinstance(name, str) or len(name.encode()) > 128:
        return False
    members = ch.get("members")
    if not isinstance(members, list) or len(members) > MAX_RECIPIENTS + 1:
        return False
    if not all(isinstance(m, str) and len(m) == 64 and all(c in "0123456789abcdef" for c in m) for m in members):
        return False
    # a channel message names its members, the sender and this recipient among them
    return len(set(members)) == len(members) and sender in members and recipient in members


def members_blob(plain: dict) -> bytes | None:
    """What ``gw_dms.members`` holds for an opened message: its channel's member keys
    end to end (32 bytes each), b"" for a message to one key, None when its channel's
    members are not a list of keys (then a listing by key opens it to see)."""
    ch = plain.get("channel")
    if ch is None:
        return b""
    members = ch.get("members") if isinstance(ch, dict) else None
    if not isinstance(members, list) or not all(isinstance(m, str) and _KEY_HEX.fullmatch(m) for m in members):
        return None
    return b"".join(bytes.fromhex(m) for m in members)


def conversation_key(plain: dict, other: bytes) -> str:
    ch = plain.get("channel")
    if ch is not None:
        return "channel:" + ch["id"] + ":" + ",".join(sorted(ch["members"]))
    return "key:" + other.hex()


# --- reads ----------------------------------------------------------------------------


def topics(repo: Repository) -> list[str]:
    """The topics the repository holds anything under, in path order: one step down the
    tree per topic, skipping each topic's entries (not a walk over every message)."""
    root = repo.head().commit.root
    load = repo.store.load_node
    seen: dict[str, None] = {}
    top = b"/topics/"
    at = top
    while (entry := tree.seek(root, at, load)) is not None and entry[0].startswith(top):
        key = entry[0]
        name, slash, _rest = key[len(top) :].partition(b"/")
        if name.decode() != GOSSIP:
            seen[name.decode()] = None
        # past every key under this topic (no path holds the byte 0xff); a key that is
        # the topic's own path is passed alone, as keys such as /topics/a-b/... sort
        # between /topics/a and /topics/a/...
        at = top + name + b"/\xff" if slash else key + b"\x00"
    return list(seen)


def _message_order(raw: bytes) -> tuple | None:
    """(date, id) of a stored message, by which a topic's messages are ordered; None for
    a value that is no message of ours (written by another client: skipped, not fatal)."""
    try:
        post = parse_json(raw)
        date = post["date"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(date, (int, float)):
        return None
    return date, str(post.get("id"))


@dataclass
class _Topic:
    root: bytes  # the tree the entries are of
    entries: list  # (date, id, key, value reference), sorted
    dates: list  # entries' dates, for bisection


class TopicIndex:
    """The messages of each recently read topic of a repository, ordered by (date, id)
    without their bodies, for the tree they were read from. A later read of the same
    topic brings the index up to the new head by a diff of the topic's prefix (work
    proportional to the change), and reads only the messages it returns: a page of a
    long topic costs its own size, not the topic's. Bounded by ``max_entries`` in all
    (least recently read topics dropped first; about 400 bytes an entry, so 40 MB at the
    default); a topic longer than that is read whole each time."""

    def __init__(self, max_entries: int = 100_000):
        self.max_entries = max_entries
        self._topics: OrderedDict[tuple[bytes, str], _Topic] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def messages(
        self, repo: Repository, topic: str, since: int | None, before: int | None, limit: int | None
    ) -> list[dict]:
        """Messages with ``since <= date <= before`` (inclusive: a page boundary never
        loses a post with the same date), the newest ``limit`` of them, oldest first."""
        root = repo.head().commit.root
        with self._lock:
            t = self._current(repo, topic, root)
        lo = 0 if since is None else bisect_left(t.dates, since)
        hi = len(t.dates) if before is None else bisect_right(t.dates, before)
        if limit is not None:
            lo = max(lo, hi - limit)
        return [parse_json(repo.read_ref(e[3])) for e in t.entries[lo:hi]]

    def _current(self, repo: Repository, topic: str, root: bytes) -> _Topic:
        name = (repo.key, topic)
        t = self._topics.pop(name, None)
        if t is not None:
            self._size -= len(t.entries)
        prefix = f"/topics/{topic}/".encode()
        load = repo.store.load_node
        found = None  # key -> an entry kept, or a reference to read (None: removed)
        if t is not None and t.root != root:
            found = {e[2]: e for e in t.entries}
            try:
                for k, _old, new in tree.diff(t.root, root, load, prefixes=[prefix]):
                    if b"/" not in k[len(prefix) :]:
                        found[k] = new
            except MissingBlock:  # the old version was pruned and collected since: read afresh
                t = None
        if t is None:
            found = {k: ref for k, ref in tree.iterate(root, prefix, load) if b"/" not in k[len(prefix) :]}
        if found is not None:
            entries = []
            for k, item in found.items():
                if item is None:
                    continue  # removed
                if isinstance(item, tuple) and not isinstance(item, ExtType):
                    entries.append(item)  # unchanged since the last read
                    continue
                order = _message_order(repo.read_ref(item))
                if order is not None:
                    entries.append((*order, k, item))
            entries.sort(key=lambda e: e[:3])  # ties in (date, id): in path order
            t = _Topic(root, entries, [e[0] for e in entries])
        if len(t.entries) <= self.max_entries:
            self._topics[name] = t
            self._size += len(t.entries)
            while self._size > self.max_entries:
                _, old = self._topics.popitem(last=False)
                self._size -= len(old.entries)
        return t


def folder(repo: Repository, topic: str, kind: str) -> list[dict]:
    out = []
    for _path, raw in repo.items(f"/topics/{topic}/{kind}/"):
        try:
            out.append(parse_json(raw))
        except ValueError:
            continue
    return out


def profile(repo: Repository | Batch, default_name: str) -> dict:
    """The profile as stored (a Repository) or as a commit being made leaves it (a Batch)."""
    raw = repo.value("/profile.json")
    if raw is None:
        return {"name": default_name}
    prof = loads(raw, "/profile.json")
    return prof if isinstance(prof, dict) else {"name": default_name}


def sealed_list(user: ChatUser, prefix: str) -> list[dict]:
    sk = user.repo._key
    out = []
    for path, raw in user.repo.items(prefix):
        try:
            out.append(open_sealed(sk, raw, path))
        except PttError:
            continue
    return out


# --- writes (inside a batch) ----------------------------------------------------------


def create_topic(b: Batch, topic: str) -> dict:
    post = {
        "id": new_id(),
        "topic": topic,
        "date": now_ms(),
        "message": {"type": "action", "value": f"created topic {topic}"},
    }
    b.put(f"/topics/{topic}/{post['id']}", dumps(post))
    return post


def post_message(b: Batch, topic: str, data) -> dict:
    msg = check_message(data)
    post_id = new_id()
    if isinstance(data, dict) and "id" in data:
        post_id = check_id(data["id"], "data.id")
        if b.exists(f"/topics/{topic}/{post_id}"):
            raise Conflict(f"post {post_id} already exists in topic {topic} (edit it with PUT)")
    post = {"id": post_id, "topic": topic, "date": now_ms(), "message": msg}
    b.put(f"/topics/{topic}/{post_id}", dumps(post))
    return post


def edit_message(b: Batch, topic: str, post_id: str, data) -> dict:
    path = f"/topics/{topic}/{post_id}"
    raw = b.value(path)
    if raw is None:
        raise NotFound(f"no post {post_id} in topic {topic}")
    old = loads(raw, path)
    msg = check_message(data)
    post = {"id": post_id, "topic": topic, "date": old.get("date", now_ms()), "edited": now_ms(), "message": msg}
    b.put(path, dumps(post))
    return post


def delete_message(b: Batch, topic: str, post_id: str) -> dict:
    path = f"/topics/{topic}/{post_id}"
    if not b.exists(path):
        raise NotFound(f"no post {post_id} in topic {topic}")
    b.delete(path)
    return {"id": post_id, "topic": topic, "deleted": True}


def delete_record(b: Batch, topic: str, kind: str, record_id: str) -> dict:
    """Take back one of the user's records of a topic (a reaction, a moderation, a curator)."""
    path = f"/topics/{topic}/{kind}/{record_id}"
    if not b.exists(path):
        raise NotFound(f"no {kind} record {record_id} in topic {topic}")
    b.delete(path)
    return {"id": record_id, "topic": topic, "deleted": True}


def add_curator(b: Batch, topic: str, data) -> dict:
    data = data_object(data)
    key = check_key(data.get("key"), "data.key")
    rec = {"id": key.hex(), "key": key.hex(), "topic": topic, "date": now_ms()}
    b.put(f"/topics/{topic}/curators/{rec['id']}", dumps(rec))
    return rec


def add_moderation(b: Batch, topic: str, data) -> dict:
    data = data_object(data)
    msg_id = check_id(data.get("msgID"), "data.msgID")
    action = data.get("type", "hide")
    if action not in ("hide", "show"):
        raise BadInput("data.type", "must be hide or show")
    return _message_record(b, topic, "moderation", msg_id, data, {"type": action})


def add_reaction(b: Batch, topic: str, data) -> dict:
    data = data_object(data)
    msg_id = check_id(data.get("msgID"), "data.msgID")
    emoji = check_text(data.get("emoji"), "data.emoji", 64)
    return _message_record(b, topic, "reactions", msg_id, data, {"emoji": emoji})


def _message_record(b: Batch, topic: str, kind: str, msg_id: str, data: dict, fields: dict) -> dict:
    """A record of ``kind`` about message ``msg_id`` of the topic (optionally naming its
    ``author``), stored at ``/topics/{topic}/{kind}/{id}``."""
    rec = {"id": new_id(), "msgID": msg_id, "topic": topic, **fields, "date": now_ms()}
    if "author" in data:
        rec["author"] = check_key(data["author"], "data.author").hex()
    b.put(f"/topics/{topic}/{kind}/{rec['id']}", dumps(rec))
    return rec


def set_profile(b: Batch, old: dict, data) -> dict:
    data = data_object(data)
    prof = dict(old)
    for k, v in data.items():
        if not isinstance(k, str) or not k or len(k) > 64:
            raise BadInput("data", "profile keys must be strings of 1-64 characters")
        if v is None:
            if k == "name":
                raise BadInput("data.name", "cannot be removed (a profile always has a name)")
            prof.pop(k, None)
        elif isinstance(v, (str, int, float, bool)):
            prof[k] = v
        else:
            raise BadInput(f"data.{k}", "must be a string, number or boolean (or null to remove it)")
    if "name" in prof:
        check_text(prof["name"], "data.name", 128)
    check_size(prof, "data")
    b.put("/profile.json", dumps(prof))
    return prof


def add_friend(b: Batch, sk: SigningKey, data) -> dict:
    if isinstance(data, str):
        data = {"key": data}
    data = data_object(data)
    key = check_key(data.get("key"), "data.key")
    if key == bytes(sk.verify_key):
        raise BadInput("data.key", "is your own key")
    rec = {"key": key.hex()}
    if "name" in data:
        rec["name"] = check_text(data["name"], "data.name", 128)
    rec["id"] = private_id(sk, key)
    rec["date"] = now_ms()
    b.put(f"/friends/{rec['id']}", dumps(seal_to_self(sk, rec)))
    return rec


def add_pchannel(b: Batch, sk: SigningKey, data) -> dict:
    data = data_object(data)
    members = check_members(data.get("members"), "data.members", sk)
    name = check_text(data.get("name", "channel"), "data.name", 128)
    cid = check_id(data["id"], "data.id") if "id" in data else new_id()
    own = bytes(sk.verify_key).hex()
    rec = {
        "id": cid,
        "name": name,
        "type": data.get("type", "group"),
        "members": sorted([own] + [m.hex() for m in members]),
    }
    if rec["type"] not in ("group", "dm"):
        raise BadInput("data.type", "must be group or dm")
    b.put(f"/pchannels/{cid}", dumps(seal_to_self(sk, rec)))
    return rec


def check_members(value, field: str, sk: SigningKey) -> list[bytes]:
    if not isinstance(value, list) or not value:
        raise BadInput(field, "must be a non-empty list of repository keys")
    if len(value) > MAX_RECIPIENTS:
        raise BadInput(field, f"at most {MAX_RECIPIENTS} members")
    own = bytes(sk.verify_key)
    out: dict[bytes, None] = {}
    for i, v in enumerate(value):
        k = check_key(v, f"{field}[{i}]")
        if k != own:
            out[k] = None
    if not out:
        raise BadInput(field, "must name someone besides you")
    return list(out)


def send_envelopes(b: Batch, sk: SigningKey, recipients: list[bytes], msg: dict, channel: dict | None) -> list[tuple]:
    """One envelope per recipient under ``/topics/__gossiping/``; [(recipient, path, plain)]."""
    out = []
    date = now_ms()
    sender = bytes(sk.verify_key).hex()
    for r in recipients:
        plain = {"id": new_id(), "from": sender, "to": r.hex(), "date": date, "message": msg}
        if channel is not None:
            plain["channel"] = channel
        env = make_envelope(sk, r, plain)
        path = f"/topics/{GOSSIP}/{plain['id']}"
        b.put(path, dumps(env))
        out.append((r, path, plain))
    return out
