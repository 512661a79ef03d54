"""The gateway's HTTP API: an ASGI app (Starlette), served by pttd.gateway.server (httptools on trio).

Every route is declared once with ``@route``: method, path, what it reads and answers;
the same declarations route the requests and make the OpenAPI description served at
``/openapi.json``, so the two cannot drift apart.

Shapes (those of the earlier system's clients): a token as ``?token=`` or
``Authorization: Bearer``; request bodies ``{"data": ...}``; answers ``{"result": ...}``,
or ``{"error": "..."}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import quote

import trio
from nacl.exceptions import CryptoError
from nacl.secret import SecretBox
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__, jsonvalue
from ..errors import Forbidden, NotFound, Unauthorized
from ..web import AsgiEndpoint, FastApp, answer, make_app, not_allowed, read_bytes
from . import chat
from .chat import BadInput, ChatUser
from .service import BACKLOG_PAGE, Gateway
from .static import WebClient

log = logging.getLogger("pttd.http")

KEEPALIVE = 15.0  # seconds between comment lines on a quiet event stream
MAX_LIMIT = 10_000
MAX_INT = 2**53  # dates and ids in JSON: what every client's numbers hold exactly


# --- schemas for the OpenAPI description -------------------------------------------------

KEY = {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "a repository key: 64 hex digits"}
ID = {"type": "string", "pattern": "^" + chat.ID_PATTERN + "$", "maxLength": 64}
MESSAGE = {
    "type": "object",
    "required": ["type", "value"],
    "properties": {"type": {"type": "string"}, "value": {}},
}
MESSAGE_IN = {
    "oneOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "object",
            "required": ["value"],
            "properties": {"type": {"type": "string", "description": "default text"}, "value": {}},
        },
        {"type": "object", "required": ["message"], "properties": {"message": {}, "id": ID}},
    ]
}
POST = {
    "type": "object",
    "required": ["id", "topic", "date", "message"],
    "properties": {
        "id": {"type": "string"},
        "topic": {"type": "string"},
        "date": {"type": "integer"},
        "edited": {"type": "integer"},
        "message": MESSAGE,
    },
}
DELETED = {
    "type": "object",
    "required": ["id", "topic", "deleted"],
    "properties": {"id": {"type": "string"}, "topic": {"type": "string"}, "deleted": {"type": "boolean"}},
}
LOGIN = {
    "type": "object",
    "required": ["key", "token", "refresh_token", "expires_in"],
    "properties": {
        "key": KEY,
        "token": {"type": "string"},
        "refresh_token": {"type": "string"},
        "expires_in": {"type": "integer"},
    },
}
KEY_LOGIN = {
    "type": "object",
    "required": ["key", "nonce", "signature"],
    "properties": {"key": KEY, "nonce": {"type": "string"}, "signature": {"type": "string"}},
}
ID_TOKEN_LOGIN = {
    "type": "object",
    "required": ["id_token"],
    "properties": {
        "id_token": {
            "oneOf": [
                {"type": "string", "description": "a JWT of a configured provider"},
                {"type": "object", "required": ["id_token"], "properties": {"id_token": {"type": "string"}}},
            ]
        },
        "friend": KEY,
    },
}
CREDENTIALS = {
    "type": "object",
    "required": ["username", "password"],
    "properties": {
        "username": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}$"},
        "password": {"type": "string", "minLength": 8, "maxLength": 1024},
        "friend": KEY,
    },
}
RECORD = {"type": "object", "description": "a stored record (curator, moderation, reaction)"}
FRIEND = {
    "type": "object",
    "required": ["id", "key"],
    "properties": {"id": {"type": "string"}, "key": KEY, "name": {"type": "string"}, "date": {"type": "integer"}},
}
PCHANNEL = {
    "type": "object",
    "required": ["id", "name", "type", "members"],
    "properties": {
        "id": {"type": "string"},
        "name": {"type": "string"},
        "type": {"type": "string", "enum": ["group", "dm"]},
        "members": {"type": "array", "items": KEY},
    },
}
DM = {
    "type": "object",
    "required": ["id", "from", "to", "date", "message"],
    "properties": {
        "id": {"type": "string"},
        "from": KEY,
        "to": KEY,
        "date": {"type": "integer"},
        "message": MESSAGE,
        "channel": PCHANNEL,
    },
}
CONVERSATION = {
    "type": "object",
    "required": ["messages"],
    "properties": {"key": KEY, "channel": PCHANNEL, "messages": {"type": "array", "items": DM}},
}
PROFILE = {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}}
PROFILE_IN = {
    "type": "object",
    "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
    "description": "keys given replace, a null removes one",
}
TOPIC_PARAM = {"name": "topic", "in": "path", "required": True, "schema": ID}
POST_PARAM = {"name": "post", "in": "path", "required": True, "schema": ID}


def _list(item) -> dict:
    return {"type": "array", "items": item}


# --- routes ------------------------------------------------------------------------


@dataclass
class Op:
    method: str
    path: str
    handler: Callable[..., Awaitable]
    summary: str
    result: dict | None
    body: dict | None = None
    auth: bool = True
    query: list[dict] = field(default_factory=list)
    stream: bool = False
    raw: bool = False  # the body is the bytes themselves (a file), not JSON {"data": ...}
    answers: str = "application/json"  # what a 200 carries
    errors: tuple[str, ...] = ()  # statuses besides those every call of its kind may answer


OPS: list[Op] = []


def route(method: str, path: str, summary: str, result: dict | None, **kw):
    def deco(fn):
        OPS.append(Op(method, path, fn, summary, result, **kw))
        return fn

    return deco


_INT = re.compile(r"-?[0-9]{1,19}")


def _int_of(raw: str) -> int | None:
    """An integer written plainly (ASCII digits, an optional minus), else None: Python's
    int() also takes "1_000", spaces around and other scripts' digits."""
    return int(raw) if _INT.fullmatch(raw) else None


