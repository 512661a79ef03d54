"""Hub mode with real daemons: joins, the combined view, live deltas, rebuilding."""

from __future__ import annotations

import os
import time

import httpx
import trio
from nacl.signing import SigningKey

from tests.gwutil import SSE, gateway, login, result
from tests.netutil import start_daemon, wait_for


class HubClient:
    def __init__(self, running):
        self.running = running
        self.web = httpx.AsyncClient(base_url=running.http, timeout=10.0)

    async def join(self, key: str, address: str) -> None:
        r = await self.web.post("/join", json={"public_key": key, "addresses": [address]})
        assert r.status_code == 200, r.text

    async def view(self, topic: str, **params) -> list[dict]:
        return result(await self.web.get(f"/topics/{topic}", params=params))


async def start_hub(nursery, tmp_path, name: str = "hub", **hub_options) -> HubClient:
    r = await start_daemon(nursery, os.path.join(tmp_path, name), mode="hub", hub=hub_options)
    return HubClient(r)


async def next_update(events: SSE, topic: str, timeout: float = 10.0) -> dict:
    with trio.fail_after(timeout):
        while True:
            ev = await events.next(timeout)
            if ev["event"] == "update" and ev["data"]["topic"] == topic:
                return ev


async def wait_view(hub: HubClient, topic: str, predicate, timeout: float = 10.0, **params) -> list[dict]:
    with trio.fail_after(timeout):  # polled: the view follows syncs it is not told of here
        while True:
            msgs = await hub.view(topic, **params)
            if predicate(msgs):
                return msgs
            await trio.sleep(0.02)


def summary(msgs: list[dict]) -> list[tuple]:
    return [
        (m["author"], m["id"], m["message"]["value"], m["name"], [r["emoji"] for r in m["reactions"]]) for m in msgs
    ]


async def test_two_gateways_one_hub_combined_view_and_deltas(tmp_path):
    async with gateway(tmp_path, "g1") as g1, gateway(tmp_path, "g2") as g2:
        alice, ha = await login(g1.web, "alice")
        bob, hb = await login(g2.web, "bob")
        mod, hm = await login(g1.web, "mod")
        async with trio.open_nursery() as nursery:
            hub = await start_hub(nursery, tmp_path, moderators=[mod])
            about = result(await hub.web.get("/hub.json"))
            assert about["moderators"] == [mod] and about["joined"] == 0
            async with hub.web.stream("GET", "/events") as stream:
                events = SSE(stream)
                first = await events.next()
                assert first["event"] == "snapshot" and first["data"]["topics"] == {}
                await hub.join(alice, g1.address)
                await hub.join(bob, g2.address)
                await hub.join(mod, g1.address)
                pa = result(await g1.web.post("/topics/general", json={"data": "hello from alice"}, headers=ha))
                ev = await next_update(events, "general")
                assert [(m["author"], m["id"], m["name"]) for m in ev["data"]["messages"]] == [
                    (alice, pa["id"], "alice")
                ]
                pb = result(await g2.web.post("/topics/general", json={"data": "hi from bob"}, headers=hb))
                ev = await next_update(events, "general")
                assert [m["id"] for m in ev["data"]["messages"]] == [pb["id"]]
                # a reaction attaches to its message: the message is sent again with it
                react = {"data": {"msgID": pa["id"], "emoji": "👍", "author": alice}}
                result(await g2.web.post("/topics/general/reactions", json=react, headers=hb))
                ev = await next_update(events, "general")
                assert [(m["id"], [r["emoji"] for r in m["reactions"]]) for m in ev["data"]["messages"]] == [
                    (pa["id"], ["👍"])
                ]
                # an edit replaces
                result(await g1.web.put(f"/topics/general/{pa['id']}", json={"data": "edited"}, headers=ha))
                ev = await next_update(events, "general")
                assert [m["message"]["value"] for m in ev["data"]["messages"]] == ["edited"]
                # a deletion removes
                result(await g2.web.delete(f"/topics/general/{pb['id']}", headers=hb))
                ev = await next_update(events, "general")
                assert ev["data"]["removed"] == [{"author": bob, "id": pb["id"]}] and ev["data"]["messages"] == []
                # the hub's moderator hides alice's message: removed from everyone's view
                hide = {"data": {"msgID": pa["id"], "author": alice}}
                result(await g1.web.post("/topics/general/moderation", json=hide, headers=hm))
                ev = await next_update(events, "general")
                assert ev["data"]["removed"] == [{"author": alice, "id": pa["id"]}]
            assert await hub.view("general") == []
            # bob's own moderation hides only for bob as the reader
            pc = result(await g1.web.post("/topics/general", json={"data": "visible"}, headers=ha))
            await wait_view(hub, "general", lambda ms: [m["id"] for m in ms] == [pc["id"]])
            result(await g2.web.post("/topics/general/moderation", json={"data": {"msgID": pc["id"]}}, headers=hb))
            await wait_view(hub, "general", lambda ms: ms == [], reader=bob)
            assert [m["id"] for m in await hub.view("general")] == [pc["id"]]
            profiles = result(await hub.web.get("/profiles"))
            assert {k: v["name"] for k, v in profiles.items()} == {alice: "alice", bob: "bob", mod: "mod"}
            topics = result(await hub.web.get("/topics"))
            assert [t["id"] for t in topics] == ["general"]
            before = await hub.view("general")

            # a restarted hub rebuilds the same view from the stored repositories
            hub.running.daemon.stop()
            await hub.running.stopped.wait()
            await hub.web.aclose()
            hub = await start_hub(nursery, tmp_path, moderators=[mod])  # same data directory and config
            assert summary(await hub.view("general")) == summary(before)
            # a new hub, joined later by the same users, builds the same view (switching
            # hubs loses nothing)
            other = await start_hub(nursery, tmp_path, name="hub2", moderators=[mod])
            for key, g in ((alice, g1), (bob, g2), (mod, g1)):
                await other.join(key, g.address)
            await wait_view(other, "general", lambda ms: summary(ms) == summary(before))
            for h in (hub, other):
                h.running.daemon.stop()
                await h.web.aclose()


