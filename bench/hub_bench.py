"""Hub benchmark: building the combined view, the latency of a delta, and the bytes a
stream carries per new message.

    python bench/hub_bench.py            # 1,000 repositories x 100 messages; 500 posts
    python bench/hub_bench.py --quick    # 200 x 50; 100 posts

Prints one JSON object on stdout (progress on stderr):
  build    a hub data directory holding N joined repositories of M messages each (over
           20 topics) is started: seconds until the view is built (the hub's own log
           line) and until it answers, and the hub's peak resident memory (VmHWM);
           baseline: the seconds the same process takes to read every one of those
           entries from its store (the view's input), measured in the same run.
  latency  a gateway and a hub (separate processes, loopback); a user of the gateway
           joined; a hub client on /events; the user posts P messages one after the
           other: ms from each post's HTTP answer to the update event naming it, p50/p99.
  bytes    100 clients on /events; new messages posted to a topic of 10 messages and to
           one of 1,000: bytes each client receives per new message (should not depend
           on the topic's size).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import httpx  # noqa: E402
import trio  # noqa: E402

from bench.daemon_proc import Proc  # noqa: E402
from pttd.datadir import DataDir  # noqa: E402
from pttd.gateway import chat  # noqa: E402
from pttd.repo import Repository  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_hub_dir(path: str, repos: int, messages: int) -> int:
    """A hub data directory with ``repos`` joined repositories already synced."""
    dd = DataDir.init(path)
    entries = 0
    try:
        rows = []
        for r in range(repos):
            repo = Repository.create(dd.store, dd.keys)
            with repo.batch() as b:
                b.put("/profile.json", chat.dumps({"name": f"user {r}"}))
                for i in range(messages):
                    topic = f"topic{i % 20}"
                    mid = f"{1700000000000 + r * 1000 + i:013d}-{r:08x}"
                    post = {
                        "id": mid,
                        "topic": topic,
                        "date": 1700000000000 + i * 1000 + r,
                        "message": {"type": "text", "value": f"message {i} of {r}"},
                    }
                    b.put(f"/topics/{topic}/{mid}", chat.dumps(post))
            entries += messages + 1
            rows.append((repo.key, "[]", int(time.time())))
        with dd.store.write():
            for row in rows:
                dd.store.execute("INSERT INTO hub_joins(repo, addresses, joined) VALUES (?, ?, ?)", row)
    finally:
        dd.close()
    return entries


def read_all_baseline(path: str) -> float:
    """Seconds to read every entry under /profile.json and /topics/ of every repository."""
    dd = DataDir.open(path)
    try:
        t0 = time.perf_counter()
        n = 0
        for row in dd.store.list_repos():
            repo = Repository(dd.store, row, None)
            for _p, _v in repo.items("/topics/"):
                n += 1
            repo.value("/profile.json")
        return time.perf_counter() - t0
    finally:
        dd.close()


def bench_build(base: str, repos: int, messages: int) -> dict:
    path = os.path.join(base, "hubbuild")
    log(f"build: making {repos} repositories x {messages} messages ...")
    entries = make_hub_dir(path, repos, messages)
    baseline = read_all_baseline(path)
    hub = Proc(path, "hub")
    try:
        info = hub.info()
        ready = time.monotonic() - hub.started
        m = None
        for line in open(hub.log_path):
            m = re.search(r"hub view built from (\d+) repositories in ([\d.]+) s", line) or m
        built = float(m.group(2)) if m else None
        return {
            "repositories": repos,
            "messages_each": messages,
            "entries": entries,
            "view_built_seconds": built,
            "ready_seconds": round(ready, 2),
            "peak_rss_mb": round(hub.peak_mb(), 1),
            "baseline_read_all_seconds": round(baseline, 2),
            "build_vs_read_all": round(built / baseline, 2) if built and baseline else None,
            "http": info["http"][0],
        }
    finally:
        hub.stop()


async def sse_events(url: str, headers: dict, on_event) -> None:
    async with httpx.AsyncClient(timeout=None) as c:
        async with c.stream("GET", url, headers=headers) as r:
            ev: dict = {}
            async for line in r.aiter_lines():
                if line == "":
                    if "event" in ev:
                        on_event(ev)
                    ev = {}
                elif line.startswith("event:"):
                    ev["event"] = line[6:].strip()
                elif line.startswith("data:"):
                    ev["data"] = json.loads(line[5:].strip())


async def bench_latency(base: str, posts: int) -> dict:
    gw = Proc(os.path.join(base, "gw"), "gateway", "--config", _config(base, "[gateway]\ntest_login = true\n"))
    hub = Proc(os.path.join(base, "hub"), "hub")
    try:
        gi, hi = gw.info(), hub.info()
        async with (
            httpx.AsyncClient(base_url=gi["http"][0], timeout=30) as g,
            httpx.AsyncClient(base_url=hi["http"][0], timeout=30) as h,
        ):
            res = (await g.post("/test-login", json={"data": {"id": "bench"}})).json()["result"]
            auth = {"Authorization": f"Bearer {res['token']}"}
            r = await h.post("/join", json={"public_key": res["key"], "addresses": gi["listen"]})
            assert r.status_code == 200, r.text
            seen: dict[str, float] = {}
            arrived = trio.Event()

            def on_event(ev):
                if ev["event"] == "update":
                    for m in ev["data"]["messages"]:
                        seen.setdefault(m["id"], time.perf_counter())
                    arrived.set()

            lat = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sse_events, hi["http"][0] + "/events", {}, on_event)
                await trio.sleep(0.5)
                log(f"latency: {posts} posts ...")
                for i in range(posts):
                    p = (await g.post("/topics/lat", json={"data": f"m{i}"}, headers=auth)).json()["result"]
                    answered = time.perf_counter()
                    with trio.fail_after(30):
                        while p["id"] not in seen:
                            await arrived.wait()
                            arrived = trio.Event()
                    lat.append((seen[p["id"]] - answered) * 1000)
                nursery.cancel_scope.cancel()
        lat.sort()
        return {
            "posts": posts,
            "p50_ms": round(statistics.median(lat), 1),
            "p99_ms": round(lat[int(len(lat) * 0.99)], 1),
            "max_ms": round(lat[-1], 1),
        }
    finally:
        gw.stop()
        hub.stop()


async def bench_bytes(base: str, clients: int) -> dict:
    gw = Proc(os.path.join(base, "gw2"), "gateway", "--config", _config(base, "[gateway]\ntest_login = true\n"))
    hub = Proc(os.path.join(base, "hub2"), "hub")
    try:
        gi, hi = gw.info(), hub.info()
        host, port = hi["http"][0].removeprefix("http://").rsplit(":", 1)
        async with (
            httpx.AsyncClient(base_url=gi["http"][0], timeout=30) as g,
            httpx.AsyncClient(base_url=hi["http"][0], timeout=30) as h,
        ):
            res = (await g.post("/test-login", json={"data": {"id": "bytes"}})).json()["result"]
            auth = {"Authorization": f"Bearer {res['token']}"}
            await h.post("/join", json={"public_key": res["key"], "addresses": gi["listen"]})
            log("bytes: filling topics of 10 and 1,000 messages ...")
            for topic, n in (("small", 10), ("large", 1000)):
                for i in range(n):
                    await g.post(f"/topics/{topic}", json={"data": f"{topic} {i:04d}"}, headers=auth)
            with trio.fail_after(120):
                while len((await h.get("/topics/large")).json()["result"]) < 1000:
                    await trio.sleep(0.2)
            received = [0] * clients

            async def client(i: int) -> None:
                s = await trio.open_tcp_stream(host, int(port))
                await s.send_all(b"GET /events HTTP/1.1\r\nHost: b\r\n\r\n")
                async with s:
                    while True:
                        data = await s.receive_some(65536)
                        if not data:
                            return
                        received[i] += len(data)

            out = {}
            async with trio.open_nursery() as nursery:
                for i in range(clients):
                    nursery.start_soon(client, i)
                await trio.sleep(2.0)  # the snapshots are sent
                for topic in ("small", "large"):
                    before = sum(received)
                    n = 20
                    for i in range(n):
                        await g.post(f"/topics/{topic}", json={"data": f"new {i:04d}"}, headers=auth)
                    with trio.fail_after(60):
                        while (
                            len((await h.get(f"/topics/{topic}")).json()["result"])
                            < (10 if topic == "small" else 1000) + n
                        ):
                            await trio.sleep(0.1)
                    await trio.sleep(1.0)  # the last deltas reach every client
                    out[topic] = round((sum(received) - before) / clients / n, 1)
                nursery.cancel_scope.cancel()
        return {
            "clients": clients,
            "bytes_per_client_per_message_topic_of_10": out["small"],
            "bytes_per_client_per_message_topic_of_1000": out["large"],
            "ratio_large_to_small": round(out["large"] / out["small"], 3) if out["small"] else None,
        }
    finally:
        gw.stop()
        hub.stop()


def _config(base: str, text: str) -> str:
    path = os.path.join(base, f"cfg{abs(hash(text))}.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repos", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=100)
    ap.add_argument("--posts", type=int, default=500)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.repos, args.messages, args.posts = 200, 50, 100
    base = tempfile.mkdtemp(prefix="pttd-hub-bench-")
    try:
        out = {"machine": {"cpus": os.cpu_count()}}
        out["build"] = bench_build(base, args.repos, args.messages)
        out["latency"] = trio.run(bench_latency, base, args.posts)
        out["bytes"] = trio.run(bench_bytes, base, args.clients)
        print(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
