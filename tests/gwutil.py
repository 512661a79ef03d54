"""Helpers for gateway tests: a real gateway daemon on 127.0.0.1:0 and an HTTP client."""

from __future__ import annotations

import json
import os
from contextlib import asynccontextmanager

import httpx
import trio

from tests.netutil import start_daemon


@asynccontextmanager
async def gateway(tmp_path, name: str = "gw", peers=(), hubs=(), oidc=(), **gw_options):
    """A gateway daemon (test logins and registration on) with an HTTP client as ``.web``."""
    options = {"test_login": True, "registration": True}
    options.update(gw_options)
    async with trio.open_nursery() as nursery:
        g = await start_daemon(
            nursery, os.path.join(tmp_path, name), mode="gateway", gateway=options, peers=peers, hubs=hubs, oidc=oidc
        )
        async with httpx.AsyncClient(base_url=g.http, timeout=10.0) as http:
            g.web = http
            yield g
        g.daemon.stop()


async def login(http: httpx.AsyncClient, ident: str) -> tuple[str, dict]:
    """A test login: (key, headers with its token)."""
    r = await http.post("/test-login", json={"data": {"id": ident}})
    assert r.status_code == 200, r.text
    res = r.json()["result"]
    return res["key"], {"Authorization": f"Bearer {res['token']}"}


def result(r: httpx.Response, status: int = 200):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    if status == 200:
        return body["result"]
    assert set(body) == {"error"} and body["error"], body
    return body["error"]


class SSE:
    """Reads Server-Sent Events from an open streaming response."""

    def __init__(self, response: httpx.Response):
        self.lines = response.aiter_lines()

    async def next(self, timeout: float = 5.0) -> dict:
        ev: dict = {}
        with trio.fail_after(timeout):
            async for line in self.lines:
                if line == "":
                    if "event" in ev:
                        return ev
                    ev = {}
                    continue
                if line.startswith(":"):
                    continue
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "data":
                    ev["data"] = json.loads(value)
                elif field == "id":
                    ev["id"] = int(value) if value.isdigit() else value
                elif field == "event":
                    ev["event"] = value
        raise AssertionError("the event stream ended")
