"""Sync between real daemons (trio tasks, 127.0.0.1, port 0)."""

from __future__ import annotations

import logging
import os

import pytest
import trio

import pttd.fetch
import pttd.node
import pttd.peer
import pttd.store
from pttd.errors import PttError
from tests.netutil import daemons, start_daemon, wait_for


async def _put_many(d, n: int, prefix: str = "/f/", size: int = 100) -> None:
    def work():
        repo = d.node.dd.repository()
        with repo.batch() as b:
            for i in range(n):
                b.put(f"{prefix}{i:05d}", (f"{i}:" * size).encode()[:size])

    await d.node.db(work)
    await d.node.publish(d.node.id)


async def test_full_sync_and_live_update(tmp_path):
    async with daemons(tmp_path, 2) as (a, b):
        await _put_many(a, 500)
        await b.call("follow", repo=a.id, peers=[a.address])
        f = b.node.follows[a.node.id]
        await wait_for(lambda: f.local_seq == 1)
        assert (await b.call("ls", prefix="/f/", repo=a.id))["entries"].__len__() == 500
        await a.call("put", path="/f/new", value=b"hello live")
        await wait_for(lambda: f.local_seq == 2)
        got = await trio.to_thread.run_sync(lambda: b.node.dd.repository(a.id).get("/f/new"))
        assert got == b"hello live"


async def _tree_of(d, key_hex: str, prefix: str = "/") -> dict[str, bytes]:
    def work():
        r = d.node.dd.repository(key_hex)
        return {e.path: r.get(e.path) for e in r.list(prefix)}

    return await d.node.db(work)


async def _put_mixed(d) -> None:
    def work():
        repo = d.node.dd.repository()
        with repo.batch() as b:
            for i in range(300):
                b.put(f"/topics/general/{i:04d}", b"t" * 200 + str(i).encode())
            for i in range(300):
                b.put(f"/friends/{i:04d}", b"f" * 200 + str(i).encode())
            b.put("/profile.json", b'{"name": "a"}')

    await d.node.db(work)
    await d.node.publish(d.node.id)


async def test_sparse_sync_then_on_demand_read(tmp_path):
    async with daemons(tmp_path, 2) as (a, b):
        await _put_mixed(a)
        await b.call("follow", repo=a.id, peers=[a.address], prefixes=["/topics/"])
        f = b.node.follows[a.node.id]
        await wait_for(lambda: f.local_seq == 1)
        topics = await _tree_of(b, a.id, "/topics/")
        assert len(topics) == 300 and topics["/topics/general/0007"] == b"t" * 200 + b"7"
        fetched_sparse = f.fetched_bytes
        # Only the /topics/ subtrees came: about half of what a full copy holds.
        full_bytes = sum(len(v) + 1 for v in (await _tree_of(a, a.id)).values())
        assert fetched_sparse < 0.75 * full_bytes
        # A path outside the prefix is fetched on demand, in one get round trip.
        requests_before = sum(p.conn.bytes_out for p in b.node.peers)
        got = await b.call("get", path="/friends/0123", repo=a.id)
        assert got["size"] == 203
        value = await trio.to_thread.run_sync(lambda: b.node.dd.repository(a.id).get("/friends/0123"))
        assert value == b"f" * 200 + b"123"
        sent = sum(p.conn.bytes_out for p in b.node.peers) - requests_before
        assert sent < 1000  # one small get, no want batches
        # ...and the rest of /friends/ is still not here.
        listing = await trio.to_thread.run_sync(lambda: b.client.call("ls", {"prefix": "/topics/", "repo": a.id}))
        assert len(listing["entries"]) == 300


async def test_on_demand_reads_are_answered_at_once_and_kept(tmp_path):
    """Blocks fetched for on-demand reads are stored a moment later, several reads'
    together; they are readable meanwhile, and a daemon stopped before that stores them
    on its way out: what was read stays readable without the owner after a restart."""
    async with trio.open_nursery() as nursery:
        a = await start_daemon(nursery, os.path.join(tmp_path, "a"))
        b = await start_daemon(nursery, os.path.join(tmp_path, "b"))
        await _put_mixed(a)
        await b.call("follow", repo=a.id, peers=[a.address], prefixes=["/topics/"])
        await wait_for(lambda: b.node.follows[a.node.id].local_seq == 1)
        wanted = [f"/friends/{i:04d}" for i in (1, 150, 299)]
        for path in wanted[:2]:
            assert (await b.call("get", path=path, repo=a.id))["fetched"]["blocks"] > 0
        await b.node.fetched_stored()  # both reads' blocks, in one write
        got = await b.call("get", path=wanted[2], repo=a.id)
        assert "fetched" in got and b.node._later_rows  # answered, held, not yet stored
        await b.stop()
        await a.stop()
        b = await start_daemon(nursery, os.path.join(tmp_path, "b"))
        for path in wanted:
            got = await b.call("get", path=path, repo=a.id)
            assert "fetched" not in got
            value = await trio.to_thread.run_sync(lambda p=path: b.node.dd.repository(a.id).get(p))
            assert value == b"f" * 200 + str(int(path[-4:])).encode()
        b.daemon.stop()


