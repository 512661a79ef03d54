"""What the gateway serves for the web client: the page, /gateway.json, files."""

from __future__ import annotations

import os
import time

import httpx
import pytest
import trio
from nacl.signing import SigningKey

from pttd.errors import PttError
from tests.gwutil import gateway, login, result
from tests.netutil import start_daemon, wait_for

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)


async def test_the_page_is_served_with_a_strict_policy(tmp_path):
    async with gateway(tmp_path, hub_url="http://127.0.0.1:9989") as g:
        r = await g.web.get("/")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self' http://127.0.0.1:9989" in csp
        again = await g.web.get("/", headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304
        assert result(await g.web.get("/app/no-such-file.js"), 404)
        answer = await g.web.get("/gateway.json")
        assert answer.headers["x-content-type-options"] == "nosniff"  # JSON is never sniffed as a page
        info = result(answer)
        assert info["hub"] == "http://127.0.0.1:9989"
        assert info["login"] == {"password": True, "register": True, "key": True, "test_login": True, "oidc": []}


async def test_files_upload_and_download(tmp_path):
    async with gateway(tmp_path, max_file=100_000) as g:
        alice, ha = await login(g.web, "alice")
        bob, hb = await login(g.web, "bob")
        f = result(await g.web.post("/files", params={"name": "cat.png"}, content=PNG, headers=ha))
        assert f["key"] == alice and f["size"] == len(PNG) and f["type"] == "image/png"
        assert f["name"] == "cat.png" and f["url"] == f"/files/{alice}/{f['id']}"
        # the same bytes again: the same id (stored once)
        assert result(await g.web.post("/files", content=PNG, headers=ha))["id"] == f["id"]

        r = await g.web.get(f["url"], headers=hb)  # any logged-in user may read it
        assert r.status_code == 200 and r.content == PNG
        assert r.headers["content-type"] == "image/png"
        assert "content-disposition" not in r.headers

        # a page claiming to be anything is sent as a download, never rendered
        html = b"<html><script>alert(1)</script></html>"
        h = result(await g.web.post("/files", params={"name": "x.html"}, content=html, headers=ha))
        assert h["type"] == "application/octet-stream"
        r = await g.web.get(h["url"], params={"name": "x.html"}, headers=hb)
        assert r.content == html and r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-disposition"].startswith('attachment; filename="x.html"')
        assert "sandbox" in r.headers["content-security-policy"]

        # and token in the query (an <img src>) works
        token = hb["Authorization"].split()[1]
        assert (await g.web.get(f["url"], params={"token": token})).status_code == 200

        assert "larger than 100000" in result(await g.web.post("/files", content=b"x" * 100_001, headers=ha), 413)
        assert "empty" in result(await g.web.post("/files", content=b"", headers=ha), 400)
        assert "slashes" in result(await g.web.post("/files", params={"name": "a/b"}, content=b"x", headers=ha), 400)
        assert result(await g.web.get(f["url"]), 401)
        assert "32 hex" in result(await g.web.get(f"/files/{alice}/nothex", headers=hb), 400)
        assert "no file" in result(await g.web.get(f"/files/{alice}/{'0' * 32}", headers=hb), 404)
        # nothing was stored by the refused uploads: the user's files are the two
        me = await g.call("ls", prefix="/files/", repo=alice)
        assert len(me["entries"]) == 2
        # a control client that leaves the prefix out lists everything; diff says what it lacks
        everything = await g.call("ls", repo=alice)
        assert {e["path"] for e in everything["entries"]} >= {e["path"] for e in me["entries"]} | {"/profile.json"}
        with pytest.raises(PttError, match="two versions"):
            await g.call("diff", repo=alice)


async def test_hosted_users_join_the_hub_and_files_cross_gateways(tmp_path, monkeypatch):
    from pttd.gateway import service

    monkeypatch.setattr(service, "FILE_FETCH_TIMEOUT", 1.0)
    async with trio.open_nursery() as nursery:
        hub = await start_daemon(nursery, os.path.join(tmp_path, "hub"), mode="hub")
        async with (
            gateway(tmp_path, "g1", hubs=[hub.address]) as g1,
            gateway(tmp_path, "g2", hubs=[hub.address], max_file=20_000) as g2,
            httpx.AsyncClient(base_url=hub.http, timeout=10.0) as hubweb,
        ):
            alice, ha = await login(g1.web, "alice")
            bob, hb = await login(g2.web, "bob")
            f = result(await g1.web.post("/files", params={"name": "cat.png"}, content=PNG, headers=ha))
            post = {"type": "file", "value": {k: f[k] for k in ("id", "key", "name", "size", "type")}}
            result(await g1.web.post("/topics/general", json={"data": post}, headers=ha))
            # the login joined alice to the hub: her post shows in its combined view
            with trio.fail_after(10):
                while True:
                    view = result(await hubweb.get("/topics/general"))
                    if any(m["message"]["type"] == "file" for m in view):
                        break
                    await trio.sleep(0.05)
            # bob's gateway has never stored alice's repository: it finds her through the hub
            r = await g2.web.get(f["url"], headers=hb)
            assert r.status_code == 200, r.text
            assert r.content == PNG
            # a later file: bob's gateway now holds an older version of alice's repository,
            # and asks for a newer one rather than answering that the file is not there
            later = result(await g1.web.post("/files", params={"name": "b.bin"}, content=b"later file", headers=ha))
            r = await g2.web.get(later["url"], headers=hb)
            assert r.status_code == 200 and r.content == b"later file", r.text
            assert "no file" in result(await g2.web.get(f"/files/{alice}/{'0' * 32}", headers=hb), 404)
            # a file larger than bob's gateway serves: refused before its bytes are fetched
            big = result(await g1.web.post("/files", content=os.urandom(50_000), headers=ha))
            assert "more than 20000" in result(await g2.web.get(big["url"], headers=hb), 413)
            # a key no one serves: 404 in bounded time
            nobody = bytes(SigningKey.generate().verify_key).hex()
            assert "not found on the network" in result(
                await g2.web.get(f"/files/{nobody}/{'1' * 32}", headers=hb), 404
            )
            # the repositories followed to read files are few: the least recently used go
            monkeypatch.setattr(service, "ON_DEMAND_FOLLOWS", 1)
            other = bytes(SigningKey.generate().verify_key).hex()
            assert result(await g2.web.get(f"/files/{other}/{'2' * 32}", headers=hb), 404)
            assert bytes.fromhex(nobody) not in g2.node.follows and bytes.fromhex(alice) not in g2.node.follows
            # one that was let go (its older version held) is found again through the hub
            newest = result(await g1.web.post("/files", content=b"newest file", headers=ha))
            r = await g2.web.get(newest["url"], headers=hb)
            assert r.status_code == 200 and r.content == b"newest file", r.text
            nursery.cancel_scope.cancel()


async def test_sealed_files_for_direct_messages(tmp_path):
    async with gateway(tmp_path) as g:
        alice, ha = await login(g.web, "alice")
        bob, hb = await login(g.web, "bob")
        f = result(await g.web.post("/files", params={"name": "secret.png", "sealed": "1"}, content=PNG, headers=ha))
        assert f["type"] == "image/png" and f["size"] == len(PNG) and len(f["secret"]) == 64
        # the repository holds only ciphertext: without the secret, no image comes back
        raw = await g.web.get(f["url"], headers=hb)
        assert raw.status_code == 200 and PNG[8:200] not in raw.content
        assert raw.headers["content-type"] == "application/octet-stream"
        opened = await g.web.get(f["url"], headers={**hb, "X-File-Secret": f["secret"]})
        assert opened.status_code == 200 and opened.content == PNG
        assert opened.headers["content-type"] == "image/png"
        assert opened.headers["cache-control"] == "private, no-store" and raw.headers["vary"] == "X-File-Secret"
        # the secret travels inside the encrypted direct message
        msg = {"type": "file", "value": {k: f[k] for k in ("id", "key", "name", "size", "type", "secret")}}
        result(await g.web.post("/dm", json={"data": {"key": bob, "message": msg}}, headers=ha))
        conv = result(await g.web.get("/dm", params={"key": alice}, headers=hb))
        assert conv[0]["messages"][-1]["message"]["value"]["secret"] == f["secret"]
        wrong = {**hb, "X-File-Secret": "ab" * 32}
        assert "does not open" in result(await g.web.get(f["url"], headers=wrong), 400)
        assert "64 hex" in result(await g.web.get(f["url"], headers={**hb, "X-File-Secret": "zz"}), 400)
        assert "must be 1 or 0" in result(
            await g.web.post("/files", params={"sealed": "yes"}, content=b"x", headers=ha), 400
        )


async def test_a_user_who_left_a_hub_is_not_joined_again(tmp_path):
    async with trio.open_nursery() as nursery:
        hub = await start_daemon(nursery, os.path.join(tmp_path, "hub"), mode="hub")
        joined = hub.daemon.hub.joined
        async with gateway(tmp_path, "g1", hubs=[hub.address]) as g1:
            alice, _ = await login(g1.web, "alice")
            with trio.fail_after(10):
                while alice not in joined:
                    await trio.sleep(0.02)
            # she leaves the hub (signed with her key, which this gateway holds)
            sk = (await g1.gateway.user(bytes.fromhex(alice))).repo._key
            now = int(time.time() * 1000)
            msg = b"pttd hub leave\n" + bytes.fromhex(hub.id) + bytes.fromhex(alice) + now.to_bytes(8, "big")
            leave = {"public_key": alice, "signature": sk.sign(msg).signature.hex(), "time": now}
            async with httpx.AsyncClient(base_url=hub.http, timeout=10.0) as hubweb:
                assert result(await hubweb.post("/leave", json=leave))["joined"] is False
        # the gateway restarts; she logs in again, and a new user too
        async with gateway(tmp_path, "g1", hubs=[hub.address]) as g1:
            assert (await login(g1.web, "alice"))[0] == alice
            bob, _ = await login(g1.web, "bob")
            with trio.fail_after(10):
                while bob not in joined:
                    await trio.sleep(0.02)
            assert alice not in joined
        nursery.cancel_scope.cancel()


async def test_bodies_held_at_once_are_bounded_over_all_connections(tmp_path):
    """Each connection could hold a body up to its limit, all at once: 1,024 uploads of
    16 MiB each, from four addresses, were 16 GiB in memory. Past bodies_in_memory
    (together) a request is 503 with Retry-After; a body given up frees its share; a
    body announced and not sent holds nothing (else a few idle uploads would refuse
    every post)."""
    mib = 1 << 20
    async with gateway(tmp_path, max_file=2 * mib, bodies_in_memory=5 * mib // 2) as g:
        _, ha = await login(g.web, "alice")
        host, port = g.http.removeprefix("http://").rsplit(":", 1)
        head = (
            f"POST /files?name=big HTTP/1.1\r\nHost: x\r\nAuthorization: {ha['Authorization']}\r\n"
            f"Content-Length: {2 * mib}\r\n\r\n"
        )
        idle = [await trio.open_tcp_stream(host, int(port)) for _ in range(4)]
        for s in idle:  # 8 MiB announced, none of it sent
            await s.send_all(head.encode())
        assert result(await g.web.post("/topics/t", json={"data": "still posting"}, headers=ha))
        stalled = await trio.open_tcp_stream(host, int(port))
        await stalled.send_all(head.encode() + b"x" * (3 * mib // 2))  # the rest never comes
        await wait_for(lambda: g.gateway.bodies.used == 3 * mib // 2)
        r = await g.web.post("/files", params={"name": "cat.png"}, content=os.urandom(mib + 1), headers=ha)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "try again" in r.json()["error"]
        assert result(await g.web.post("/files", content=PNG, headers=ha))["name"] == "file"  # a small one fits
        await stalled.aclose()  # the client gave up: its share is free again
        await wait_for(lambda: g.gateway.bodies.used == 0)
        assert result(await g.web.post("/files", content=os.urandom(mib + 1), headers=ha))["size"] == mib + 1
        for s in idle:
            await s.aclose()


async def test_one_user_holds_at_most_two_of_the_remote_file_fetches(tmp_path, monkeypatch):
    """Files of repositories not held are fetched 8 at a time, and one client could hold
    all 8 (each up to 20 s): now at most 2 per user; the others' go on meanwhile."""
    async with gateway(tmp_path) as g:
        _, ha = await login(g.web, "alice")
        _, hb = await login(g.web, "bob")
        inside: list[str] = []
        release = trio.Event()

        async def slow_fetch(key, fid, path, limit):  # a peer that takes its time
            inside.append(fid)
            await release.wait()
            return b"the file " + fid.encode()

        monkeypatch.setattr(g.gateway, "_fetch_file", slow_fetch)
        elsewhere = bytes(SigningKey.generate().verify_key).hex()  # a repository not held here
        answers = {}

        async def get(fid: str, h: dict) -> None:
            answers[fid] = await g.web.get(f"/files/{elsewhere}/{fid}", headers=h)

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(get, f"{i:032x}", ha)
            await wait_for(lambda: len(inside) == 2)
            nursery.start_soon(get, "b" * 32, hb)
            await wait_for(lambda: "b" * 32 in inside)  # bob's goes in beside alice's two
            assert len(inside) == 3
            release.set()
        assert sorted(inside) == sorted([f"{i:032x}" for i in range(5)] + ["b" * 32])
        assert all(r.status_code == 200 for r in answers.values())
        assert g.gateway._remote_reads_of == {}  # nothing kept once done
