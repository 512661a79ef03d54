"""Replicator mode with real daemons: pins, DMs while a gateway is down, channels."""

from __future__ import annotations

import os

import httpx
import pytest
import trio
from nacl.signing import SigningKey

from pttd.errors import PttError
from tests.gwutil import SSE, gateway, login, result
from tests.netutil import start_daemon, wait_for


async def head_of(g, key: str) -> int:
    repo = await g.node.db(g.node.dd.repository, key)
    return (await g.node.db(repo.head)).seq


async def test_a_dm_reaches_its_recipient_through_the_replicator_while_the_senders_gateway_is_down(tmp_path):
    async with trio.open_nursery() as nursery:
        rep = await start_daemon(nursery, os.path.join(tmp_path, "rep"), mode="replicator")
        async with gateway(tmp_path, "g2", peers=[rep.address], replicators=[rep.address]) as g2:
            bob, hb = await login(g2.web, "bob")
            carol, hc = await login(g2.web, "carol")
            async with gateway(tmp_path, "g1", peers=[rep.address]) as g1:
                alice, ha = await login(g1.web, "alice")
                result(await g2.web.post("/friends", json={"data": alice}, headers=hb))
                # the gateway asked its replicator to keep alice's repository
                await wait_for(lambda: bytes.fromhex(alice) in rep.daemon.replicator.pinned, 10)
                async with g2.web.stream("GET", "/events", headers=hb) as stream:
                    events = SSE(stream)
                    sent = result(
                        await g1.web.post("/dm", json={"data": {"key": bob, "message": "while I'm away"}}, headers=ha)
                    )
                    seq = await head_of(g1, alice)
                    await rep.call("wait", repo=alice, version=seq, timeout=10)  # the replicator has it
                    g1.daemon.stop()  # gateway 1 goes away
                    await g1.stopped.wait()
                    ev = await events.next(timeout=2.0)
                    assert ev["event"] == "dm" and ev["data"]["id"] == sent["id"]
                    assert ev["data"]["message"]["value"] == "while I'm away"
            assert result(await g2.web.get("/dm", headers=hc)) == []  # not carol's
            convs = result(await g2.web.get("/dm", headers=hb))
            assert [m["id"] for m in convs[0]["messages"]] == [sent["id"]]
            # alice's whole repository stays readable through the replicator
            reader = await start_daemon(nursery, os.path.join(tmp_path, "reader"), peers=[rep.address])
            await reader.call("follow", repo=alice)
            await reader.call("wait", repo=alice, version=seq, timeout=10)
            got = await reader.call("ls", repo=alice, prefix="/")
            assert "/profile.json" in [e["path"] for e in got["entries"]]
            status = await rep.call("status")
            pin = [p for p in status["pins"] if p["repository"] == alice][0]
            assert pin["version"] == seq and pin["lag"] == 0 and pin["last_sync"] is not None
            reader.daemon.stop()
        rep.daemon.stop()


async def test_a_private_channel_of_three_users_on_three_gateways(tmp_path):
    async with trio.open_nursery() as nursery:
        rep = await start_daemon(nursery, os.path.join(tmp_path, "rep"), mode="replicator")
        opts = {"peers": [rep.address], "replicators": [rep.address]}
        async with (
            gateway(tmp_path, "g1", **opts) as g1,
            gateway(tmp_path, "g2", **opts) as g2,
            gateway(tmp_path, "g3", **opts) as g3,
        ):
            users = [(g, *(await login(g.web, name))) for g, name in ((g1, "alice"), (g2, "bob"), (g3, "carol"))]
            for g, key, h in users:
                for _g, other, _h in users:
                    if other != key:
                        result(await g.web.post("/friends", json={"data": other}, headers=h))
            (ga, alice, ha), (gb, bob, hb), (gc, carol, hc) = users
            body = {"data": {"members": [bob, carol], "message": "the three of us", "name": "trio"}}
            result(await ga.web.post("/dms", json=body, headers=ha))

            async def channel(g, h) -> list:
                return [c for c in result(await g.web.get("/dm", headers=h)) if "channel" in c]

            for g, h in ((gb, hb), (gc, hc)):
                with trio.fail_after(15):
                    while not await channel(g, h):
                        await trio.sleep(0.05)
                (c,) = await channel(g, h)
                assert c["channel"]["name"] == "trio" and sorted(c["channel"]["members"]) == sorted([alice, bob, carol])
                assert [m["message"]["value"] for m in c["messages"]] == ["the three of us"]
        rep.daemon.stop()