def _int_param(request: Request, name: str, low: int = 0, high: int = MAX_INT) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    n = _int_of(raw)
    if n is None:
        raise BadInput(name, f"must be an integer, not {raw!r:.40}")
    if not low <= n <= high:
        raise BadInput(name, f"must be between {low} and {high}")
    return n


@route(
    "POST",
    "/login",
    "Log in: a local account, a key (signature of a challenge), or an OpenID Connect id_token",
    LOGIN,
    body={"oneOf": [CREDENTIALS, KEY_LOGIN, ID_TOKEN_LOGIN]},
    auth=False,
    errors=("401", "429"),
)
async def login(gw: Gateway, request: Request, data, user):
    data = chat.data_object(data)
    _check_friend(data)
    client = request.client.host if request.client else None
    if "id_token" in data:
        token = data["id_token"]
        if isinstance(token, dict) and "id_token" in token:  # the earlier client's shape
            token = token["id_token"]
        u = await gw.oidc_login(token, client)
        return await _logged_in(gw, u, data)
    if "signature" in data:  # bring your own key
        u = await gw.key_login(data.get("key"), data.get("nonce"), data.get("signature"), client)
        return await _logged_in(gw, u, data)
    u = await gw.login(data.get("username"), data.get("password"), client)
    return await _logged_in(gw, u, data)


def _check_friend(data: dict) -> None:
    """A login's ``friend``, checked before the login (a first login makes the user)."""
    if "friend" in data:
        chat.check_key(data["friend"], "data.friend")


async def _logged_in(gw: Gateway, u: ChatUser, data: dict) -> dict:
    if "friend" in data:
        if bytes.fromhex(data["friend"]) == u.key:
            raise BadInput("data.friend", "is your own key")
        await gw.add_friend(u, {"key": data["friend"]})
    return {"key": u.hex, **await gw.start_session(u)}


@route(
    "GET",
    "/login/challenge",
    "A single-use nonce to sign for a key login (bring your own key)",
    {
        "type": "object",
        "required": ["nonce", "sign", "expires_in"],
        "properties": {"nonce": {"type": "string"}, "sign": {"type": "string"}, "expires_in": {"type": "integer"}},
    },
    auth=False,
    query=[{"name": "key", "in": "query", "required": True, "schema": KEY}],
    errors=("429",),
)
async def login_challenge(gw: Gateway, request: Request, data, user):
    return gw.challenge(request.query_params.get("key"))


