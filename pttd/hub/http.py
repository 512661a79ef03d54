"""The hub's HTTP API (an ASGI app on the same server as the gateway's).

    POST /join       {"public_key": HEX, "addresses": ["host:port"], "token": ...}
                     (the old clients' body, or wrapped as {"data": {...}})
    POST /leave      {"public_key": HEX}
    GET  /hub.json   the hub: name, description, key, moderators, how many joined
    GET  /topics     topics of the combined view, newest activity first
    GET  /topics/ID  messages of a topic (?since= ?before= ?limit= ?reader=KEY)
    GET  /profiles   every joined repository's profile
    GET  /events     Server-Sent Events: a snapshot (or what follows Last-Event-ID), then
                     deltas: update {topic, messages, removed} and profiles {profiles}

Answers are {"result": ...} or {"error": "..."} as at the gateway.
"""

from __future__ import annotations

import logging

import trio
from starlette.requests import Request
from starlette.responses import StreamingResponse

from ..gateway.chat import check_id
from ..gateway.http import KEEPALIVE, MAX_LIMIT, _int_param, _sse
from ..web import FastApp, make_app, read_object, table_routes
from .service import Hub, HubBadInput, HubStream

log = logging.getLogger("pttd.http")

MAX_BODY = 64 * 1024


def _reader(request: Request) -> str | None:
    r = request.query_params.get("reader")
    if r is None:
        return None
    if len(r) != 64 or any(c not in "0123456789abcdef" for c in r):
        raise HubBadInput("reader", "must be a repository key: 64 lowercase hex digits")
    return r


def build_hub_app(hub: Hub, cors_origins: list[str]) -> FastApp:
    async def join(request: Request):
        b = await read_object(request, MAX_BODY)
        return await hub.join(b.get("public_key"), b.get("addresses"), b.get("token"))

    async def leave(request: Request):
        b = await read_object(request, MAX_BODY)
        return await hub.leave(b.get("public_key"), b.get("signature"), b.get("token"), b.get("time"))

    async def hub_json(request: Request):
        return hub.describe()

    async def topics(request: Request):
        return hub.view.topic_list()

    async def topic(request: Request):
        t = check_id(request.path_params["topic"], "topic", topic=True)
        since = _int_param(request, "since")
        before = _int_param(request, "before")
        limit = _int_param(request, "limit", 1, MAX_LIMIT)
        return hub.view.messages(t, _reader(request), since, before, limit)

    async def profiles(request: Request):
        return hub.view.profiles()

    async def health(request: Request):
        return "ok"

    async def events(request: Request):
        reader = _reader(request)
        last = request.headers.get("last-event-id") or request.query_params.get("lastEventId")

        async def body():
            # registered where it is removed, with no await since the snapshot (no delta
            # falls between), and only once the answer is really being sent
            missed = hub.since(last)
            snapshot = hub.snapshot(reader) if missed is None else None
            top = hub.next_id - 1
            stream = HubStream(reader)
            hub.streams.add(stream)
            try:
                yield "retry: 1000\n\n"
                if snapshot is not None:
                    yield _sse(hub.event_id(top), "snapshot", snapshot)
                else:
                    for d in missed:
                        yield _sse(hub.event_id(d.id), d.kind, hub.payload(d, reader))
                while True:
                    with trio.move_on_after(KEEPALIVE) as idle:
                        try:
                            d = await stream.receive.receive()
                        except trio.EndOfChannel:
                            return
                    if idle.cancelled_caught:
                        yield ": keepalive\n\n"
                        continue
                    if d.id <= top:
                        continue
                    yield _sse(hub.event_id(d.id), d.kind, hub.payload(d, reader))
            finally:
                hub.streams.discard(stream)

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )

    table = {
        "/join": {"POST": join},
        "/leave": {"POST": leave},
        "/hub.json": {"GET": hub_json},
        "/topics": {"GET": topics},
        "/topics/{topic}": {"GET": topic},
        "/profiles": {"GET": profiles},
        "/events": {"GET": events},
        "/health": {"GET": health},
    }

    routes = table_routes(table)
    return make_app(routes, cors_origins, ["GET", "POST"], ["Content-Type", "Last-Event-ID"])
