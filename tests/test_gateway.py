"""The gateway's HTTP API through a real server: every call, its errors, logins, DMs, events."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from urllib.parse import quote

import jwt
import pytest
import trio

from pttd.errors import PttError
from pttd.gateway import chat
from tests.gwutil import SSE, gateway, login, result
from tests.netutil import start_daemon, wait_for

TEXT = "hello, world"


async def test_register_login_and_tokens(tmp_path):
    async with gateway(tmp_path, registration=False, test_login=False) as g:
        http = g.web
        creds = {"data": {"username": "alice", "password": "correct horse"}}
        assert "closed" in result(await http.post("/register", json=creds), 403)
        r = await http.patch("/register", json=creds)
        assert r.status_code == 405 and r.headers["allow"] == "POST" and "error" in r.json()
        assert "not enabled" in result(await http.post("/test-login", json={"data": {"id": "x"}}), 404)
        g.gateway.cfg.registration = True
        reg = result(await http.post("/register", json=creds))
        assert len(reg["key"]) == 64
        assert "already exists" in result(await http.post("/register", json=creds), 409)
        bad = {"data": {"username": "alice", "password": "wrong password"}}
        assert "wrong username or password" in result(await http.post("/login", json=bad), 401)
        nobody = {"data": {"username": "nobody", "password": "whatever1"}}
        assert "wrong username or password" in result(await http.post("/login", json=nobody), 401)
        short = {"data": {"username": "bob", "password": "short"}}
        assert "data.password" in result(await http.post("/register", json=short), 400)
        assert "data.password" in result(await http.post("/register", json={"data": {"username": "bob"}}), 400)
        bad_friend = {"data": {"username": "bob", "password": "long enough", "friend": "xx"}}
        assert "data.friend" in result(await http.post("/register", json=bad_friend), 400)
        # nothing was created by the refused calls: bob can still register
        assert result(await http.post("/register", json={"data": {"username": "bob", "password": "long enough"}}))
        res = result(await http.post("/login", json=creds))
        assert res["key"] == reg["key"]
        token = res["token"]
        assert result(await http.get("/me", params={"token": token})) == reg["key"]
        assert result(await http.get("/me", headers={"Authorization": f"Bearer {token}"})) == reg["key"]
        assert "required" in result(await http.get("/me"), 401)
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        assert "not valid" in result(await http.get("/me", params={"token": forged}), 401)
        secret = g.gateway.key.token_secret
        expired = jwt.encode({"sub": reg["key"], "exp": int(time.time()) - 60}, secret, algorithm="HS256")
        assert "expired" in result(await http.get("/me", params={"token": expired}), 401)
        other = jwt.encode({"sub": reg["key"], "exp": int(time.time()) + 60}, b"x" * 32, algorithm="HS256")
        assert "not valid" in result(await http.get("/me", params={"token": other}), 401)
        unsigned = jwt.encode({"sub": reg["key"], "exp": int(time.time()) + 60}, None, algorithm="none")
        assert "not valid" in result(await http.get("/me", params={"token": unsigned}), 401)
        assert "OpenID" in result(await http.post("/login", json={"data": {"id_token": "x.y.z"}}), 401)


async def test_topics_and_posts(tmp_path):
    async with gateway(tmp_path) as g:
        http = g.web
        _key, h = await login(http, "alice")
        created = result(await http.post("/topics", json={"data": "general"}, headers=h))
        assert created["id"] == "general" and created["post"]["message"]["type"] == "action"
        assert result(await http.get("/topics", headers=h)) == ["general"]
        posts = []
        for i in range(5):
            p = result(await http.post("/topics/general", json={"data": f"message {i}"}, headers=h))
            assert p["topic"] == "general" and p["message"] == {"type": "text", "value": f"message {i}"}
            posts.append(p)
        shaped = result(
            await http.post("/topics/general", json={"data": {"type": "file", "value": {"n": 1}}}, headers=h)
        )
        assert shaped["message"]["type"] == "file"
        msgs = result(await http.get("/topics/general", headers=h))
        assert [m["id"] for m in msgs] == [created["post"]["id"]] + [p["id"] for p in posts] + [shaped["id"]]
        assert [m["id"] for m in result(await http.get("/topics/general?limit=2", headers=h))] == [
            posts[4]["id"],
            shaped["id"],
        ]
        # since and before are inclusive: a page boundary loses nothing (ids tell repeats)
        since = result(await http.get(f"/topics/general?since={posts[2]['date']}", headers=h))
        assert all(m["date"] >= posts[2]["date"] for m in since)
        assert {posts[2]["id"], posts[3]["id"], shaped["id"]} <= {m["id"] for m in since}
        before = result(await http.get(f"/topics/general?before={posts[0]['date']}", headers=h))
        assert all(m["date"] <= posts[0]["date"] for m in before) and posts[0]["id"] in [m["id"] for m in before]
        assert "limit" in result(await http.get("/topics/general?limit=0", headers=h), 400)
        assert "since" in result(await http.get("/topics/general?since=abc", headers=h), 400)
        assert "since" in result(await http.get("/topics/general?since=", headers=h), 400)
        for odd in ("1_000", " 5", "\u0661\u0662"):  # what int() takes, and no client means
            assert "must be an integer" in result(
                await http.get("/topics/general", params={"since": odd}, headers=h), 400
            )

        pid = posts[1]["id"]
        assert result(await http.get(f"/topics/general/{pid}", headers=h))["id"] == pid
        edited = result(await http.put(f"/topics/general/{pid}", json={"data": "changed"}, headers=h))
        assert edited["message"]["value"] == "changed" and edited["date"] == posts[1]["date"] and "edited" in edited
        assert result(await http.get(f"/topics/general/{pid}", headers=h))["message"]["value"] == "changed"
        assert "no post" in result(await http.put("/topics/general/nope", json={"data": "x"}, headers=h), 404)
        assert result(await http.delete(f"/topics/general/{pid}", headers=h)) == {
            "id": pid,
            "topic": "general",
            "deleted": True,
        }
        assert "no post" in result(await http.delete(f"/topics/general/{pid}", headers=h), 404)
        assert "no post" in result(await http.get(f"/topics/general/{pid}", headers=h), 404)
        assert pid not in [m["id"] for m in result(await http.get("/topics/general", headers=h))]
        own = result(await http.post("/topics/general", json={"data": {"id": "mine", "message": "x"}}, headers=h))
        assert own["id"] == "mine"
        dup = {"data": {"id": "mine", "message": "y"}}
        assert "already exists" in result(await http.post("/topics/general", json=dup, headers=h), 409)
        assert result(await http.get("/topics/empty", headers=h)) == []


async def test_curators_moderation_reactions_profile(tmp_path):
    async with gateway(tmp_path) as g:
        http = g.web
        bob, _ = await login(http, "bob")
        _alice, h = await login(http, "alice")
        p = result(await http.post("/topics/general", json={"data": TEXT}, headers=h))
        cur = result(await http.post("/topics/general/curators", json={"data": {"key": bob}}, headers=h))
        assert cur["key"] == bob
        assert [c["key"] for c in result(await http.get("/topics/general/curators", headers=h))] == [bob]
        assert "data.key" in result(
            await http.post("/topics/general/curators", json={"data": {"key": "ab"}}, headers=h), 400
        )
        mod = result(await http.post("/topics/general/moderation", json={"data": {"msgID": p["id"]}}, headers=h))
        assert mod["msgID"] == p["id"] and mod["type"] == "hide"
        assert len(result(await http.get("/topics/general/moderation", headers=h))) == 1
        r = {"data": {"msgID": p["id"], "emoji": "👍"}}
        reaction = result(await http.post("/topics/general/reactions", json=r, headers=h))
        assert reaction["emoji"] == "👍" and reaction["msgID"] == p["id"]
        assert result(await http.get("/topics/general/reactions", headers=h))[0]["id"] == reaction["id"]
        assert "data.msgID" in result(await http.post("/topics/general/reactions", json={"data": {}}, headers=h), 400)
        # the folders are not messages
        assert [m["id"] for m in result(await http.get("/topics/general", headers=h))] == [p["id"]]
        # a reaction (or any record) taken back
        gone = result(await http.delete(f"/topics/general/reactions/{reaction['id']}", headers=h))
        assert gone == {"id": reaction["id"], "topic": "general", "deleted": True}
        assert result(await http.get("/topics/general/reactions", headers=h)) == []
        assert "no reactions record" in result(
            await http.delete(f"/topics/general/reactions/{reaction['id']}", headers=h), 404
        )
        assert "record" in result(await http.delete("/topics/general/reactions/-x", headers=h), 400)
        result(await http.delete(f"/topics/general/moderation/{mod['id']}", headers=h))
        assert result(await http.get("/topics/general/moderation", headers=h)) == []

        assert result(await http.get("/profile", headers=h)) == {"name": "alice"}
        prof = result(await http.post("/profile", json={"data": {"name": "Alice A.", "color": "blue"}}, headers=h))
        assert prof == {"name": "Alice A.", "color": "blue"}
        assert result(await http.post("/profile", json={"data": {"color": None}}, headers=h)) == {"name": "Alice A."}
        assert "cannot be removed" in result(await http.post("/profile", json={"data": {"name": None}}, headers=h), 400)
        assert result(await http.get("/profile", headers=h)) == {"name": "Alice A."}
        assert "data.x" in result(await http.post("/profile", json={"data": {"x": [1]}}, headers=h), 400)
        # NaN and Infinity are not JSON to any client: refused, never stored
        nan = b'{"data": {"x": NaN}}'
        assert "not JSON" in result(await http.post("/profile", content=nan, headers=h), 400)
        # nor a number Python reads as infinity (it would be stored as Infinity)
        huge = b'{"data": {"x": 1e400}}'
        assert "not JSON" in result(await http.post("/profile", content=huge, headers=h), 400)
        deep = b'{"data": {"x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}}"
        assert "nested deeper than 64 levels" in result(await http.post("/profile", content=deep, headers=h), 400)
        # nor a lone surrogate (no UTF-8 for it: the value could not be written)
        lone = b'{"data": {"x": "\\ud800"}}'
        assert "not JSON" in result(await http.post("/profile", content=lone, headers=h), 400)
        assert result(await http.post("/profile", json={"data": {"x": 1.5e300}}, headers=h))["x"] == 1.5e300
        assert result(await http.post("/profile", json={"data": {"x": None}}, headers=h)) == {"name": "Alice A."}
        assert result(await http.get("/profile", headers=h)) == {"name": "Alice A."}


async def test_friends_and_channels_are_sealed_to_the_owner(tmp_path):
    async with gateway(tmp_path) as g:
        http = g.web
        bob, _ = await login(http, "bob")
        carol, _ = await login(http, "carol")
        alice, h = await login(http, "alice")
        f = result(await http.post("/friends", json={"data": {"key": bob, "name": "Bob"}}, headers=h))
        assert f["key"] == bob and f["name"] == "Bob"
        result(await http.post("/friends", json={"data": carol}, headers=h))
        assert sorted(x["key"] for x in result(await http.get("/friends", headers=h))) == sorted([bob, carol])
        assert "own key" in result(await http.post("/friends", json={"data": alice}, headers=h), 400)
        ch = result(await http.post("/pchannels", json={"data": {"name": "team", "members": [bob, carol]}}, headers=h))
        assert ch["name"] == "team" and ch["members"] == sorted([alice, bob, carol])
        assert result(await http.get("/pchannels", headers=h)) == [ch]
        # what a peer syncing alice's repository sees: neither bob's key nor the channel's name
        repo = await g.node.db(g.node.dd.repository, alice)
        stored = dict(await g.node.db(lambda: list(repo.items("/"))))
        paths = [p for p in stored if p.startswith(("/friends/", "/pchannels/"))]
        assert len(paths) == 3
        for p in paths:
            assert bob not in p and bob.encode() not in stored[p] and b"team" not in stored[p]
        # another user's token reads only their own (empty) lists
        _, hb = await login(http, "bob")
        assert result(await http.get("/friends", headers=hb)) == []


async def test_direct_messages_page_by_date_and_limit_newest_first(tmp_path):
    async with gateway(tmp_path) as g:
        http = g.web
        alice, ha = await login(http, "alice")
        bob, hb = await login(http, "bob")
        carol, hc = await login(http, "carol")
        for i in range(6):  # two conversations for alice, interleaved
            result(await http.post("/dm", json={"data": {"key": alice, "message": f"b{i}"}}, headers=hb))
            result(await http.post("/dm", json={"data": {"key": alice, "message": f"c{i}"}}, headers=hc))

        def texts(convs):
            return {c["key"]: [m["message"]["value"] for m in c["messages"]] for c in convs}

        everything = result(await http.get("/dm", headers=ha))
        assert texts(everything) == {bob: [f"b{i}" for i in range(6)], carol: [f"c{i}" for i in range(6)]}
        # the gateway's order: by date, then (the same millisecond) by sender
        in_order = sorted((m for c in everything for m in c["messages"]), key=lambda m: (m["date"], m["from"], m["id"]))

        def ids(convs):
            return sorted(m["id"] for c in convs for m in c["messages"])

        newest = result(await http.get("/dm?limit=3", headers=ha))
        assert ids(newest) == sorted(m["id"] for m in in_order[-3:])
        assert newest[0]["messages"][-1]["id"] == in_order[-1]["id"]  # the newest conversation first
        # the page before: up to the date of the 6th message, the newest 3 of those
        mid = in_order[5]["date"]
        older = result(await http.get(f"/dm?before={mid}&limit=3", headers=ha))
        assert ids(older) == sorted(m["id"] for m in [m for m in in_order if m["date"] <= mid][-3:])
        assert texts(result(await http.get(f"/dm?key={bob}&limit=2", headers=ha))) == {bob: ["b4", "b5"]}
        assert "limit" in result(await http.get("/dm?limit=0", headers=ha), 400)
        assert "before" in result(await http.get("/dm?before=x", headers=ha), 400)


async def test_direct_message_conversations_in_one_millisecond_keep_the_page_order(tmp_path, monkeypatch):
    monkeypatch.setattr(chat, "now_ms", lambda: 1_800_000_000_000)  # every message in one ms
    async with gateway(tmp_path, writer="thread") as g:
        http = g.web
        alice, ha = await login(http, "alice")
        _bob, hb = await login(http, "bob")
        _carol, hc = await login(http, "carol")
        for i in range(3):
            result(await http.post("/dm", json={"data": {"key": alice, "message": f"b{i}"}}, headers=hb))
            result(await http.post("/dm", json={"data": {"key": alice, "message": f"c{i}"}}, headers=hc))
        everything = result(await http.get("/dm", headers=ha))
        # one date for all: the page's order is by sender, then envelope path
        in_order = sorted((m for c in everything for m in c["messages"]), key=lambda m: (m["from"], m["id"]))
        for convs in (everything, result(await http.get("/dm?limit=4", headers=ha))):
            assert convs[0]["messages"][-1]["from"] == in_order[-1]["from"]  # the newest conversation first


async def test_direct_messages_between_two_users_on_one_gateway(tmp_path):
    async with gateway(tmp_path) as g:
        http = g.web
        alice, ha = await login(http, "alice")
        bob, hb = await login(http, "bob")
        _carol, hc = await login(http, "carol")
        async with http.stream("GET", "/events", headers=hb) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = SSE(stream)
            sent = result(await http.post("/dm", json={"data": {"key": bob, "message": "psst, bob"}}, headers=ha))
            assert sent["from"] == alice and sent["to"] == bob
            ev = await events.next()
            assert ev["event"] == "dm" and ev["data"]["message"]["value"] == "psst, bob"
            assert ev["data"]["from"] == alice and ev["data"]["id"] == sent["id"]
        convs = result(await http.get("/dm", headers=hb))
        assert len(convs) == 1 and convs[0]["key"] == alice
        assert [m["message"]["value"] for m in convs[0]["messages"]] == ["psst, bob"]
        result(await http.post("/dm", json={"data": {"key": alice, "message": "hi alice"}}, headers=hb))
        convs = result(await http.get("/dm", headers=ha))
        assert [m["message"]["value"] for m in convs[0]["messages"]] == ["psst, bob", "hi alice"]
        assert result(await http.get(f"/dm?key={bob}", headers=ha))[0]["key"] == bob
        assert result(await http.get("/dm", headers=hc)) == []
        # the envelope in alice's public tree is ciphertext
        repo = await g.node.db(g.node.dd.repository, alice)
        envs = await g.node.db(lambda: list(repo.items("/topics/__gossiping/")))
        assert len(envs) == 1 and b"psst" not in envs[0][1]
        assert set(json.loads(envs[0][1])) == {"id", "nonce", "cipher"}
        # a channel of three: each member reads it, grouped as one channel
        carol = (await login(http, "carol"))[0]
        res = result(
            await http.post(
                "/dms", json={"data": {"members": [bob, carol], "message": "all of us", "name": "trio"}}, headers=ha
            )
        )
        assert len(res) == 2 and {m["to"] for m in res} == {bob, carol}
        for h in (hb, hc):
            chans = [c for c in result(await http.get("/dm", headers=h)) if "channel" in c]
            assert chans[0]["channel"]["name"] == "trio" and chans[0]["messages"][0]["message"]["value"] == "all of us"
        chans = [c for c in result(await http.get("/dm", headers=ha)) if "channel" in c]
        assert len(chans) == 1 and len(chans[0]["messages"]) == 1
        for member in (bob, carol):  # the channel is found by any of its members
            assert [c for c in result(await http.get(f"/dm?key={member}", headers=ha)) if "channel" in c] == chans
        assert "own key" in result(
            await http.post("/dm", json={"data": {"key": alice, "message": "x"}}, headers=ha), 400
        )
        assert "data.key" in result(
            await http.post("/dm", json={"data": {"key": "00" * 32, "message": "x"}}, headers=ha), 400
        )


async def test_listing_one_key_opens_only_the_envelopes_of_its_conversations(tmp_path, monkeypatch):
    """GET /dm?key= opens the direct messages with that key and those of channels it is
    a member of, not the user's other conversations (a page used to cost the user's
    whole history); rows from before the members column are opened to see."""
    async with gateway(tmp_path) as g:
        http = g.web
        alice, ha = await login(http, "alice")
        bob, hb = await login(http, "bob")
        carol, _ = await login(http, "carol")
        dave, _ = await login(http, "dave")
        for i in range(10):
            result(await http.post("/dm", json={"data": {"key": alice, "message": f"b{i}"}}, headers=hb))
        trio_ = {"members": [carol, dave], "message": "the three of us", "name": "trio"}
        result(await http.post("/dms", json={"data": trio_}, headers=ha))
        result(await http.post("/dm", json={"data": {"key": dave, "message": "just dave"}}, headers=ha))
        opened = []
        real_open = chat.open_envelope

        def counting_open(*args):
            opened.append(args)
            return real_open(*args)

        monkeypatch.setattr(chat, "open_envelope", counting_open)
        for key, want in ((carol, [["the three of us"]]), (dave, [["just dave"], ["the three of us"]])):
            opened.clear()
            convs = result(await http.get(f"/dm?key={key}", headers=ha))
            assert [[m["message"]["value"] for m in c["messages"]] for c in convs] == want
            assert len(opened) == sum(len(w) for w in want)  # none of bob's ten
        # rows written before the members column: opened, and still found
        await g.node.db(g.node.store.execute, "UPDATE gw_dms SET members = NULL")
        opened.clear()
        convs = result(await http.get(f"/dm?key={carol}", headers=ha))
        assert [c["channel"]["name"] for c in convs] == ["trio"] and len(opened) == 12


async def test_event_stream_resumes_from_last_event_id(tmp_path):
    async with gateway(tmp_path) as g:
        http = g.web
        _a, ha = await login(http, "alice")
        _b, hb = await login(http, "bob")
        result(await http.post("/topics/general", json={"data": "bob is in general"}, headers=hb))
        async with http.stream("GET", "/events", headers=hb) as stream:
            events = SSE(stream)
            result(await http.post("/topics/general", json={"data": "one"}, headers=ha))
            result(await http.post("/topics/elsewhere", json={"data": "not for bob"}, headers=ha))
            result(await http.post("/topics/general", json={"data": "two"}, headers=ha))
            first = await events.next()
            assert first["event"] == "post" and first["data"]["post"]["message"]["value"] == "one"
            assert first["data"]["action"] == "new" and first["data"]["topic"] == "general"
        # while bob is away: two more posts in general, one elsewhere
        for text in ("three", "four"):
            result(await http.post("/topics/general", json={"data": text}, headers=ha))
        result(await http.post("/topics/elsewhere", json={"data": "still not"}, headers=ha))
        headers = dict(hb, **{"Last-Event-ID": str(first["id"])})
        async with http.stream("GET", "/events", headers=headers) as stream:
            events = SSE(stream)
            got = [await events.next() for _ in range(3)]
            assert [e["data"]["post"]["message"]["value"] for e in got] == ["two", "three", "four"]
            assert [e["id"] for e in got] == sorted(e["id"] for e in got)
            pid = got[0]["data"]["post"]["id"]
            result(await http.delete(f"/topics/general/{pid}", headers=ha))
            deleted = await events.next()
            assert deleted["data"]["action"] == "delete" and deleted["data"]["post"]["id"] == pid
        assert "Last-Event-ID" in result(await http.get("/events", headers=dict(hb, **{"Last-Event-ID": "x"})), 400)
        # an id ahead of the gateway's events (its store restored from a backup, say):
        # told to reload, and the next event comes, not skipped until the ids catch up
        async with http.stream("GET", "/events", headers=dict(hb, **{"Last-Event-ID": "1000000"})) as stream:
            events = SSE(stream)
            reset = await events.next()
            assert reset["event"] == "reset" and "ahead" in reset["data"]["reason"]
            result(await http.post("/topics/general", json={"data": "five"}, headers=ha))
            five = await events.next()
            assert five["event"] == "post" and five["data"]["post"]["message"]["value"] == "five"


async def test_bad_input_is_refused_and_changes_nothing(tmp_path):
    async with gateway(tmp_path, max_body=4096) as g:
        http = g.web
        key, h = await login(http, "alice")
        result(await http.post("/topics/general", json={"data": "first"}, headers=h))
        repo = await g.node.db(g.node.dd.repository, key)
        before = (await g.node.db(repo.head)).seq
        for bad in ("a b", "x" * 65, "semi;colon", "..", ".hidden", "tab\tx", "__gossiping", "é", "nul\x00"):
            raw = "%2E%2E" if bad == ".." else quote(bad, safe="")
            assert "topic" in result(await http.post(f"/topics/{raw}", json={"data": "x"}, headers=h), 400), bad
            if bad != "__gossiping":  # reserved as a topic only
                put = await http.put(f"/topics/general/{raw}", json={"data": "x"}, headers=h)
                assert "post" in result(put, 400), bad
        assert "topic" in result(await http.post("/topics/a%20b", json={"data": "x"}, headers=h), 400)
        assert "topic" in result(await http.post("/topics/a%00b", json={"data": "x"}, headers=h), 400)
        assert "reserved" in result(await http.post("/topics/__gossiping", json={"data": "x"}, headers=h), 400)
        r = await http.put("/topics/general/curators", json={"data": "x"}, headers=h)
        assert r.status_code == 405 and r.headers["allow"] == "GET, POST"  # a folder, not a post
        assert "reserved" in result(
            await http.post("/topics/general", json={"data": {"id": "reactions", "message": "x"}}, headers=h), 400
        )
        assert result(await http.post("/topics/a%2F..%2Fb", json={"data": "x"}, headers=h), 404)
        assert "larger than" in result(await http.post("/topics/general", content=b"x" * 5000, headers=h), 413)
        big = {"data": "y" * 5000}
        assert "larger than" in result(await http.post("/topics/general", json=big, headers=h), 413)
        assert "not JSON" in result(await http.post("/topics/general", content=b"{nope", headers=h), 400)
        assert '"data"' in result(await http.post("/topics/general", json={"text": "x"}, headers=h), 400)
        assert "empty" in result(await http.post("/topics/general", content=b"", headers=h), 400)
        assert "data" in result(await http.post("/topics/general", json={"data": 5}, headers=h), 400)
        assert "data.type" in result(
            await http.post("/topics/general", json={"data": {"type": "A B", "value": 1}}, headers=h), 400
        )
        assert "data.value" in result(
            await http.post("/topics/general", json={"data": {"type": "text"}}, headers=h), 400
        )
        assert "control" in result(await http.post("/topics/general", json={"data": "bell\x07"}, headers=h), 400)
        assert "data.name" in result(await http.post("/topics", json={"data": {"name": "../etc"}}, headers=h), 400)
        assert "no such route" in result(await http.get("/nope", headers=h), 404)
        assert "no such route" in result(await http.get("/topics/a/b/c/d", headers=h), 404)
        r = await http.patch("/topics/general", headers=h)
        assert r.status_code == 405 and "error" in r.json() and "POST" in r.headers["allow"]
        assert (await g.node.db(repo.head)).seq == before
        assert [m["message"]["value"] for m in result(await http.get("/topics/general", headers=h))] == ["first"]


async def test_cors_answers_browsers(tmp_path):
    async with gateway(tmp_path, cors_origins=["https://chat.example"]) as g:
        r = await g.web.options(
            "/topics", headers={"Origin": "https://chat.example", "Access-Control-Request-Method": "POST"}
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://chat.example"
        r = await g.web.options(
            "/topics", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


async def test_concurrent_writes_of_many_users_share_transactions(tmp_path):
    async with gateway(tmp_path) as g:
        http = g.web
        users = [await login(http, f"u{i}") for i in range(40)]
        groups_before, writes_before = g.gateway.groups, g.gateway.writes
        answers: dict[int, dict] = {}

        async def post(i: int, h: dict) -> None:
            for n in range(3):
                p = result(await http.post("/topics/load", json={"data": f"{i}-{n}"}, headers=h))
                answers[i * 10 + n] = p

        async with trio.open_nursery() as nursery:
            for i, (_k, h) in enumerate(users):
                nursery.start_soon(post, i, h)
        assert len(answers) == 120
        writes = g.gateway.writes - writes_before
        groups = g.gateway.groups - groups_before
        assert writes == 120 and groups < writes, (groups, writes)
        for i, (_k, h) in enumerate(users[:5]):
            got = [m["message"]["value"] for m in result(await http.get("/topics/load", headers=h))]
            assert got == [f"{i}-{n}" for n in range(3)]


async def test_keys_at_rest_are_sealed(tmp_path):
    async with gateway(tmp_path) as g:
        http = g.web
        keys = [(await login(http, f"user{i}"))[0] for i in range(3)]
        users = [await g.gateway.user(bytes.fromhex(k)) for k in keys]
        secrets = [bytes(u.repo._key) for u in users]
        path = os.path.join(g.node.dd.path, "gateway.key")
        assert os.stat(path).st_mode & 0o777 == 0o600
        db_path = g.node.store.path
    raw = b""
    for suffix in ("", "-wal"):
        if os.path.exists(db_path + suffix):
            with open(db_path + suffix, "rb") as f:
                raw += f.read()
    for s in secrets:
        assert s not in raw and s.hex().encode() not in raw
    assert not any(name.startswith(tuple(keys)) for name in os.listdir(os.path.join(g.node.dd.path, "keys")))
    db = sqlite3.connect(db_path)
    assert db.execute("SELECT count(*) FROM gw_users").fetchone()[0] == 3
    db.close()
    # a wrong gateway key is refused at start, naming the problem
    with open(path, "w") as f:
        f.write("11" * 32 + "\n")
    from pttd.daemon import Daemon
    from tests.netutil import fast_config

    d = Daemon(fast_config(str(tmp_path / "gw"), mode="gateway"))
    try:
        await d.run()
    except Exception as exc:
        assert "does not open" in str(exc)
    else:
        raise AssertionError("a daemon with the wrong gateway key started")


async def test_a_plain_node_syncs_a_hosted_user_over_the_wire(tmp_path):
    async with gateway(tmp_path) as g:
        key, h = await login(g.web, "alice")
        async with trio.open_nursery() as nursery:
            node = await start_daemon(nursery, str(tmp_path / "node"))
            await node.call("follow", repo=key, peers=[g.address], prefixes=["/topics/"])
            p = result(await g.web.post("/topics/general", json={"data": "over the wire"}, headers=h))
            repo = await g.node.db(g.node.dd.repository, key)
            seq = (await g.node.db(repo.head)).seq
            await node.call("wait", repo=key, version=seq, timeout=10)
            got = await node.call("ls", repo=key, prefix="/topics/general/")
            assert [e["path"] for e in got["entries"]] == [f"/topics/general/{p['id']}"]
            # live: the next post is pushed to the follower
            p2 = result(await g.web.post("/topics/general", json={"data": "live"}, headers=h))
            await node.call("wait", repo=key, version=seq + 1, timeout=10)
            got = await node.call("ls", repo=key, prefix="/topics/general/")
            assert f"/topics/general/{p2['id']}" in [e["path"] for e in got["entries"]]
            node.daemon.stop()


async def test_a_direct_message_reaches_a_friend_on_another_gateway(tmp_path):
    async with gateway(tmp_path, "gw1") as g1:
        async with gateway(tmp_path, "gw2", peers=[g1.address]) as g2:
            alice, ha = await login(g1.web, "alice")
            bob, hb = await login(g2.web, "bob")
            result(await g2.web.post("/friends", json={"data": {"key": alice}}, headers=hb))
            async with g2.web.stream("GET", "/events", headers=hb) as stream:
                events = SSE(stream)
                result(await g1.web.post("/dm", json={"data": {"key": bob, "message": "across"}}, headers=ha))
                ev = await events.next(timeout=10)
                assert ev["event"] == "dm" and ev["data"]["message"]["value"] == "across"
            convs = result(await g2.web.get("/dm", headers=hb))
            assert convs[0]["key"] == alice and [m["message"]["value"] for m in convs[0]["messages"]] == ["across"]
            # only the envelopes were synced: not alice's topics
            f = g2.node.follows[bytes.fromhex(alice)]
            assert f.prefixes == ["/topics/__gossiping/"]
            await wait_for(lambda: f.state == "synced")


async def test_envelopes_synced_from_a_plain_node_must_say_truly_who_sent_them(tmp_path):
    from pttd.gateway import chat

    async with trio.open_nursery() as nursery:
        node = await start_daemon(nursery, str(tmp_path / "carol"))
        async with gateway(tmp_path, peers=[node.address]) as g:
            bob, hb = await login(g.web, "bob")
            alice, _ = await login(g.web, "alice")
            carol_sk = node.node.identity
            carol = node.id
            result(await g.web.post("/friends", json={"data": carol}, headers=hb))
            now = chat.now_ms()
            msg = {"type": "text", "value": "hi"}
            forged = chat.make_envelope(
                carol_sk, bytes.fromhex(bob), {"id": "f1", "from": alice, "to": bob, "date": now, "message": msg}
            )
            real = chat.make_envelope(
                carol_sk, bytes.fromhex(bob), {"id": "g1", "from": carol, "to": bob, "date": now, "message": msg}
            )
            # members that are not keys: would break a reader's conversation list
            bad_channel = {"id": "c1", "name": "x", "members": [carol, bob, 1]}
            poison = chat.make_envelope(
                carol_sk,
                bytes.fromhex(bob),
                {"id": "p1", "from": carol, "to": bob, "date": now, "message": msg, "channel": bad_channel},
            )
            async with g.web.stream("GET", "/events", headers=hb) as stream:
                events = SSE(stream)
                await node.call("put", path="/topics/__gossiping/f1", value=chat.dumps(forged))
                await node.call("put", path="/topics/__gossiping/e0", value=chat.dumps(poison))
                await node.call("put", path="/topics/__gossiping/g1", value=chat.dumps(real))
                ev = await events.next(timeout=10)
                assert ev["event"] == "dm" and ev["data"]["id"] == "g1" and ev["data"]["from"] == carol
            convs = result(await g.web.get("/dm", headers=hb))
            assert [(c["key"], [m["id"] for m in c["messages"]]) for c in convs] == [(carol, ["g1"])]
        node.daemon.stop()


async def test_two_plain_nodes_exchange_direct_messages_through_sync(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start_daemon(nursery, str(tmp_path / "a"))
        b = await start_daemon(nursery, str(tmp_path / "b"), peers=[a.address])
        await b.call("chat_friend_add", key=a.id)
        await a.call("chat_dm", key=b.id, text="node to node")

        async def received() -> list:
            return (await b.call("chat_dms"))["conversations"]

        with trio.fail_after(10):  # polled: the envelope arrives by sync, then is opened
            while not await received():
                await trio.sleep(0.02)
        convs = await received()
        assert convs[0]["key"] == a.id and [m["message"]["value"] for m in convs[0]["messages"]] == ["node to node"]
        sent = (await a.call("chat_dms"))["conversations"]
        assert sent[0]["key"] == b.id
        a.daemon.stop()
        b.daemon.stop()


async def test_a_store_failure_answers_500_and_the_gateway_goes_on(tmp_path):
    import sqlite3 as sq

    async with gateway(tmp_path, writer="thread") as g:  # the store of this process fails
        http = g.web
        assert result(await http.get("/health")) == "ok"
        _k, h = await login(http, "alice")
        store = g.node.store
        real_write = store.write
        calls = []

        def failing_write(*args, **kwargs):
            calls.append(1)
            raise sq.OperationalError("disk I/O error")

        store.write = failing_write
        try:
            err = result(await http.post("/topics/general", json={"data": "lost"}, headers=h), 500)
            assert "the store could not write" in err and "disk I/O error" in err
        finally:
            store.write = real_write
        assert calls
        p = result(await http.post("/topics/general", json={"data": "kept"}, headers=h))
        assert [m["id"] for m in result(await http.get("/topics/general", headers=h))] == [p["id"]]


async def test_head_answers_without_a_body_and_keeps_the_connection(tmp_path):
    async with gateway(tmp_path) as g:
        r = await g.web.head("/openapi.json")
        assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 100
        assert (await g.web.get("/openapi.json")).json()["openapi"].startswith("3.1")


async def test_concurrent_profile_updates_of_one_user_all_stay(tmp_path):
    async with gateway(tmp_path) as g:
        _k, h = await login(g.web, "alice")

        async def update(i: int) -> None:
            result(await g.web.post("/profile", json={"data": {f"k{i}": i}}, headers=h))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(update, i)
        prof = result(await g.web.get("/profile", headers=h))
        assert {k: v for k, v in prof.items() if k != "name"} == {f"k{i}": i for i in range(20)}


async def test_slow_or_oversized_request_heads_are_cut_off(tmp_path, monkeypatch):
    from pttd.gateway import server

    monkeypatch.setattr(server, "HEADER_TIMEOUT", 0.5)
    async with gateway(tmp_path) as g:
        host, port = g.http.removeprefix("http://").rsplit(":", 1)
        # one byte at a time, each well within the read timeout: cut off at the head deadline
        s = await trio.open_tcp_stream(host, int(port))
        await s.send_all(b"GET /health HTTP/1.1\r\n")
        with trio.fail_after(5):
            closed = False
            while not closed:
                try:
                    await s.send_all(b"X")
                    with trio.move_on_after(0.1):
                        closed = await s.receive_some(1024) == b""
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    closed = True
        await s.aclose()
        # a head larger than the limit, sent in one piece
        s = await trio.open_tcp_stream(host, int(port))
        await s.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        with trio.fail_after(5):
            answer = await s.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 431")
        await s.aclose()
        assert result(await g.web.get("/health")) == "ok"


async def test_adding_a_friend_delivers_their_envelopes_already_held(tmp_path):
    async with gateway(tmp_path, "gw1") as g1:
        async with gateway(tmp_path, "gw2", peers=[g1.address]) as g2:
            alice, ha = await login(g1.web, "alice")
            bob, hb = await login(g2.web, "bob")
            dave, hd = await login(g2.web, "dave")
            result(await g2.web.post("/friends", json={"data": alice}, headers=hb))  # gw2 follows alice's envelopes
            sent = result(await g1.web.post("/dm", json={"data": {"key": dave, "message": "early"}}, headers=ha))
            seq = await g1.node.db(lambda: g1.node.dd.repository(alice).head().seq)
            key = bytes.fromhex(alice)
            await wait_for(lambda: key in g2.node.follows and g2.node.follows[key].local_seq == seq, 10)
            assert result(await g2.web.get("/dm", headers=hd)) == []  # not dave's friend yet: not tried for him
            result(await g2.web.post("/friends", json={"data": alice}, headers=hd))
            with trio.fail_after(10):
                while not result(await g2.web.get("/dm", headers=hd)):
                    await trio.sleep(0.02)
            convs = result(await g2.web.get("/dm", headers=hd))
            assert [m["id"] for m in convs[0]["messages"]] == [sent["id"]]


async def test_failed_logins_are_rate_limited_per_account_and_per_address(tmp_path):
    async with gateway(tmp_path, login_failures_per_address=8) as g:
        http = g.web
        good = {"data": {"username": "ann", "password": "the right one"}}
        result(await http.post("/register", json=good))
        bad = {"data": {"username": "ann", "password": "a wrong one"}}
        for _ in range(5):
            assert "wrong" in result(await http.post("/login", json=bad), 401)
        r = await http.post("/login", json=bad)  # the 6th inside the window
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0 and "too many" in r.json()["error"]
        r = await http.post("/login", json=good)  # the account is closed for the window, even to its password
        assert r.status_code == 429
        # per address: failures on other accounts from this address count too (8 here)
        for i in range(3):
            other = {"data": {"username": f"nobody{i}", "password": "whatever1"}}
            assert result(await http.post("/login", json=other), 401)
        r = await http.post("/login", json={"data": {"username": "someone", "password": "whatever1"}})
        assert r.status_code == 429 and "address" in r.json()["error"]


async def test_failed_logins_sent_at_once_get_no_more_tries(tmp_path):
    """Attempts all passed the limit while the first were being checked (40 guesses
    sent at once were 40 answers of 401, none 429)."""
    async with gateway(tmp_path, login_failures_per_address=100) as g:
        good = {"data": {"username": "ann", "password": "the right one"}}
        result(await g.web.post("/register", json=good))
        statuses = []

        async def guess(i: int) -> None:
            r = await g.web.post("/login", json={"data": {"username": "ann", "password": f"guess number {i}"}})
            statuses.append(r.status_code)

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(guess, i)
        assert sorted(statuses) == [401] * 5 + [429] * 15
        assert (await g.web.post("/login", json=good)).status_code == 429
        # a success uncounts its own attempt from the address: another account logs in
        # after it as often as it likes
        other = {"data": {"username": "bob", "password": "bob's password"}}
        result(await g.web.post("/register", json=other))
        for _ in range(3):
            result(await g.web.post("/login", json=other))
        assert len(g.gateway._failed_addresses._seen.get("127.0.0.1", ())) == 5


async def test_bring_your_own_key_login(tmp_path, monkeypatch):
    from nacl.signing import SigningKey

    from pttd.gateway import service

    async with trio.open_nursery() as nursery:
        own = await start_daemon(nursery, str(tmp_path / "own"))  # the user's own node
        await own.call("chat_post", topic="mine", text="from my own node")
        async with gateway(tmp_path, peers=[own.address]) as g:
            http = g.web
            sk = own.node.identity
            key = own.id

            async def challenge() -> dict:
                return result(await http.get("/login/challenge", params={"key": key}))

            def signed(c: dict, signer=sk) -> dict:
                return {
                    "key": key,
                    "nonce": c["nonce"],
                    "signature": signer.sign(bytes.fromhex(c["sign"])).signature.hex(),
                }

            c = await challenge()
            res = result(await http.post("/login", json={"data": signed(c)}))
            assert res["key"] == key
            h = {"Authorization": f"Bearer {res['token']}"}
            assert result(await http.get("/me", headers=h)) == key
            # replayed, by another key, expired: refused, and nothing made
            assert "challenge" in result(await http.post("/login", json={"data": signed(c)}), 401)
            c2 = await challenge()
            assert "signature" in result(
                await http.post("/login", json={"data": signed(c2, SigningKey.generate())}), 401
            )
            # challenges are not stored: asking for many more than MAX_CHALLENGES fills
            # nothing, and a nonce altered (its expiry, say) is refused
            monkeypatch.setattr(service, "MAX_CHALLENGES", 5)
            many = [await challenge() for _ in range(20)]
            forged = dict(many[0], nonce=many[0]["nonce"][:32] + "ff" * 8 + many[0]["nonce"][48:])
            forged["sign"] = g.gateway.challenge_message(bytes.fromhex(key), forged["nonce"]).hex()
            assert "challenge" in result(await http.post("/login", json={"data": signed(forged)}), 401)
            assert result(await http.post("/login", json={"data": signed(many[-1])}))["key"] == key
            monkeypatch.setattr(service, "CHALLENGE_TTL", -1)
            c3 = await challenge()
            assert "expired" in result(await http.post("/login", json={"data": signed(c3)}), 401)
            # reads work (the gateway follows the repository from the owner's node)
            with trio.fail_after(10):  # 404 "no version yet" until the first sync
                while (r := await http.get("/topics", headers=h)).status_code != 200 or r.json()["result"] != ["mine"]:
                    await trio.sleep(0.02)
            # writes are refused with a clear error: the gateway holds no secret key
            err = result(await http.post("/topics/mine", json={"data": "via the gateway"}, headers=h), 403)
            assert "your own node" in err
            # a hosted user writes to them: what only their key opens is refused as
            # such (it was a 500 once a message had come), and their live stream
            # passes over the message it cannot open (it broke off there, at every resume)
            _bob, hb = await login(http, "bob")
            result(await http.post("/dm", json={"data": {"key": key, "message": "hello"}}, headers=hb))
            for path in ("/dm", "/friends", "/pchannels"):
                assert "your own node" in result(await http.get(path, headers=h), 403)
            dms = {"data": {"members": [_bob], "message": "hi"}}
            assert "your own node" in result(await http.post("/dms", json=dms, headers=h), 403)
            from pttd.gateway import http as gw_http

            monkeypatch.setattr(gw_http, "KEEPALIVE", 0.1)
            with trio.fail_after(10):
                async with http.stream("GET", "/events", headers={**h, "Last-Event-ID": "0"}) as stream:
                    lines = stream.aiter_lines()
                    seen = []
                    async for line in lines:
                        seen.append(line)
                        if line == ": keepalive":
                            break
            assert "event: dm" not in seen and seen[:2] == ["retry: 1000", "id: 0"]
        own.daemon.stop()


async def test_new_users_by_key_login_are_limited_per_client_address(tmp_path):
    """Each key login by a new key makes a user and a repository the gateway follows: at
    most key_accounts_per_address of them from one address within login_window (anyone
    could make thousands a minute); a key already hosted logs in as before."""
    from nacl.signing import SigningKey

    async with gateway(tmp_path, key_accounts_per_address=2) as g:

        async def key_login(sk: SigningKey):
            key = sk.verify_key.encode().hex()
            c = result(await g.web.get("/login/challenge", params={"key": key}))
            sig = sk.sign(bytes.fromhex(c["sign"])).signature.hex()
            return await g.web.post("/login", json={"data": {"key": key, "nonce": c["nonce"], "signature": sig}})

        keys = [SigningKey.generate() for _ in range(3)]
        assert [(await key_login(k)).status_code for k in keys[:2]] == [200, 200]
        third = await key_login(keys[2])
        assert third.status_code == 429 and int(third.headers["Retry-After"]) > 0
        assert "too many new users by key login for this address" in third.json()["error"]
        assert (await key_login(keys[0])).status_code == 200  # known: not a new user
        users = [u["name"] for u in await g.gateway.list_users()]
        assert f"key:{keys[2].verify_key.encode().hex()}" not in users and len(users) == 2


async def test_login_sessions_refresh_and_logout(tmp_path):
    async with gateway(tmp_path) as g:
        http = g.web
        creds = {"data": {"username": "ann", "password": "the right one"}}
        first = result(await http.post("/register", json=creds))
        assert first["expires_in"] == 900 and first["refresh_token"]
        h = {"Authorization": f"Bearer {first['token']}"}
        renewed = result(await http.post("/refresh", json={"data": {"refresh_token": first["refresh_token"]}}))
        assert renewed["key"] == first["key"] and renewed["refresh_token"] != first["refresh_token"]
        assert result(await http.get("/me", headers={"Authorization": f"Bearer {renewed['token']}"})) == first["key"]
        # the same refresh retried at once (its answer was lost): the same answer
        retried = result(await http.post("/refresh", json={"data": {"refresh_token": first["refresh_token"]}}))
        assert retried == renewed
        # once the new one is used, the old one used again: the session is revoked (it was copied)
        renewed = result(await http.post("/refresh", json={"data": {"refresh_token": renewed["refresh_token"]}}))
        again = await http.post("/refresh", json={"data": {"refresh_token": first["refresh_token"]}})
        assert again.status_code == 401 and "used already" in again.json()["error"]
        assert "logged out" in result(
            await http.get("/me", headers={"Authorization": f"Bearer {renewed['token']}"}), 401
        )
        assert "session has ended" in result(
            await http.post("/refresh", json={"data": {"refresh_token": renewed["refresh_token"]}}), 401
        )
        # logout ends one session, not the others
        a = result(await http.post("/login", json=creds))
        b = result(await http.post("/login", json=creds))
        ha, hb = ({"Authorization": f"Bearer {x['token']}"} for x in (a, b))
        assert result(await http.post("/logout", headers=ha)) is True
        assert "logged out" in result(await http.get("/me", headers=ha), 401)
        assert result(await http.get("/me", headers=hb)) == first["key"]
        assert result(await http.post("/refresh", json={"data": {"refresh_token": a["refresh_token"]}}), 401)
        assert "not a refresh token" in result(await http.post("/refresh", json={"data": {"refresh_token": 5}}), 400)
        del h


async def test_ended_login_sessions_are_removed_while_the_gateway_runs(tmp_path, monkeypatch):
    """Sessions whose tokens have all expired leave the store, and the revoked ones the
    memory, every SESSION_PRUNE_EVERY (both grew with each login and logout until a
    restart); a live session, and a logged-out one not yet ended, stay."""
    from pttd.gateway import service

    monkeypatch.setattr(service, "SESSION_PRUNE_EVERY", 0.05)
    async with gateway(tmp_path) as g:
        gw, store = g.gateway, g.node.store
        creds = {"data": {"username": "cy", "password": "long enough"}}
        old = result(await g.web.post("/register", json=creds))
        live = result(await g.web.post("/login", json=creds))
        for s_ in (old, live):
            assert result(await g.web.post("/logout", headers={"Authorization": f"Bearer {s_['token']}"})) is True
        sid_old, sid_live = (s_["refresh_token"].split(".")[0] for s_ in (old, live))
        assert {sid_old, sid_live} <= gw._revoked
        ended = int(time.time() - gw.cfg.token_ttl) - 10  # its last token expired too
        await g.node.db(store.execute, "UPDATE gw_sessions SET expires=? WHERE id=?", (ended, sid_old))
        await wait_for(lambda: sid_old not in gw._revoked)
        rows = await g.node.db(store.query, "SELECT id FROM gw_sessions")
        assert [r[0] for r in rows] == [sid_live] and sid_live in gw._revoked


async def test_a_refresh_retried_after_the_grace_period_revokes_the_session(tmp_path, monkeypatch):
    from pttd.gateway import service

    monkeypatch.setattr(service, "REFRESH_GRACE", 0.0)
    async with gateway(tmp_path) as g:
        first = result(await g.web.post("/register", json={"data": {"username": "bo", "password": "long enough"}}))
        renewed = result(await g.web.post("/refresh", json={"data": {"refresh_token": first["refresh_token"]}}))
        again = await g.web.post("/refresh", json={"data": {"refresh_token": first["refresh_token"]}})
        assert again.status_code == 401 and "used already" in again.json()["error"]
        assert "session has ended" in result(
            await g.web.post("/refresh", json={"data": {"refresh_token": renewed["refresh_token"]}}), 401
        )


async def test_changing_a_password_ends_the_other_sessions(tmp_path):
    async with gateway(tmp_path) as g:
        creds = {"data": {"username": "cy", "password": "first password"}}
        a = result(await g.web.post("/register", json=creds))
        b = result(await g.web.post("/login", json=creds))
        ha, hb = ({"Authorization": f"Bearer {x['token']}"} for x in (a, b))
        change = {"data": {"password": "first password", "new_password": "second password"}}
        wrong = {"data": {"password": "not it at all", "new_password": "second password"}}
        assert "current password is wrong" in result(await g.web.post("/password", json=wrong, headers=ha), 403)
        short = {"data": {"password": "first password", "new_password": "short"}}
        assert "8-1024" in result(await g.web.post("/password", json=short, headers=ha), 400)
        assert result(await g.web.post("/password", json=change, headers=ha)) == {"sessions_ended": 1}
        assert result(await g.web.get("/me", headers=ha)) == a["key"]  # this session goes on
        assert "logged out" in result(await g.web.get("/me", headers=hb), 401)  # the other ended
        assert result(await g.web.post("/login", json=creds), 401)
        new = {"data": {"username": "cy", "password": "second password"}}
        assert result(await g.web.post("/login", json=new))["key"] == a["key"]
        # the operator's reset (pttctl user passwd) ends every session
        assert (await g.call("user_passwd", name="cy", password="third password"))["sessions_ended"] == 2
        assert "logged out" in result(await g.web.get("/me", headers=ha), 401)
        with pytest.raises(PttError, match="no user 'nobody'"):
            await g.call("user_passwd", name="nobody", password="whatever123")
        # an account without a password login cannot get one this way
        _, ht = await login(g.web, "tess")
        assert "without a password" in result(await g.web.post("/password", json=change, headers=ht), 403)
        # nor one an operator added with --no-password (with a token an operator tool made):
        # it was 403 "the current password is wrong", counted as a failed login
        bot = await g.gateway.add_user("bot", None, None)
        hbot = {"Authorization": f"Bearer {g.gateway.issue_token(bot)}"}
        err = result(await g.web.post("/password", json=change, headers=hbot), 403)
        assert "without a password" in err and "pttctl user passwd" in err


async def test_rotating_the_token_key_logs_nobody_out_at_once(tmp_path):
    async with gateway(tmp_path) as g:
        http = g.web
        creds = {"data": {"username": "ann", "password": "the right one"}}
        before = result(await http.post("/register", json=creds))
        old = {"Authorization": f"Bearer {before['token']}"}
        rotated = await g.call("token_rotate")
        assert rotated["previous_accepted_for_seconds"] == 960
        after = result(await http.post("/login", json=creds))
        assert jwt.get_unverified_header(after["token"])["kid"] == rotated["kid"]
        assert jwt.get_unverified_header(before["token"])["kid"] != rotated["kid"]
        assert result(await http.get("/me", headers=old)) == before["key"]  # still good
        # once the old key's tokens have expired, it is refused; a refresh gives a new one
        g.gateway.key.old_until = 0
        assert "not valid" in result(await http.get("/me", headers=old), 401)  # remembered, yet refused
        fresh = result(await http.post("/refresh", json={"data": {"refresh_token": before["refresh_token"]}}))
        hf = {"Authorization": f"Bearer {fresh['token']}"}
        assert result(await http.get("/me", headers=hf)) == before["key"]
        # two rotations: a token of the key before the previous one is refused at once,
        # though it was used (and remembered) just before; its logout is 401, not a 500
        await g.call("token_rotate")
        assert result(await http.get("/me", headers=hf)) == before["key"]
        await g.call("token_rotate")
        assert "not valid" in result(await http.get("/me", headers=hf), 401)
        assert "not valid" in result(await http.post("/logout", headers=hf), 401)


def test_a_direct_message_dated_beyond_what_a_browser_holds_is_not_shown():
    """An envelope's message dated past 8.64e15 ms (2**53 passed before) made the
    reader's drawing of the conversation throw: it is not opened."""
    from pttd.gateway import chat

    s, r = "a" * 64, "b" * 64
    dm = {"from": s, "to": r, "id": "x1", "message": "hi"}
    assert chat._well_formed_dm({**dm, "date": 8_640_000_000_000_000}, s, r)
    assert not chat._well_formed_dm({**dm, "date": 9_000_000_000_000_000}, s, r)