@route("POST", "/register", "Create a local account (when registration is open)", LOGIN, body=CREDENTIALS, auth=False)
async def register(gw: Gateway, request: Request, data, user):
    if not gw.cfg.registration:
        raise Forbidden("registration is closed on this gateway (an operator adds users: pttctl user add)")
    data = chat.data_object(data)
    gw.check_password(data.get("password"))  # everything checked before the account is made
    if "friend" in data:
        chat.check_key(data["friend"], "data.friend")
    u = await gw.add_user(data.get("username"), data.get("password"))
    return await _logged_in(gw, u, data)


@route(
    "POST",
    "/test-login",
    "Log in by a bare id (development only; off unless enabled)",
    LOGIN,
    body={
        "type": "object",
        "required": ["id"],
        "properties": {"id": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}$"}, "friend": KEY},
    },
    auth=False,
)
async def test_login(gw: Gateway, request: Request, data, user):
    if not gw.cfg.test_login:
        raise NotFound("POST /test-login is not enabled on this gateway")
    data = chat.data_object(data)
    _check_friend(data)
    u = await gw.test_login(data.get("id"))
    return await _logged_in(gw, u, data)


@route(
    "POST",
    "/refresh",
    "A new access token (and refresh token) for a login session; the refresh token used is spent",
    LOGIN,
    body={"type": "object", "required": ["refresh_token"], "properties": {"refresh_token": {"type": "string"}}},
    auth=False,
    errors=("401",),
)
async def refresh(gw: Gateway, request: Request, data, user):
    data = chat.data_object(data)
    u, tokens = await gw.refresh(data.get("refresh_token"))
    return {"key": u.hex, **tokens}


@route("POST", "/logout", "End this login session: its tokens stop working", {"type": "boolean"})
async def logout(gw: Gateway, request: Request, data, user: ChatUser):
    sid = gw.session_of(_token(request))
    if sid is None:
        raise BadInput("token", "belongs to no login session (a token made by an operator tool)")
    await gw.revoke(sid)
    return True


@route(
    "POST",
    "/password",
    "Change the password of a local account; the user's other login sessions end",
    {"type": "object", "required": ["sessions_ended"], "properties": {"sessions_ended": {"type": "integer"}}},
    body={
        "type": "object",
        "required": ["password", "new_password"],
        "properties": {
            "password": {"type": "string", "description": "the current one"},
            "new_password": {"type": "string", "minLength": 8, "maxLength": 1024},
        },
    },
    errors=("429",),
)
async def change_password(gw: Gateway, request: Request, data, user: ChatUser):
    data = chat.data_object(data)
    if not await gw.has_password_login(user):
        raise Forbidden(
            "this account logs in without a password (a test, key or OpenID Connect login, or one added "
            "with --no-password): an operator sets one with pttctl user passwd"
        )
    gw.check_password(data.get("new_password"), "data.new_password")
    client = request.client.host if request.client else None
    try:  # checked as a login is (and counted with failed logins), but answered 403:
        # the request's token is good, and a 401 would make clients renew it
        if (await gw.login(user.name, data.get("password"), client)).key != user.key:
            raise Unauthorized("wrong password")
    except Unauthorized:
        raise Forbidden("the current password is wrong") from None
    ended = await gw.set_password(user.name, data["new_password"], keep_session=gw.session_of(_token(request)))
    return {"sessions_ended": ended}


@route("GET", "/me", "The user's repository key", KEY)
async def me(gw: Gateway, request: Request, data, user: ChatUser):
    return user.hex


@route("GET", "/topics", "Topics the user posted to", _list({"type": "string"}))
async def list_topics(gw: Gateway, request: Request, data, user: ChatUser):
    return await gw.read(chat.topics, user.repo)


