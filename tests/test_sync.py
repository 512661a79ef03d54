"""Sync between real daemons (trio tasks, 127.0.0.1, port 0)."""

from __future__ import annotations

import trio

from tests.netutil import daemons, wait_for


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