async def test_a_first_post_in_a_topic_while_the_users_stream_opens_joins_it_to_that_topic(tmp_path):
    """A stream read its user's topics before it was registered: the user's first post in
    a topic, dispatched in between, never added that topic, and the stream missed every
    later post there (a second tab opening while the first posts)."""
    import threading

    async with gateway(tmp_path) as g:
        alice, ha = await login(g.web, "alice")
        _, hb = await login(g.web, "bob")
        result(await g.web.post("/topics/T", json={"data": "bob first"}, headers=hb))
        result(await g.web.post("/topics/U", json={"data": "alice elsewhere"}, headers=ha))
        store, gw = g.gateway.store, g.gateway
        last = gw.last_event_id()  # resumed from here: nothing is left out as "before now"
        querying, dispatched = threading.Event(), threading.Event()
        real_query, real_dispatch = store.query, gw._dispatch

        def query(sql, params=()):
            rows = real_query(sql, params)
            if sql.startswith("SELECT topic FROM gw_topics"):
                querying.set()
                assert dispatched.wait(10)  # alice's first post in T goes out meanwhile
            return rows

        def dispatch(events):
            real_dispatch(events)
            if any(e.kind == "post" and e.topic == "T" and e.body["author"] == alice for e in events):
                dispatched.set()

        store.query, gw._dispatch = query, dispatch
        got = []

        async def listen() -> None:
            async with g.web.stream("GET", "/events", headers={**ha, "Last-Event-ID": str(last)}) as stream:
                events = SSE(stream)
                while len(got) < 2:
                    got.append(await events.next())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            await wait_for(querying.is_set)
            result(await g.web.post("/topics/T", json={"data": "alice joins"}, headers=ha))
            store.query = real_query
            await wait_for(lambda: got)
            result(await g.web.post("/topics/T", json={"data": "bob again"}, headers=hb))
        assert [e["data"]["post"]["message"]["value"] for e in got] == ["alice joins", "bob again"]