async def test_joins_are_checked_and_a_bad_repository_does_not_break_the_view(tmp_path):
    async with gateway(tmp_path, "g1") as g1:
        alice, ha = await login(g1.web, "alice")
        async with trio.open_nursery() as nursery:
            hub = await start_hub(nursery, tmp_path, join_token="sesame", max_message_bytes=200, max_repos=1)
            web = hub.web
            assert "token" in result(await web.post("/join", json={"public_key": alice}), 403)
            assert "public_key" in result(await web.post("/join", json={"public_key": "xx", "token": "sesame"}), 400)
            bad_addr = {"public_key": alice, "addresses": ["nowhere"], "token": "sesame"}
            assert "addresses[0]" in result(await web.post("/join", json=bad_addr), 400)
            assert "no such route" in result(await web.get("/nope"), 404)
            assert "not allowed" in result(await web.get("/join"), 405)
            ok = {"data": {"public_key": alice, "addresses": [g1.address], "token": "sesame"}}  # the wrapped shape too
            assert result(await web.post("/join", json=ok))["joined"] is True
            other = bytes(SigningKey.generate().verify_key).hex()
            full = await web.post("/join", json={"public_key": other, "token": "sesame"})
            assert full.status_code == 403 and "full" in full.json()["error"]  # max_repos = 1
            big = result(await g1.web.post("/topics/t", json={"data": "x" * 500}, headers=ha))
            small = result(await g1.web.post("/topics/t", json={"data": "fits"}, headers=ha))
            msgs = await wait_view(hub, "t", lambda ms: len(ms) >= 1)
            assert [m["id"] for m in msgs] == [small["id"]] and big["id"] not in [m["id"] for m in msgs]
            # leaving takes the repository's signature (or the hub's join token): not anyone's word
            assert "signature" in result(await web.post("/leave", json={"public_key": alice}), 403)
            forged = {"public_key": alice, "signature": "00" * 64}
            assert "signature" in result(await web.post("/leave", json={**forged, "time": 1}), 403)
            sk = (await g1.gateway.user(bytes.fromhex(alice))).repo._key
            hub_key = bytes.fromhex(result(await web.get("/hub.json"))["key"])

            def signed_leave(when: int) -> dict:
                msg = b"pttd hub leave\n" + hub_key + bytes.fromhex(alice) + when.to_bytes(8, "big")
                return {"public_key": alice, "signature": sk.sign(msg).signature.hex(), "time": when}

            now = int(time.time() * 1000)
            assert "more than 300 s ago" in result(await web.post("/leave", json=signed_leave(now - 400_000)), 403)
            assert "30 s ahead" in result(await web.post("/leave", json=signed_leave(now + 60_000)), 403)
            no_time = {k: v for k, v in signed_leave(now).items() if k != "time"}
            assert "time it was signed" in result(await web.post("/leave", json=no_time), 403)
            leave = signed_leave(now)
            assert result(await web.post("/leave", json=leave))["joined"] is False
            assert await hub.view("t") == []
            # joined again: the same signed leave, replayed, is refused
            assert result(await web.post("/join", json=ok))["joined"] is True
            assert "before the repository's latest join" in result(await web.post("/leave", json=leave), 403)
            assert result(await web.post("/leave", json=signed_leave(int(time.time() * 1000) + 5)))["joined"] is False
            assert "has not joined" in result(
                await web.post("/leave", json={"public_key": alice, "token": "sesame"}), 404
            )
            hub.running.daemon.stop()
            await web.aclose()