async def test_replica_serves_while_owner_is_stopped_and_chain_converges(tmp_path):
    async with daemons(tmp_path, 3) as (a, b, c):
        await _put_many(a, 300)
        await b.call("follow", repo=a.id, peers=[a.address])
        fb = b.node.follows[a.node.id]
        await wait_for(lambda: fb.local_seq == 1)
        # C knows only B: A -> B -> C.
        await c.call("follow", repo=a.id, peers=[b.address])
        fc = c.node.follows[a.node.id]
        await wait_for(lambda: fc.local_seq == 1)
        # A live update travels along the chain.
        await a.call("put", path="/f/chain", value=b"x" * 500)
        await wait_for(lambda: fc.local_seq == 2)
        assert await _tree_of(c, a.id) == await _tree_of(a, a.id)
        # The owner stops; a newcomer D gets the repository from the replica B.
        await a.stop()
        async with daemons(tmp_path / "late", 1) as (d,):
            res = await d.call("sync", repo=a.id, peers=[b.address], timeout=20)
            assert res["version"] == 2
            assert (await _tree_of(d, a.id))["/f/chain"] == b"x" * 500


@pytest.mark.parametrize("flush_blocks", [20_000, 150])
async def test_cut_connection_resumes_without_refetching(tmp_path, monkeypatch, flush_blocks):
    # With 150, blocks are being written in the background when the cut comes.
    monkeypatch.setattr(pttd.fetch, "FLUSH_BLOCKS", flush_blocks)
    async with daemons(tmp_path, 2, want_batch=40, window=1) as (a, b):
        await _put_many(a, 2000)
        before, _ = await b.node.db(b.node.store.block_stats)
        await b.call("follow", repo=a.id, peers=[a.address])
        f = b.node.follows[a.node.id]
        await wait_for(lambda: f.progress is not None and f.progress.blocks >= 600)
        for p in list(b.node.peers):
            p.close("cut by the test")
        await wait_for(lambda: f.local_seq == 1, timeout=20)
        after, _ = await b.node.db(b.node.store.block_stats)
        assert f.fetched_blocks > 600
        # Every block fetched was new: nothing stored before the cut came again.
        assert f.fetched_blocks == after - before
        assert len(await _tree_of(b, a.id)) == 2000


async def test_follows_are_remembered_across_restarts(tmp_path):
    async with trio.open_nursery() as nursery:
        from tests.netutil import start_daemon

        a = await start_daemon(nursery, str(tmp_path / "a"))
        b = await start_daemon(nursery, str(tmp_path / "b"))
        await b.call("follow", repo=a.id, peers=[a.address], prefixes=["/f/"])
        await _put_many(a, 10)
        await wait_for(lambda: b.node.follows[a.node.id].local_seq == 1)
        await b.stop()
        b = await start_daemon(nursery, str(tmp_path / "b"))
        status = await b.call("status")
        assert [(x["repository"], x["prefixes"], x["peers"]) for x in status["follows"]] == [
            (a.id, ["/f/"], [a.address])
        ]
        await a.call("put", path="/f/after-restart", value=b"yes")
        await wait_for(lambda: b.node.follows[a.node.id].local_seq == 2)
        assert (await _tree_of(b, a.id, "/f/after-restart")) == {"/f/after-restart": b"yes"}
        nursery.cancel_scope.cancel()