@route(
    "POST",
    "/topics",
    "Create a topic (its first message is an action: created topic)",
    {"type": "object", "required": ["id", "post"], "properties": {"id": {"type": "string"}, "post": POST}},
    body={"oneOf": [ID, {"type": "object", "minProperties": 1, "properties": {"name": ID, "id": ID, "topic": ID}}]},
)
async def create_topic(gw: Gateway, request: Request, data, user: ChatUser):
    if isinstance(data, dict):
        given = [(f, data[f]) for f in ("name", "id", "topic") if f in data]
        if not given:
            raise BadInput("data.name", "is missing")
        for f, value in given:  # each name given must be valid; the first is used
            chat.check_id(value, f"data.{f}", topic=True)
        name = given[0][1]
    else:
        name = data
    topic = chat.check_id(name, "data", topic=True)
    return await gw.create_topic(user, topic)


# the paging parameters of GET /topics/{topic} and GET /dm
PAGE_QUERY = [
    {
        "name": "since",
        "in": "query",
        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_INT},
        "description": "date >= since (ms)",
    },
    {
        "name": "before",
        "in": "query",
        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_INT},
        "description": "date <= before (ms)",
    },
    {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
        "description": "at most this many messages, the newest",
    },
]


def _page(request: Request) -> tuple[int | None, int | None, int | None]:
    """since, before and limit (PAGE_QUERY), checked."""
    return _int_param(request, "since"), _int_param(request, "before"), _int_param(request, "limit", 1, MAX_LIMIT)


@route("GET", "/topics/{topic}", "Messages of a topic, oldest first", _list(POST), query=PAGE_QUERY)
async def read_topic(gw: Gateway, request: Request, data, user: ChatUser, topic: str):
    return await gw.read(gw.topic_index.messages, user.repo, topic, *_page(request))


@route("POST", "/topics/{topic}", "Post a message", POST, body=MESSAGE_IN)
async def post_message(gw: Gateway, request: Request, data, user: ChatUser, topic: str):
    return await gw.post(user, topic, data)


@route("GET", "/topics/{topic}/{post}", "One message", POST)
async def read_post(gw: Gateway, request: Request, data, user: ChatUser, topic: str, post: str):
    raw = await gw.read(user.repo.value, f"/topics/{topic}/{post}")
    if raw is None:
        raise NotFound(f"no post {post} in topic {topic}")
    return chat.parse_json(raw)


@route("PUT", "/topics/{topic}/{post}", "Edit a message (it must exist)", POST, body=MESSAGE_IN)
async def edit_message(gw: Gateway, request: Request, data, user: ChatUser, topic: str, post: str):
    return await gw.edit(user, topic, post, data)


@route("DELETE", "/topics/{topic}/{post}", "Delete a message", DELETED)
async def delete_message(gw: Gateway, request: Request, data, user: ChatUser, topic: str, post: str):
    return await gw.delete(user, topic, post)


def _folder_routes(kind: str, body: dict) -> None:  # written by writes.FOLDER_WRITERS[kind]
    async def read(gw: Gateway, request: Request, data, user: ChatUser, topic: str):
        return await gw.read(chat.folder, user.repo, topic, kind)

    async def write(gw: Gateway, request: Request, data, user: ChatUser, topic: str):
        return await gw.write(user, "folder_add", kind, topic, data)

    async def delete(gw: Gateway, request: Request, data, user: ChatUser, topic: str, record: str):
        record = chat.check_id(record, "record")
        return await gw.write(user, "folder_delete", kind, topic, record)

    route("GET", f"/topics/{{topic}}/{kind}", f"The user's {kind} of a topic", _list(RECORD))(read)
    route("POST", f"/topics/{{topic}}/{kind}", f"Add to the {kind} of a topic", RECORD, body=body)(write)
    route("DELETE", f"/topics/{{topic}}/{kind}/{{record}}", f"Take back one of the user's {kind}", DELETED)(delete)


_folder_routes("curators", {"type": "object", "required": ["key"], "properties": {"key": KEY}})
_folder_routes(
    "moderation",
    {
        "type": "object",
        "required": ["msgID"],
        "properties": {"msgID": ID, "type": {"type": "string", "enum": ["hide", "show"]}, "author": KEY},
    },
)
_folder_routes(
    "reactions",
    {
        "type": "object",
        "required": ["msgID", "emoji"],
        "properties": {"msgID": ID, "emoji": {"type": "string", "minLength": 1}, "author": KEY},
    },
)