async def test_join_over_the_wire_and_rendezvous_lead_a_third_daemon_to_a_repository(tmp_path):
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, tmp_path)
        owner = await start_daemon(nursery, str(tmp_path / "owner"))
        await owner.call("chat_post", topic="general", text="found through the hub")
        await owner.call("put", path="/files/notes", value=b"not for hubs")  # outside a hub's prefixes
        res = await owner.call("join", hub=hub.running.address)
        assert res["joined"] and res["repository"] == owner.id
        msgs = await wait_view(hub, "general", lambda ms: len(ms) == 1)
        assert msgs[0]["author"] == owner.id and msgs[0]["message"]["value"] == "found through the hub"
        # a third daemon knows only the key and the hub: it finds the owner and syncs
        third = await start_daemon(nursery, str(tmp_path / "third"), hubs=[hub.running.address])
        head = (await owner.call("log", limit=1))["versions"][0]["version"]
        await third.call("follow", repo=owner.id)
        await third.call("wait", repo=owner.id, version=head, timeout=15)
        got = await third.call("ls", repo=owner.id, prefix="/")
        # /files/ is not on the hub: it came from the owner, dialed at the address the hub gave
        assert any(p.id.hex() == owner.id for p in third.node.peers)
        assert "/files/notes" in [e["path"] for e in got["entries"]]
        # a refused join is a clear error
        other = await start_hub(nursery, tmp_path, name="closed", join_token="sesame")
        try:
            await owner.call("join", hub=other.running.address)
        except Exception as exc:
            assert "needs a join token" in str(exc)
        else:
            raise AssertionError("a join without the token was accepted")
        assert (await owner.call("join", hub=other.running.address, token="sesame"))["joined"]
        for r in (hub.running, owner, third, other.running):
            r.daemon.stop()
        await hub.web.aclose()
        await other.web.aclose()


async def test_the_hub_stream_resumes_from_last_event_id_or_sends_a_new_snapshot(tmp_path):
    async with gateway(tmp_path, "g1") as g1:
        alice, ha = await login(g1.web, "alice")
        async with trio.open_nursery() as nursery:
            hub = await start_hub(nursery, tmp_path)
            await hub.join(alice, g1.address)
            async with hub.web.stream("GET", "/events") as stream:
                events = SSE(stream)
                assert (await events.next())["event"] == "snapshot"
                p1 = result(await g1.web.post("/topics/t", json={"data": "one"}, headers=ha))
                ev = await next_update(events, "t")
                assert [m["id"] for m in ev["data"]["messages"]] == [p1["id"]]
                last = ev["id"]
            missed = []
            for text in ("two", "three"):
                missed.append(result(await g1.web.post("/topics/t", json={"data": text}, headers=ha))["id"])
            await wait_view(hub, "t", lambda ms: len(ms) == 3)
            async with hub.web.stream("GET", "/events", headers={"Last-Event-ID": last}) as stream:
                events = SSE(stream)
                got = []
                while len(got) < 2:
                    ev = await events.next()
                    assert ev["event"] in ("update", "profiles"), ev["event"]  # no snapshot again
                    if ev["event"] == "update":
                        got += [m["id"] for m in ev["data"]["messages"]]
                assert got == missed
            # an id from another run of the hub (or too old), or no id it made: a new snapshot
            epoch = last.partition("-")[0]
            for bad in ("0000-1", f"{epoch}-{'1' * 5000}"):  # the second was a 500 (int() of 5,000 digits)
                async with hub.web.stream("GET", "/events", headers={"Last-Event-ID": bad}) as stream:
                    ev = await SSE(stream).next()
                    assert ev["event"] == "snapshot" and len(ev["data"]["topics"]["t"]) == 3
            hub.running.daemon.stop()
            await hub.web.aclose()