async def test_a_login_with_a_bad_friend_makes_no_user_and_names_the_field(tmp_path):
    """The friend of a login was checked after the login, which makes the user at the
    first one: refused with 400, the user was made all the same (and for a key login
    counted toward the address's limit); one's own key was named data.key."""
    async with gateway(tmp_path) as g:
        bad = {"data": {"id": "dave", "friend": "not a key"}}
        assert "data.friend: must be a repository key" in result(await g.web.post("/test-login", json=bad), 400)
        assert await g.gateway.list_users() == []
        dave, _ = await login(g.web, "dave")
        own = {"data": {"id": "dave", "friend": dave}}
        assert result(await g.web.post("/test-login", json=own), 400) == "data.friend: is your own key"


async def test_the_sender_of_a_direct_message_gets_it_on_their_own_streams_live_and_resumed(tmp_path):
    """dm events went to the recipient only: the sender's other tabs and devices never
    showed what they sent until a reload. The event is opened again on a resumed stream
    from the envelope between sender and recipient."""
    async with gateway(tmp_path) as g:
        alice, ha = await login(g.web, "alice")
        bob, hb = await login(g.web, "bob")
        last = g.gateway.last_event_id()
        async with g.web.stream("GET", "/events", headers=ha) as stream:
            events = SSE(stream)
            sent = result(await g.web.post("/dm", json={"data": {"key": bob, "message": "from my phone"}}, headers=ha))
            ev = await events.next()
            assert ev["event"] == "dm" and ev["data"]["id"] == sent["id"] and ev["data"]["to"] == bob
        async with g.web.stream("GET", "/events", headers={**ha, "Last-Event-ID": str(last)}) as stream:
            ev = await SSE(stream).next()
            assert ev["event"] == "dm" and ev["data"]["message"]["value"] == "from my phone"