async def test_a_replicator_restarted_mid_sync_resumes_and_limits_refuse_clearly(tmp_path):
    async with trio.open_nursery() as nursery:
        owner = await start_daemon(nursery, os.path.join(tmp_path, "owner"))
        big = os.urandom(6 << 20)
        path = os.path.join(tmp_path, "big.bin")
        with open(path, "wb") as f:
            f.write(big)
        await owner.call("put", path="/files/big", filename=path)
        seq = (await owner.call("log", limit=1))["versions"][0]["version"]
        rdir = os.path.join(tmp_path, "rep")
        rep = await start_daemon(nursery, rdir, mode="replicator", peers=[owner.address], replicator={"max_repos": 1})
        await rep.call("replicate", repo=owner.id)
        key = bytes.fromhex(owner.id)
        await wait_for(lambda: key in rep.node.follows and rep.node.follows[key].info()["fetched_blocks"] > 0, 10)
        rep.daemon.stop()  # mid-sync
        await rep.stopped.wait()
        rep = await start_daemon(nursery, rdir, mode="replicator", peers=[owner.address], replicator={"max_repos": 1})
        await rep.call("wait", repo=owner.id, version=seq, timeout=30)
        assert (await rep.call("verify"))["ok"]
        # limits: a second pin is refused, saying why; the old POST /load takes {"key"}
        other = (await owner.call("id"))["repository"]
        async with httpx.AsyncClient(base_url=rep.http, timeout=10) as web:
            assert result(await web.post("/load", json={"key": other}))["pinned"] is True  # already pinned: fine
            r = await web.post("/load", json={"key": bytes(SigningKey.generate().verify_key).hex()})
            assert r.status_code == 403 and "full" in r.json()["error"]
            assert "key" in result(await web.post("/load", json={"key": "nope"}), 400)
            assert [p["repository"] for p in result(await web.get("/pins"))] == [owner.id]
        # a pin is replicated whole: a follow cannot narrow it to some prefixes
        with pytest.raises(PttError, match="pinned here, so it is replicated whole"):
            await rep.call("follow", repo=owner.id, prefixes=["/files/"])
        assert (await rep.call("status"))["pins"][0]["prefixes"] == ["/"]
        assert (await rep.call("unreplicate", repo=owner.id))["pinned"] is False
        rep.daemon.stop()
        owner.daemon.stop()


async def test_pins_only_from_the_listed_pinners_and_with_the_load_token(tmp_path):
    async with trio.open_nursery() as nursery:
        trusted = await start_daemon(nursery, os.path.join(tmp_path, "trusted"))
        stranger = await start_daemon(nursery, os.path.join(tmp_path, "stranger"))
        rep = await start_daemon(
            nursery,
            os.path.join(tmp_path, "rep"),
            mode="replicator",
            replicator={"pinners": [trusted.id], "load_token": "sesame"},
        )
        wanted = bytes(SigningKey.generate().verify_key)
        assert "pinned" in await trusted.node.ask_to_pin(rep.address, wanted)
        refused = bytes(SigningKey.generate().verify_key)
        with pytest.raises(PttError, match="pinners"):
            await stranger.node.ask_to_pin(rep.address, refused)
        assert rep.daemon.replicator.pinned == {wanted}
        async with httpx.AsyncClient(base_url=rep.http, timeout=10.0) as web:
            other = bytes(SigningKey.generate().verify_key).hex()
            assert "token" in result(await web.post("/load", json={"key": other}), 403)
            assert "token" in result(await web.post("/load", json={"key": other, "token": "nope"}), 403)
            assert result(await web.post("/load", json={"key": other, "token": "sesame"}))["pinned"] is True
        assert len(rep.daemon.replicator.pinned) == 2
        nursery.cancel_scope.cancel()


async def test_pins_do_not_wait_for_a_hub_that_reads_nothing(tmp_path):
    """Each pin told the hubs all the replicator serves (up to 4,096 keys), under the
    lock every pin takes, one hub after another: a hub that read nothing could hold
    every pin up to send_timeout once its socket was full, and a thousand pins sent a
    thousand lists. The hubs are now told in the background, changes gathered, each
    hub apart."""
    from pttd.config import WireConfig
    from pttd.wire import Connection

    stalled_streams = []

    async def stalled_hub(stream):  # completes its handshake, then reads nothing
        conn = Connection(stream, WireConfig(), "stalled")
        await conn.establish(SigningKey.generate(), initiator=False, mode="hub")
        stalled_streams.append(conn)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, stalled_hub, listeners)
        stalled = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        hub = await start_daemon(nursery, os.path.join(tmp_path, "hub"), mode="hub")
        rep = await start_daemon(
            nursery, os.path.join(tmp_path, "rep"), mode="replicator", hubs=[stalled, hub.address], send_timeout=30.0
        )
        await wait_for(lambda: stalled_streams and len(rep.node.peers) == 2, 10)
        told = []
        real = hub.daemon.hub.announce
        hub.daemon.hub.announce = lambda peer, repos, ports: (told.append(len(repos)), real(peer, repos, ports))
        keys = [bytes(SigningKey.generate().verify_key) for _ in range(40)]
        with trio.fail_after(10):
            for k in keys:
                await rep.call("replicate", repo=k.hex())
        # the hub that reads learns them all, in a few announcements, not forty
        await wait_for(lambda: all(hub.daemon.hub.lookup(k) for k in keys), 10)
        assert 1 <= len(told) <= 10 and told[-1] >= 40, told
        for r in (hub, rep):
            r.daemon.stop()
        nursery.cancel_scope.cancel()