@route("GET", "/friends", "The user's friends (stored sealed to the user's key)", _list(FRIEND))
async def list_friends(gw: Gateway, request: Request, data, user: ChatUser):
    _own_key(user, "friends")
    return await gw.read(chat.sealed_list, user, "/friends/")


@route(
    "POST",
    "/friends",
    "Add a friend by key",
    FRIEND,
    body={
        "oneOf": [KEY, {"type": "object", "required": ["key"], "properties": {"key": KEY, "name": {"type": "string"}}}]
    },
)
async def add_friend(gw: Gateway, request: Request, data, user: ChatUser):
    return await gw.add_friend(user, data)


DM_IN = {
    "type": "object",
    "required": ["key", "message"],
    "properties": {"key": KEY, "message": MESSAGE_IN},
}


@route("POST", "/dm", "Send an encrypted direct message to one key", DM, body=DM_IN)
async def send_dm(gw: Gateway, request: Request, data, user: ChatUser):
    data = chat.data_object(data)
    key = chat.check_key(data.get("key"), "data.key")
    if key == user.key:
        raise BadInput("data.key", "is your own key")
    if "message" not in data:
        raise BadInput("data.message", "is missing")
    msg = chat.check_message(data["message"], "data.message")
    return (await gw.send_dm(user, [key], msg, None))[0]


@route(
    "GET",
    "/dm",
    "The user's direct-message conversations, messages opened, newest conversation first",
    _list(CONVERSATION),
    query=[{"name": "key", "in": "query", "schema": KEY, "description": "only the conversation with this key"}]
    + PAGE_QUERY,
)
async def list_dms(gw: Gateway, request: Request, data, user: ChatUser):
    _own_key(user, "direct messages")
    peer = request.query_params.get("key")
    key = chat.check_key(peer, "key") if peer is not None else None
    return await gw.read(gw.dm_channels, user, key, *_page(request))


DMS_IN = {
    "type": "object",
    "required": ["members", "message"],
    "properties": {
        "members": {"type": "array", "items": KEY, "minItems": 1},
        "message": MESSAGE_IN,
        "channel": ID,
        "name": {"type": "string"},
    },
}


@route("POST", "/dms", "Send an encrypted message to several keys (a private channel)", _list(DM), body=DMS_IN)
async def send_dms(gw: Gateway, request: Request, data, user: ChatUser):
    data = chat.data_object(data)
    members = chat.check_members(data.get("members"), "data.members", _own_key(user, "direct messages"))
    if "message" not in data:
        raise BadInput("data.message", "is missing")
    msg = chat.check_message(data["message"], "data.message")
    cid = chat.check_id(data["channel"], "data.channel") if "channel" in data else chat.new_id()
    name = chat.check_text(data.get("name", "channel"), "data.name", 128)
    channel = {"id": cid, "name": name, "type": "group", "members": sorted([user.hex] + [m.hex() for m in members])}
    return await gw.send_dm(user, members, msg, channel)


@route("GET", "/pchannels", "The user's private channels (stored sealed to the user's key)", _list(PCHANNEL))
async def list_pchannels(gw: Gateway, request: Request, data, user: ChatUser):
    _own_key(user, "private channels")
    return await gw.read(chat.sealed_list, user, "/pchannels/")


@route(
    "POST",
    "/pchannels",
    "Create a private channel",
    PCHANNEL,
    body={
        "type": "object",
        "required": ["members"],
        "properties": {
            "members": {"type": "array", "items": KEY},
            "name": {"type": "string"},
            "id": ID,
            "type": {"type": "string", "enum": ["group", "dm"]},
        },
    },
)
async def add_pchannel(gw: Gateway, request: Request, data, user: ChatUser):
    return await gw.write(user, "add_pchannel", data)


@route("GET", "/profile", "The user's profile", PROFILE)
async def get_profile(gw: Gateway, request: Request, data, user: ChatUser):
    return await gw.read(chat.profile, user.repo, user.name)