async def test_large_value_and_duplicate_values_sync(tmp_path):
    big = os.urandom(12 << 20)  # more than one frame's worth of chunks

    async with daemons(tmp_path, 2) as (a, b):

        def work():
            with a.node.dd.repository().batch() as batch:
                batch.put("/big", big)
                batch.put("/x", b"s" * 100)
                batch.put("/y", b"s" * 100)  # the same value block twice

        await a.node.db(work)
        res = await b.call("sync", repo=a.id, peers=[a.address], timeout=60)
        assert res["version"] == 1
        got = await trio.to_thread.run_sync(lambda: b.node.dd.repository(a.id).get("/big"))
        assert got == big
        # A one-byte edit in the middle moves a few chunks, not the value.
        edited = big[: 6 << 20] + bytes([big[6 << 20] ^ 1]) + big[(6 << 20) + 1 :]
        await a.node.db(lambda: a.node.dd.repository().put("/big", edited))
        before = b.node.follows[a.node.id].fetched_bytes
        res = await b.call("sync", repo=a.id, peers=[a.address], timeout=60)
        assert res["version"] == 2
        assert b.node.follows[a.node.id].fetched_bytes - before < 128 << 10


async def test_bad_get_does_not_hurt_the_daemon(tmp_path, caplog):
    from tests.test_hostile import raw_connection

    async with daemons(tmp_path, 1) as (a,):
        await _put_many(a, 5)
        head = await a.call("log")
        root = bytes.fromhex(head["versions"][0]["root"])
        conn = await raw_connection(a.address)
        for i, path in enumerate(["not-a-path", "/", "/" + "é" * 600]):
            await conn.send({"t": "get", "id": i, "repo": a.node.id, "root": root, "path": path})
            answer = await conn.receive()
            assert answer["t"] == "blocks" and answer["missing"] == [root]
        await conn.aclose()
        assert (await a.call("status"))["node"] == a.id


async def test_wait_answers_when_the_version_arrives(tmp_path):
    async with daemons(tmp_path, 2) as (a, b):
        await _put_many(a, 3)
        await b.call("follow", repo=a.id, peers=[a.address])
        async with trio.open_nursery() as nursery:
            got = {}

            async def waiter():
                got["info"] = await b.call("wait", repo=a.id, version=2, timeout=20)

            nursery.start_soon(waiter)
            await wait_for(lambda: b.node.follows[a.node.id].local_seq == 1)
            assert "info" not in got  # version 1 is not enough
            await a.call("put", path="/f/next", value=b"v2")
        assert got["info"]["version"] == 2
        with pytest.raises(PttError, match=r"did not reach version 9 within 0.3 s \(holds version 2\)"):
            await b.call("wait", repo=a.id, version=9, timeout=0.3)


async def test_on_demand_read_while_the_path_changes(tmp_path, monkeypatch):
    """A read outside the prefix whose path is rewritten (and synced) while the read's
    get is on the wire answers from the version it fetched."""
    async with daemons(tmp_path, 2) as (a, b):

        def work():
            with a.node.dd.repository().batch() as batch:
                batch.put("/other/p", b"old" * 300)
                batch.put("/small/x", b"s" * 100)

        await a.node.db(work)
        await b.call("follow", repo=a.id, peers=[a.address], prefixes=["/small/"])
        f = b.node.follows[a.node.id]
        await wait_for(lambda: f.local_seq == 1)
        original = pttd.peer.Peer.request
        fired = []

        async def request(self, msg):
            if msg.get("t") == "get" and not fired and self.node is b.node:
                fired.append(1)
                await a.call("put", path="/other/p", value=b"new" * 300)
                await wait_for(lambda: f.local_seq == 2)
            return await original(self, msg)

        monkeypatch.setattr(pttd.peer.Peer, "request", request)
        got = await b.call("get", path="/other/p", repo=a.id)
        assert fired and got["version"] == 1 and got["size"] == 900


async def test_a_follower_of_small_updates_keeps_its_wal_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(pttd.store, "WAL_CHECKPOINT_BYTES", 1 << 20)
    async with daemons(tmp_path, 2) as (a, b):
        await a.call("put", path="/x/0", value=b"v" * 1000)
        await b.call("follow", repo=a.id, peers=[a.address])
        f = b.node.follows[a.node.id]
        await wait_for(lambda: f.local_seq == 1)
        for i in range(1, 25):  # ~330 KB of WAL each (64 KiB pages)
            await a.call("put", path=f"/x/{i}", value=os.urandom(20000))
            await wait_for(lambda i=i: f.local_seq == i + 1)
        await wait_for(lambda: b.node.store.wal_bytes() <= 1 << 20 and not b.node._checkpointing)


