"""The hub's combined view of the joined repositories' public chat data (sans-IO).

Fed with entries as they are in each repository (``apply(author, path, value or None)``,
from a diff of two versions or from a first read), it keeps, per topic, the messages of
every author with the author's profile name, reactions attached to their message, edits
replacing, deletions removing, and the moderation of the hub's moderators applied (plus,
per reader, that reader's own and their curators'). Each ``apply`` answers what changed
for the live streams, so a new commit costs work in proportion to its diff.

A repository that goes past the limits (topics, messages, message size), or whose
topic files are not the JSON the chat schema says, has those entries skipped with one
log line; nothing it writes can break the view for others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..gateway.chat import BadInput, check_id
from ..jsonvalue import parse_json

log = logging.getLogger("pttd.hub")

GOSSIP = "__gossiping"
MAX_REACTIONS_SHOWN = 200  # per message; the total is given beside when there are more
MAX_NAME = 128  # characters of a profile name shown with each message
FOLDERS = ("reactions", "moderation", "curators")


def entry_kind(path: str) -> str | None:
    """What an entry at ``path`` is to the view: ``profile``, ``message``, ``record``
    (a reaction, moderation or curator record), or None (not read at all)."""
    if path == "/profile.json":
        return "profile"
    parts = path.split("/")
    if len(parts) < 4 or parts[1] != "topics" or parts[2] == GOSSIP:
        return None
    if len(parts) == 4:
        return "message"
    if len(parts) == 5 and parts[3] in FOLDERS:
        return "record"
    return None


class Oversized:
    """A stored value larger than the view takes, given by its size and left unread
    (``apply`` skips it as it would the bytes, without holding them)."""

    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


@dataclass
class Limits:
    max_topics_per_repo: int = 100
    max_messages_per_repo: int = 10_000
    max_message_bytes: int = 16 * 1024


@dataclass
class Changes:
    """What one or more ``apply`` calls changed, for the live streams."""

    messages: dict[tuple[str, str, str], bool] = field(default_factory=dict)  # (topic, author, id) -> still there
    profiles: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.messages or self.profiles)

    def merge(self, other: Changes) -> None:
        self.messages.update(other.messages)
        self.profiles |= other.profiles


@dataclass
class _Repo:
    profile: dict = field(default_factory=dict)
    topics: dict[str, int] = field(default_factory=dict)  # topic -> messages taken from it
    messages: int = 0
    records: int = 0  # reactions, moderation and curator records taken


class View:
    def __init__(self, moderators: set[str] | None = None, limits: Limits | None = None):
        self.moderators = set(moderators or ())
        self.limits = limits or Limits()
        self.repos: dict[str, _Repo] = {}
        # topic -> (author, id) -> the stored post
        self.topics: dict[str, dict[tuple[str, str], dict]] = {}
        # (topic, message id) -> (author, record id) -> reaction record
        self.reactions: dict[tuple[str, str], dict[tuple[str, str], dict]] = {}
        # (topic, message id) -> (moderator, record id) -> moderation record
        self.moderation: dict[tuple[str, str], dict[tuple[str, str], dict]] = {}
        # (topic, author) -> curator keys
        self.curators: dict[tuple[str, str], dict[str, str]] = {}
        # (topic, message id) -> the authors with a message of that id there
        self._authors: dict[tuple[str, str], set[str]] = {}
        # (kind, topic, author, record id) -> the message id it refers to
        self._targets: dict[tuple[str, str, str, str], str] = {}
        self.skipped: dict[str, str] = {}  # author -> the last reason an entry was skipped

    # --- feeding --------------------------------------------------------------------

    def remove_repo(self, author: str) -> Changes:
        """A repository that left: everything it wrote goes."""
        ch = Changes()
        for topic, msgs in self.topics.items():
            for a, mid in [k for k in msgs if k[0] == author]:
                self._drop(topic, a, mid)
                ch.messages[(topic, a, mid)] = False
        for kind, topic, a, rid in [t for t in self._targets if t[2] == author]:
            mid = self._targets.pop((kind, topic, a, rid))
            index = self.reactions if kind == "reactions" else self.moderation
            index.get((topic, mid), {}).pop((a, rid), None)
            self._touch(ch, topic, mid)
        for key in [k for k in self.curators if k[1] == author]:
            del self.curators[key]
        if self.repos.pop(author, None) is not None:
            ch.profiles.add(author)
        return ch

    def apply(self, author: str, path: str, value: bytes | Oversized | None) -> Changes:
        """One entry of ``author``'s repository is now ``value`` (None: removed)."""
        ch = Changes()
        repo = self.repos.setdefault(author, _Repo())
        kind = entry_kind(path)
        if kind == "profile":
            prof = self._json(author, path, value) if value is not None else {}
            repo.profile = prof if isinstance(prof, dict) else {}
            ch.profiles.add(author)
            return ch
        if kind is None:
            return ch
        parts = path.split("/")
        topic = parts[2]
        try:  # a topic the API could not serve (GET /topics/{topic} checks the same)
            check_id(topic, "topic", topic=True)
        except BadInput as exc:
            self._skip(author, f"{path}: {exc}")
            return ch
        if kind == "message":
            self._message(ch, repo, author, topic, parts[3], path, value)
        else:
            self._record(ch, author, topic, parts[3], parts[4], path, value)
        return ch

    def _json(self, author: str, path: str, value: bytes):
        if len(value) > self.limits.max_message_bytes:
            self._skip(author, f"{path}: {len(value)} bytes, more than {self.limits.max_message_bytes}")
            return None
        try:
            return parse_json(value)
        except ValueError:
            self._skip(author, f"{path}: not JSON every client reads back (NaN, Infinity, 1e400, nested too deep)")
            return None

    def _skip(self, author: str, reason: str) -> None:
        if self.skipped.get(author) != reason:
            log.info("hub: skipped from %s: %s", author[:16], reason)
        self.skipped[author] = reason

    def _message(self, ch: Changes, repo: _Repo, author: str, topic: str, mid: str, path: str, value) -> None:
        msgs = self.topics.get(topic)
        had = msgs is not None and (author, mid) in msgs
        if value is None:
            if had:
                self._drop(topic, author, mid)
                self._count(repo, topic, -1)
                ch.messages[(topic, author, mid)] = False
            return
        post = self._json(author, path, value)
        if not _valid_post(post, topic, mid):
            if post is not None:
                self._skip(author, f"{path}: not a message of the chat schema")
            if had:  # what it was replaced by is unusable: the old one goes too
                self._drop(topic, author, mid)
                self._count(repo, topic, -1)
                ch.messages[(topic, author, mid)] = False
            return
        if not had:
            if topic not in repo.topics and len(repo.topics) >= self.limits.max_topics_per_repo:
                self._skip(author, f"more than {self.limits.max_topics_per_repo} topics")
                return
            if repo.messages >= self.limits.max_messages_per_repo:
                self._skip(author, f"more than {self.limits.max_messages_per_repo} messages")
                return
            self._count(repo, topic, +1)
        self.topics.setdefault(topic, {})[(author, mid)] = post
        self._authors.setdefault((topic, mid), set()).add(author)
        ch.messages[(topic, author, mid)] = True

    def _count(self, repo: _Repo, topic: str, n: int) -> None:
        repo.messages += n
        left = repo.topics.get(topic, 0) + n
        if left > 0:
            repo.topics[topic] = left
        else:
            repo.topics.pop(topic, None)

    def _record(self, ch: Changes, author: str, topic: str, kind: str, rid: str, path: str, value) -> None:
        rec = self._json(author, path, value) if value is not None else None
        if isinstance(rec, dict) and kind != "curators" and type(rec.get("date", 0)) is not int:
            self._skip(author, f"{path}: its date is not an integer")  # records are ordered by date
            rec = None
        if isinstance(rec, dict) and kind == "reactions":
            emoji = rec.get("emoji")
            if not (isinstance(emoji, str) and 0 < len(emoji) <= 64):  # as a gateway takes it
                self._skip(author, f"{path}: its emoji is not a text of 1-64 characters")
                rec = None
        if value is not None and not (
            isinstance(rec, dict) and (kind == "curators" or isinstance(rec.get("msgID"), str))
        ):
            if rec is not None:
                self._skip(author, f"{path}: not a {kind} record of the chat schema")
            rec = None
        repo = self.repos[author]
        if kind == "curators":  # counted with the other records: each costs every reader's answer
            cur = self.curators.setdefault((topic, author), {})
            if rec is not None and isinstance(rec.get("key"), str):
                if rid not in cur:
                    if repo.records >= self.limits.max_messages_per_repo:
                        self._skip(
                            author,
                            f"more than {self.limits.max_messages_per_repo} reactions, moderation and curator records",
                        )
                        return
                    repo.records += 1
                cur[rid] = rec["key"]
            elif cur.pop(rid, None) is not None:
                repo.records -= 1
            if not cur:
                del self.curators[(topic, author)]
            return  # changes what a reader sees, not the view: streams recheck per reader
        index = self.reactions if kind == "reactions" else self.moderation
        if rec is not None and (kind, topic, author, rid) not in self._targets:
            if repo.records >= self.limits.max_messages_per_repo:
                self._skip(
                    author, f"more than {self.limits.max_messages_per_repo} reactions, moderation and curator records"
                )
                return
            repo.records += 1
        elif rec is None and (kind, topic, author, rid) in self._targets:
            repo.records -= 1
        old_msg = self._targets.pop((kind, topic, author, rid), None)
        if old_msg is not None:
            recs = index.get((topic, old_msg), {})
            recs.pop((author, rid), None)
            if not recs:
                index.pop((topic, old_msg), None)
            self._touch(ch, topic, old_msg)
        if rec is not None:
            index.setdefault((topic, rec["msgID"]), {})[(author, rid)] = rec
            self._targets[(kind, topic, author, rid)] = rec["msgID"]
            self._touch(ch, topic, rec["msgID"])

    def _touch(self, ch: Changes, topic: str, mid: str) -> None:
        """Every message with id ``mid`` in ``topic`` (of any author) is to be sent again."""
        for a in self._authors.get((topic, mid), ()):
            ch.messages[(topic, a, mid)] = True

    def _drop(self, topic: str, author: str, mid: str) -> None:
        del self.topics[topic][(author, mid)]
        authors = self._authors.get((topic, mid))
        if authors is not None:
            authors.discard(author)
            if not authors:
                del self._authors[(topic, mid)]

    # --- reading --------------------------------------------------------------------

    def name(self, author: str) -> str | None:
        """The author's profile name, as a gateway takes one (at most 128 characters): a
        longer one would be copied into every message of theirs in every answer."""
        repo = self.repos.get(author)
        name = repo.profile.get("name") if repo else None
        return name[:MAX_NAME] if isinstance(name, str) else None

    def trusted(self, topic: str, reader: str | None) -> set[str]:
        """Whose moderation ``reader`` sees in ``topic``: the hub's moderators, the reader,
        and the curators the reader trusts there. Made once per answer, not per message
        (a reader's curator records may be many)."""
        if reader is None:
            return self.moderators
        return self.moderators | {reader} | set(self.curators.get((topic, reader), {}).values())

    def hidden(self, topic: str, author: str, mid: str, reader: str | None = None, trusted: set | None = None) -> bool:
        """Hidden by the hub's moderators, or (for a known reader) by the reader or the
        curators the reader trusts in this topic (``trusted``, if already made)."""
        recs = self.moderation.get((topic, mid))
        if not recs:
            return False
        if trusted is None:
            trusted = self.trusted(topic, reader)
        # the newest trusted record wins; ties broken the same way live and after a
        # restart (one pass: the records of untrusted repositories cost no sort)
        newest = None
        for key, rec in recs.items():
            if key[0] in trusted and rec.get("author", author) == author:
                order = (rec.get("date", 0), key)
                if newest is None or order > newest[0]:
                    newest = (order, rec)
        return newest is not None and newest[1].get("type", "hide") == "hide"

    def render(self, topic: str, author: str, mid: str) -> dict | None:
        post = self.topics.get(topic, {}).get((author, mid))
        if post is None:
            return None
        out = dict(post)
        out.pop("reactions_total", None)  # the hub's to count, not the author's to claim
        out["id"], out["topic"] = mid, topic  # as its path says, whatever the record claims
        out["author"] = author
        out["name"] = self.name(author)
        reactions = []
        for (ra, rid), rec in self.reactions.get((topic, mid), {}).items():
            if rec.get("author", author) == author:
                reactions.append({"id": rid, "author": ra, "emoji": rec.get("emoji")})
        reactions.sort(key=lambda r: (r["author"], r["id"]))
        out["reactions"] = reactions[:MAX_REACTIONS_SHOWN]
        if len(reactions) > MAX_REACTIONS_SHOWN:
            out["reactions_total"] = len(reactions)
        return out

    def messages(
        self, topic: str, reader: str | None = None, since=None, before=None, limit: int | None = None
    ) -> list[dict]:
        trusted = self.trusted(topic, reader)
        picked = []
        for (author, mid), post in self.topics.get(topic, {}).items():
            date = post["date"]
            if (since is not None and date < since) or (before is not None and date > before):
                continue
            if self.hidden(topic, author, mid, trusted=trusted):
                continue
            picked.append((date, author, mid))
        picked.sort()
        if limit is not None:  # only the messages answered are drawn
            picked = picked[-limit:] if limit > 0 else []
        return [self.render(topic, author, mid) for _, author, mid in picked]

    def topic_list(self) -> list[dict]:
        out = []
        for topic, msgs in self.topics.items():
            if msgs:
                last = max(p["date"] for p in msgs.values())
                out.append({"id": topic, "messages": len(msgs), "last": last})
        return sorted(out, key=lambda t: -t["last"])

    def profiles(self, authors=None) -> dict[str, dict]:
        keys = self.repos if authors is None else authors
        return {a: dict(self.repos[a].profile) for a in keys if a in self.repos}


MAX_DATE = 8_640_000_000_000_000  # ms: the last date a browser's Date can hold


def _date(value) -> bool:
    return type(value) is int and 0 <= value <= MAX_DATE


def _valid_post(post, topic: str, mid: str) -> bool:
    if not isinstance(post, dict):
        return False
    msg = post.get("message")
    return (
        _date(post.get("date"))
        and ("edited" not in post or _date(post["edited"]))  # a reader draws both as dates
        and isinstance(msg, dict)
        and isinstance(msg.get("type"), str)
        and "value" in msg
        and post.get("id", mid) == mid
        and post.get("topic", topic) == topic
    )