@route("POST", "/profile", "Update the profile (keys given replace, null removes)", PROFILE, body=PROFILE_IN)
async def set_profile(gw: Gateway, request: Request, data, user: ChatUser):
    return await gw.write(user, "set_profile", data)


@route(
    "GET",
    "/events",
    "Live events as Server-Sent Events: dm (a direct message arrived), post (in a topic of the user's)",
    None,
    stream=True,
    query=[{"name": "lastEventId", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": MAX_INT}}],
)
async def events(gw: Gateway, request: Request, data, user: ChatUser):
    raw = request.headers.get("last-event-id") or request.query_params.get("lastEventId")
    after = None
    if raw is not None and (raw or "lastEventId" in request.query_params):
        after = _int_of(raw)
        if after is None or not 0 <= after <= MAX_INT:
            raise BadInput("Last-Event-ID", f"must be an integer between 0 and {MAX_INT}")
    stream = await gw.open_stream(user)
    ahead = False
    try:
        newest = await gw.read(gw.last_event_id)
        if after is None:
            after = newest
        elif after > newest:
            # an id this gateway never gave, or gave before its events were lost (a
            # store restored from a backup): events would be skipped until the ids
            # caught up with it. Start from the newest, and tell the client to reload.
            after, ahead = newest, True
        backlog, lost = await gw.read(gw.backlog, user, after)
    except BaseException:
        gw.close_stream(stream)
        raise

    async def body():
        try:
            # where the stream starts: a client that reconnects before any event comes
            # resumes from here (an event with an id and no data sets EventSource's
            # lastEventId without being dispatched)
            yield f"retry: 1000\nid: {after}\n\n"
            if lost:
                yield _sse(None, "reset", {"reason": "events after your Last-Event-ID were dropped: reload"})
            if ahead:
                yield _sse(None, "reset", {"reason": "your Last-Event-ID is ahead of this gateway's events: reload"})
            last = after
            page = backlog
            while True:
                for ev in page:
                    payload = await gw.read(gw.event_payload, user, ev) if ev.kind == "dm" else ev.body
                    if payload is not None:
                        yield _sse(ev.id, ev.kind, payload)
                    last = ev.id
                if len(page) < BACKLOG_PAGE:
                    break
                page, _ = await gw.read(gw.backlog, user, last)
            while True:
                with trio.move_on_after(KEEPALIVE) as idle:
                    try:
                        ev = await stream.receive.receive()
                    except trio.EndOfChannel:
                        return  # too far behind: the client reconnects with its Last-Event-ID
                if idle.cancelled_caught:
                    yield ": keepalive\n\n"
                    continue
                if ev.id <= last:
                    continue
                payload = gw.event_payload(user, ev) if ev.plain is not None or ev.kind != "dm" else None
                if payload is None:
                    payload = await gw.read(gw.event_payload, user, ev)
                if payload is not None:
                    yield _sse(ev.id, ev.kind, payload)
                last = ev.id
        finally:
            gw.close_stream(stream)

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )


def _sse(eid: int | None, kind: str, payload) -> str:
    head = f"id: {eid}\n" if eid is not None else ""
    return f"{head}event: {kind}\ndata: {jsonvalue.dumps(payload).decode()}\n\n"


FILE = {
    "type": "object",
    "required": ["id", "key", "name", "size", "type", "url"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "key": KEY,
        "name": {"type": "string"},
        "size": {"type": "integer"},
        "type": {
            "type": "string",
            "description": "image/png, image/jpeg, image/gif, image/webp or application/octet-stream",
        },
        "url": {"type": "string"},
        "secret": {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "the key of a sealed file"},
    },
}
FILE_ID = re.compile(r"[0-9a-f]{32}")
SECRET = re.compile(r"[0-9a-f]{64}")


@route(
    "POST",
    "/files",
    "Store a file (the body's bytes) in the user's repository, to attach to a message",
    FILE,
    body={"type": "string", "format": "binary"},
    raw=True,
    query=[
        {"name": "name", "in": "query", "schema": {"type": "string", "maxLength": 255}, "description": "file name"},
        {
            "name": "sealed",
            "in": "query",
            "schema": {"type": "string", "enum": ["0", "1", "true", "false"]},
            "description": "encrypt it with a new key, answered as secret (for a direct message)",
        },
    ],
)
async def upload_file(gw: Gateway, request: Request, data: bytes, user: ChatUser):
    name = chat.check_text(request.query_params.get("name") or "file", "name", 255)
    if any(c in name for c in "/\\") or any(ord(c) < 32 for c in name):
        raise BadInput("name", "must be a file name without slashes or control characters")
    sealed = request.query_params.get("sealed", "0")
    if sealed not in ("0", "1", "true", "false"):
        raise BadInput("sealed", "must be 1 or 0")
    return await gw.store_file(user, data, name, sealed in ("1", "true"))


@route(
    "GET",
    "/files/{key}/{file}",
    "A file of any repository (fetched from the network if not stored here); images inline, others as downloads",
    None,
    query=[
        {
            "name": "X-File-Secret",
            "in": "header",
            "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "description": "the secret of a sealed file: the answer is the file opened",
        },
        {"name": "name", "in": "query", "schema": {"type": "string", "maxLength": 255}, "description": "download name"},
    ],
    answers="application/octet-stream",
)
async def download_file(gw: Gateway, request: Request, data, user: ChatUser, key: str, file: str):
    repo = chat.check_key(key, "key")
    if not FILE_ID.fullmatch(file):
        raise BadInput("file", "must be 32 hex digits (a file id)")
    secret = request.headers.get("x-file-secret")
    if secret is not None and not SECRET.fullmatch(secret):
        raise BadInput("X-File-Secret", "must be 64 hex digits (the secret of a sealed file)")
    content = await gw.read_file(repo, file, user.key)
    if secret is not None:
        try:
            content = SecretBox(bytes.fromhex(secret)).decrypt(content)
        except CryptoError:
            raise BadInput("X-File-Secret", "does not open this file") from None
    image = chat.sniff_image(content)
    headers = {
        # immutable: the id is the stored bytes' hash; an opened sealed file is never
        # kept by a cache, and the same URL without the secret is another answer
        "Cache-Control": "private, no-store" if secret else "private, max-age=31536000, immutable",
        "Vary": "X-File-Secret",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
    }
    if image is None:
        name = request.query_params.get("name") or f"{file}.bin"
        plain = "".join(c if c.isalnum() or c in "._- " else "_" for c in name)[:255] or "file"
        headers["Content-Disposition"] = f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(name[:255])}"
    return Response(content, media_type=image or "application/octet-stream", headers=headers)