async def test_on_demand_read_of_a_value_in_several_pieces(tmp_path):
    """A value read on demand is answered from the fetched blocks; past the first piece
    the rest comes from the store, once they are written."""
    value = os.urandom(200_000)  # chunked; more than the first piece, few enough blocks
    async with daemons(tmp_path, 2) as (a, b):
        await a.node.db(lambda: a.node.dd.repository().put("/elsewhere/v", value))
        await a.call("put", path="/in/x", value=b"x" * 100)
        await b.call("follow", repo=a.id, peers=[a.address], prefixes=["/in/"])
        await wait_for(lambda: b.node.follows[a.node.id].local_seq == 2)
        pieces = []
        meta = await trio.to_thread.run_sync(
            lambda: b.client.call("get", {"path": "/elsewhere/v", "repo": a.id}, on_chunk=pieces.append)
        )
        # every chunk (at most 32 KiB each) came in the on-demand fetch
        assert b"".join(pieces) == value and meta["fetched"]["blocks"] > len(value) // 32768
        await b.node.fetched_stored()
        stored = await trio.to_thread.run_sync(lambda: b.node.dd.repository(a.id).get("/elsewhere/v"))
        assert stored == value


async def test_gc_gives_up_waiting_for_a_sync_that_does_not_end_and_syncs_go_on():
    """gc waits for the syncs under way (new ones wait behind it), but not for ever: a
    sync that a slow peer keeps alive made gc, and every sync after it, wait without
    end. After ALONE_TIMEOUT gc fails with a clear error and the waiting syncs start."""
    import trio.testing

    from pttd.node import SyncGate

    gate = SyncGate()
    release = trio.Event()
    started = []

    async def slow_sync() -> None:
        async with gate.sync():
            await release.wait()

    async def later_sync() -> None:
        async with gate.sync():
            started.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_sync)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            with pytest.raises(PttError, match="did not end within 0.2 s"):
                async with gate.alone(timeout=0.2):
                    raise AssertionError("gc ran beside a sync")
            nursery.start_soon(later_sync)
            await trio.testing.wait_all_tasks_blocked()
            assert started == [True] and not gate.exclusive
        release.set()
    async with gate.alone(timeout=0.2):  # nothing under way: at once
        assert gate.exclusive


async def test_gc_waits_for_a_value_being_read_through_the_daemon(tmp_path):
    """A value streamed piece by piece to a slow pttctl get lost its chunks to a gc that
    pruned its version meanwhile: the reader got part of it, then 'missing block'. gc
    now waits for the read (at most ALONE_TIMEOUT), and the reader gets it whole."""
    import trio.testing

    from pttd.control import ControlServer

    async with daemons(tmp_path, 1) as (d,):
        ctl = ControlServer(d.node, "", None)

        def put(value: bytes) -> None:
            d.node.dd.repository().put("/video", value)

        old = os.urandom(3 << 20)
        await d.node.db(put, old)
        got: list[bytes] = []
        first, release, gc_done = trio.Event(), trio.Event(), trio.Event()

        async def send(msg: dict) -> None:  # a client that reads its first piece, then waits
            if "chunk" in msg:
                got.append(msg["chunk"])
                if len(got) == 1:
                    first.set()
                    await release.wait()

        async def gc() -> None:
            await ctl.dispatch("gc", {"keep": 1}, send)
            gc_done.set()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ctl.dispatch, "get", {"path": "/video"}, send)
                await first.wait()
                await d.node.db(put, os.urandom(3 << 20))  # a new version: the old one pruned by gc
                nursery.start_soon(gc)
                await trio.testing.wait_all_tasks_blocked(0.2)
                assert not gc_done.is_set()  # waiting for the read
                release.set()
        assert gc_done.is_set() and b"".join(got) == old


def test_a_different_commit_at_the_held_seq_is_not_dropped_with_the_held_ones():
    """Offers of the held head cleared every offer, a different commit at the same seq
    (a fork's evidence) too, when one of the held head came first."""
    from types import SimpleNamespace

    from pttd.node import Follow, Node, Offer

    class FakePeer:
        reason = None
        conn = SimpleNamespace(closed=False)

    f = Follow(key=b"k" * 32, prefixes=["/"], peers=[])
    f.local_seq, f.local_hash = 10, b"A" * 32
    same, other = FakePeer(), FakePeer()
    f.offers[same] = Offer(SimpleNamespace(seq=10, address=b"A" * 32), {})
    f.offers[other] = Offer(SimpleNamespace(seq=10, address=b"B" * 32), {})
    best = Node._best_offer(None, f)
    assert best is not None and best[0] is other  # synced next: the fork is recorded
    del f.offers[other]
    assert Node._best_offer(None, f) is None and f.offers == {}  # only the held one: nothing to do