async def test_a_repository_announced_to_a_hub_is_found_without_a_join(tmp_path):
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, tmp_path)
        server = await start_daemon(nursery, str(tmp_path / "server"), hubs=[hub.running.address])
        await server.call("put", path="/notes", value=b"announced, never joined")
        version = (await server.call("log", limit=1))["versions"][0]["version"]
        seeker = await start_daemon(nursery, str(tmp_path / "seeker"), hubs=[hub.running.address])
        await seeker.call("follow", repo=server.id)
        await seeker.call("wait", repo=server.id, version=version, timeout=15)
        assert result(await hub.web.get("/hub.json"))["joined"] == 0
        # what a peer announced is forgotten when its session ends
        key = bytes.fromhex(server.id)
        assert hub.running.daemon.hub.lookup(key)
        server.daemon.stop()
        await server.stopped.wait()
        with trio.fail_after(10):
            while hub.running.daemon.hub.lookup(key):
                await trio.sleep(0.02)
        for r in (hub.running, seeker):
            r.daemon.stop()
        await hub.web.aclose()


async def test_joins_arriving_together_keep_to_the_limit_and_a_leave_waits_for_a_join(tmp_path):
    """Joins and leaves are taken one at a time: thirty joins at once fill a hub of two
    and no more (all passed the check before any was counted), and a leave that comes
    while a join is under way removes it after, instead of the join re-following and
    re-viewing a repository that has left."""
    keys = [SigningKey.generate().verify_key.encode().hex() for _ in range(31)]
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, tmp_path, join_token="sesame", max_repos=2)
        statuses: list[int] = []

        async def join(k: str) -> None:
            r = await hub.web.post("/join", json={"public_key": k, "token": "sesame"})
            statuses.append(r.status_code)

        async with trio.open_nursery() as joins:
            for k in keys[:30]:
                joins.start_soon(join, k)
        assert sorted(statuses) == [200, 200] + [403] * 28
        assert result(await hub.web.get("/hub.json"))["joined"] == 2
        for k in list(hub.running.daemon.hub.joined):
            result(await hub.web.post("/leave", json={"public_key": k, "token": "sesame"}))

        svc = hub.running.daemon.hub
        entered, release = trio.Event(), trio.Event()
        real_follow = svc._follow

        async def slow_follow(k, addresses):
            entered.set()
            await release.wait()
            await real_follow(k, addresses)

        svc._follow = slow_follow
        last = keys[30]
        with trio.fail_after(10):
            async with trio.open_nursery() as both:
                both.start_soon(join, last)
                await entered.wait()
                left = []

                async def leave() -> None:
                    left.append(await hub.web.post("/leave", json={"public_key": last, "token": "sesame"}))

                both.start_soon(leave)
                await trio.testing.wait_all_tasks_blocked(0.05)
                release.set()
        assert statuses[-1] == 200 and left[0].status_code == 200
        assert last not in svc.joined and bytes.fromhex(last) not in svc.node.follows
        assert result(await hub.web.get("/hub.json"))["joined"] == 0
        await hub.web.aclose()
        hub.running.daemon.stop()