@route(
    "GET",
    "/gateway.json",
    "What this gateway offers: its login methods and the hub the web client shows topics from",
    {"type": "object"},
    auth=False,
)
async def gateway_info(gw: Gateway, request: Request, data, user):
    return gw.info()


@route("GET", "/health", "Liveness: answers at once, does no work", {"type": "string"}, auth=False)
async def health(gw: Gateway, request: Request, data, user):
    return "ok"


# --- plumbing ----------------------------------------------------------------------------


async def _read_body(request: Request, limit: int, held=None):
    raw = await read_bytes(request, limit, held=held)
    if not raw.strip():
        raise BadInput("body", 'is empty: send {"data": ...}')
    try:
        body = chat.parse_json(raw)
    except jsonvalue.TooDeep as exc:
        raise BadInput("body", f"is JSON with {exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise BadInput("body", "is not JSON") from None
    if not isinstance(body, dict) or "data" not in body:
        raise BadInput("body", 'must be an object {"data": ...}')
    return body["data"]


def _own_key(user: ChatUser, what: str):
    """The user's secret key, held by this gateway; Forbidden for a user who logged in
    with their own key (their sealed records and envelopes open only where it is)."""
    if user.repo._key is None:
        raise Forbidden(
            f"this gateway does not hold your repository's key (you logged in with your own key): "
            f"your {what} open only with it, on your own node"
        )
    return user.repo._key


def _token(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.query_params.get("token")


def _endpoint(gw: Gateway, ops: dict[str, Op]):
    async def endpoint(request: Request) -> Response:
        op = ops.get(request.method)
        if op is None:
            return not_allowed(request, ops)

        async def call():
            user = await gw.authenticate(_token(request)) if op.auth else None
            with gw.bodies.reservation() as held:  # the body's bytes, until its call is done
                if op.raw:
                    data = await read_bytes(request, gw.cfg.max_file, "the file", held)
                else:
                    data = await _read_body(request, gw.cfg.max_body, held) if op.body is not None else None
                params = dict(request.path_params)
                if "topic" in params:
                    params["topic"] = chat.check_id(params["topic"], "topic", topic=True)
                if "post" in params:
                    params["post"] = chat.check_id(params["post"], "post")
                return await op.handler(gw, request, data, user, **params)

        return await answer(request, call)

    return endpoint


def openapi() -> dict:
    err = {
        "description": "failure",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    paths: dict[str, dict] = {}
    for op in OPS:
        params = list(op.query)
        if "{topic}" in op.path:
            params.insert(0, TOPIC_PARAM)
        if "{post}" in op.path:
            params.insert(1, POST_PARAM)
        if "{key}" in op.path:
            params.insert(0, {"name": "key", "in": "path", "required": True, "schema": KEY})
        if "{record}" in op.path:
            params.append({"name": "record", "in": "path", "required": True, "schema": ID})
        if "{file}" in op.path:
            params.insert(1, {"name": "file", "in": "path", "required": True, "schema": {"type": "string"}})
        responses: dict = {}
        if op.stream:
            responses["200"] = {
                "description": "an event stream",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            }
        elif op.answers != "application/json":
            responses["200"] = {
                "description": "the bytes",
                "content": {op.answers: {"schema": {"type": "string", "format": "binary"}}},
            }
        else:
            schema = {"type": "object", "required": ["result"], "properties": {"result": op.result}}
            responses["200"] = {"description": "done", "content": {"application/json": {"schema": schema}}}
        codes = ["400", "404", "405", "500"]
        if op.auth:
            codes.append("401")
        if op.body is not None:
            codes += ["403", "409", "413", "503"]
        elif op.method != "GET":
            codes += ["409"]
        for c in sorted(set(codes) | set(op.errors)):
            responses[c] = err
        item = {
            "summary": op.summary,
            "operationId": f"{op.method.lower()}{op.path.replace('/', '_').replace('{', '').replace('}', '')}",
            "responses": responses,
        }
        if params:
            item["parameters"] = params
        if op.auth:
            item["security"] = [{"bearer": []}, {"token": []}]
        if op.raw:
            item["requestBody"] = {
                "required": True,
                "content": {"application/octet-stream": {"schema": op.body}},
            }
        elif op.body is not None:
            item["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"type": "object", "required": ["data"], "properties": {"data": op.body}}
                    }
                },
            }
        paths.setdefault(op.path, {})[op.method.lower()] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": "pttd gateway", "version": __version__, "description": "See docs/http-api.md."},
        "paths": paths,
        "components": {
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "token": {"type": "apiKey", "in": "query", "name": "token"},
            },
        },
    }


def build_app(gw: Gateway) -> FastApp:
    by_path: dict[str, dict[str, Op]] = {}
    for op in OPS:
        by_path.setdefault(op.path, {})[op.method] = op
    # fixed segments before parameters: /topics/x/curators is not the post "curators"
    order = sorted(by_path, key=lambda p: (p.count("/"), p.count("{")))
    # an ASGI endpoint gets every method: it answers 405 naming the methods it has
    routes = [Route(p, AsgiEndpoint(_endpoint(gw, by_path[p]))) for p in order]
    spec = openapi()

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(spec)

    routes.append(Route("/openapi.json", openapi_json, methods=["GET"]))
    web = WebClient(gw.cfg.hub_url)
    routes.append(Route("/", web.serve, methods=["GET", "HEAD"]))
    routes.append(Route("/app/{path:path}", web.serve, methods=["GET", "HEAD"]))
    headers = ["Authorization", "Content-Type", "Last-Event-ID", "X-File-Secret"]
    return make_app(routes, gw.cfg.cors_origins, ["GET", "POST", "PUT", "DELETE"], headers)