async def test_widening_a_follow_fetches_what_the_new_prefixes_cover_without_a_new_commit(tmp_path):
    """A follow's prefixes widened (a replicator pinning a repository followed sparsely,
    a gateway adding the envelopes' prefix) fetched nothing until the owner committed
    again: peers answered with the head already held. Nor did pttctl sync."""

    def friends_held(d, key: str) -> int:
        def count():
            repo = d.node.dd.repository(key)
            n = 0
            for path in [f"/friends/{i:04d}" for i in range(300)]:
                try:
                    repo.get(path)
                    n += 1
                except PttError:
                    pass
            return n

        return count

    async with trio.open_nursery() as nursery:
        a = await start_daemon(nursery, os.path.join(tmp_path, "a"))
        b = await start_daemon(nursery, os.path.join(tmp_path, "b"))
        c = await start_daemon(nursery, os.path.join(tmp_path, "c"))
        await _put_mixed(a)
        for d in (b, c):
            await d.call("follow", repo=a.id, peers=[a.address], prefixes=["/topics/"])
            await wait_for(lambda d=d: d.node.follows[a.node.id].local_seq == 1)
            assert await d.node.db(friends_held(d, a.id)) == 0
        # widened while the owner serves: fetched at once, at the same version
        await b.call("follow", repo=a.id, peers=[a.address], prefixes=["/"])
        f = b.node.follows[a.node.id]
        with trio.fail_after(15):
            while await b.node.db(friends_held(b, a.id)) < 300:
                await f.changed.wait()
        assert f.local_seq == 1 and not f.rewalk
        # widened while the owner is away, then a restart: pttctl sync completes it
        await a.stop()
        await c.call("follow", repo=a.id, peers=[a.address], prefixes=["/"])
        await c.stop()
        a = await start_daemon(nursery, os.path.join(tmp_path, "a"))
        c = await start_daemon(nursery, os.path.join(tmp_path, "c"), peers=[a.address])
        await c.call("sync", repo=a.id, peers=[a.address], timeout=15)
        assert await c.node.db(friends_held(c, a.id)) == 300
        assert (await c.call("log", repo=a.id, limit=1))["versions"][0]["version"] == 1
        for d in (a, b, c):
            d.daemon.stop()


async def test_a_peer_that_answers_slowly_gives_way_to_one_offering_the_same_version(tmp_path, monkeypatch, caplog):
    """A relay holding the newest head, answering each want with one block just inside
    request_timeout, held the repository's only sync for good (about a block a
    minute), an honest peer's offer of the same head waiting behind it."""
    from nacl.signing import SigningKey

    from pttd.config import WireConfig
    from pttd.wire import Connection

    monkeypatch.setattr(pttd.node, "SLOW_SYNC_CHECK", 1.0)
    caplog.set_level(logging.INFO, "pttd")
    async with daemons(tmp_path, 2, request_timeout=3.0) as (a, b):
        await _put_many(a, 3000, size=200)
        node = a.node

        async def trickle(stream):
            conn = Connection(stream, WireConfig(), "trickler")
            await conn.establish(SigningKey.generate(), initiator=False, mode="node")
            async with trio.open_nursery() as n:
                while True:
                    msg = await conn.receive()
                    if msg["t"] == "sub":
                        await conn.send(await node.db(node._head_message, msg["repo"], False))
                    elif msg["t"] == "ping":
                        await conn.send({"t": "pong", "id": msg["id"]})
                    elif msg["t"] == "want":

                        async def slow(m=msg):
                            await trio.sleep(2.5)  # just inside request_timeout, one block
                            blocks, _ = await node.db(node.store.get_blocks, m["hashes"][:1])
                            await conn.send({"t": "blocks", "id": m["id"], "blocks": blocks, "missing": []})

                        n.start_soon(slow)

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with trio.open_nursery() as n:
            n.start_soon(trio.serve_listeners, trickle, listeners)
            fake = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            await b.call("follow", repo=a.id, peers=[fake])
            f = b.node.follows[a.node.id]
            await wait_for(lambda: f.state == "syncing")
            await b.call("follow", repo=a.id, peers=[a.address])  # an honest peer with the same head
            await wait_for(lambda: f.local_seq == 1, timeout=20)
            assert await _tree_of(b, a.id) == await _tree_of(a, a.id)
            assert any("left for that one" in r.getMessage() for r in caplog.records)
            n.cancel_scope.cancel()