async def test_the_hub_reads_only_what_its_view_takes_of_a_repository(tmp_path):
    """A repository of one 20 KiB value at 3,000 paths the view ignores (stored once: a
    few MB) made the hub hold 3,000 copies of it at every read (~1 GB for 20,000
    paths); messages past the view's limit were read too. Now neither is read."""
    import json

    from pttd.hub.view import Oversized

    def post(topic: str, i: int) -> bytes:
        return json.dumps({"date": i, "message": {"type": "text", "value": f"m{i}"}, "topic": topic}).encode()

    def fill(dd, start: int, drop: int = 0) -> None:
        repo = dd.repository()
        junk = os.urandom(20 * 1024)
        with repo.batch() as b:
            for i in range(start, start + 1500):
                b.put(f"/topics/junk/x/{i:07}", junk)  # no path of the chat schema
                b.put(f"/topics/junk/{i:07}", junk)  # a message, too large for the view
            for i in range(start, start + 15 if start == 0 else 0):  # skipped by the view: not JSON
                b.put(f"/topics/a/{i:07}", b"not json " * 8)
            for i in range(start, start + 30):
                b.put(f"/topics/t/{i:07}", post("t", i))
            for i in range(drop):
                b.delete(f"/topics/t/{i:07}")

    async with trio.open_nursery() as nursery:
        author = await start_daemon(nursery, str(tmp_path / "author"))
        hub = await start_hub(nursery, tmp_path, max_messages_per_repo=20, max_message_bytes=1000)
        hubd = hub.running.daemon
        await author.daemon.node.db(fill, author.daemon.node.dd, 0)
        await hub.join(author.id, author.address)
        shown = await wait_view(hub, "t", lambda ms: len(ms) == 20, timeout=30)
        assert [m["message"]["value"] for m in shown] == [f"m{i}" for i in range(20)]
        assert await hub.view("junk") == []
        entries, complete = await hubd.node.db(hubd.hub._read_repo, author.id)
        # twice what the view keeps (the 15 it skips do not hide the good ones after them)
        assert complete and len(entries) == 40
        assert not any(isinstance(v, Oversized) for _, v in entries)
        # a change larger than the view keeps of a repository is read as a first read is
        version = (await author.call("log", limit=1))["versions"][0]["version"]
        await author.daemon.node.db(fill, author.daemon.node.dd, 5000, 10)
        await author.daemon.node.publish(bytes.fromhex(author.id))
        after = (await author.call("log", limit=1))["versions"][0]["version"]
        assert after == version + 1
        f = hubd.node.follows[bytes.fromhex(author.id)]
        await wait_for(lambda: f.local_seq is not None and f.local_seq >= after, timeout=30)
        shown = await wait_view(hub, "t", lambda ms: ms and ms[0]["message"]["value"] == "m10", timeout=30)
        assert [m["message"]["value"] for m in shown] == [f"m{i}" for i in range(10, 30)]
        for r in (hub.running, author):
            r.daemon.stop()
        await hub.web.aclose()


async def test_a_strangers_join_cannot_push_the_owners_addresses_out(tmp_path):
    """A join proves nothing of the key: 8 addresses in a stranger's join again came
    first and cut the owner's off the list (kept across restarts), so the hub stopped
    syncing the repository and sent everyone who looked it up to the stranger's."""
    async with trio.open_nursery() as nursery:
        hub = await start_hub(nursery, tmp_path)
        owner = await start_daemon(nursery, str(tmp_path / "owner"))
        hubd = hub.running.daemon
        first = [f"127.0.0.1:{p}" for p in range(1, 9)]
        assert result(await hub.web.post("/join", json={"public_key": owner.id, "addresses": first}))["joined"]
        # the owner's own node joins over the wire: its handshake proves the key
        await owner.call("join", hub=hub.running.address)
        assert hubd.hub.joined[owner.id][0] == owner.address
        again = [f"127.0.0.1:{p}" for p in range(11, 19)]
        r = result(await hub.web.post("/join", json={"public_key": owner.id, "addresses": again}))
        assert r["addresses"][0] == owner.address and len(r["addresses"]) == 8
        assert owner.address in hubd.node.follows[bytes.fromhex(owner.id)].peers
        assert hubd.hub.lookup(bytes.fromhex(owner.id))[0] == owner.address
        await owner.call("chat_post", topic="general", text="still reached")
        await wait_view(hub, "general", lambda ms: len(ms) == 1, timeout=20)
        for r in (hub.running, owner):
            r.daemon.stop()
        await hub.web.aclose()
