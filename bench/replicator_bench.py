"""Replicator benchmark: full replication of many repositories, then live latency.

    python bench/replicator_bench.py           # 1,000 repositories x 100 messages
    python bench/replicator_bench.py --quick   # 200 x 50

An owner daemon (a node whose store holds N repositories of M messages each, over 20
topics) and a replicator daemon, separate processes on loopback. The replicator pins all
N (pttctl replicate through its control socket). Prints one JSON object:

  full     seconds until the replicator holds every version, entries/s, the replicator's
           peak resident memory; baseline: the same process reading every entry of
           those repositories from the owner's store (the work one side must do anyway)
  live     with all N followed live, one new message in a random repository at a time:
           ms from the owner's control put answering to the replicator holding that
           version (its control `wait` answering), p50 and p99 over --live-reps commits
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.daemon_proc import Proc  # noqa: E402
from pttd.datadir import DataDir  # noqa: E402
from pttd.gateway import chat  # noqa: E402
from pttd.repo import Repository  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_owner(path: str, repos: int, messages: int) -> list[str]:
    dd = DataDir.init(path)
    keys = []
    try:
        for r in range(repos):
            repo = Repository.create(dd.store, dd.keys)
            with repo.batch() as b:
                b.put("/profile.json", chat.dumps({"name": f"user {r}"}))
                for i in range(messages):
                    topic = f"topic{i % 20}"
                    mid = f"{1700000000000 + i:013d}-{r:08x}"
                    post = {
                        "id": mid,
                        "topic": topic,
                        "date": 1700000000000 + i,
                        "message": {"type": "text", "value": f"message {i} of {r}"},
                    }
                    b.put(f"/topics/{topic}/{mid}", chat.dumps(post))
            keys.append(repo.id)
    finally:
        dd.close()
    return keys


def read_all(path: str, keys: list[str]) -> float:
    dd = DataDir.open(path)
    try:
        t0 = time.perf_counter()
        for k in keys:
            for _ in dd.repository(k).items("/"):
                pass
        return time.perf_counter() - t0
    finally:
        dd.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repos", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=100)
    ap.add_argument("--live-reps", type=int, default=200)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.repos, args.messages, args.live_reps = 200, 50, 50
    base = tempfile.mkdtemp(prefix="pttd-rep-bench-")
    try:
        owner_dir = os.path.join(base, "owner")
        log(f"making {args.repos} repositories x {args.messages} messages ...")
        keys = make_owner(owner_dir, args.repos, args.messages)
        baseline = read_all(owner_dir, keys)
        owner = Proc(owner_dir, "node", log_level="WARNING")
        rep = Proc(os.path.join(base, "rep"), "replicator", "--peer", owner.info()["listen"][0], log_level="WARNING")
        try:
            heads = {k: owner.call("log", repo=k, limit=1)["versions"][0]["version"] for k in keys}
            log("pinning ...")
            t0 = time.perf_counter()
            for k in keys:
                rep.call("replicate", repo=k)
            for k in keys:
                rep.call("wait", repo=k, version=heads[k], timeout=600)
            full = time.perf_counter() - t0
            entries = args.repos * (args.messages + 1)
            out = {
                "machine": {"cpus": os.cpu_count()},
                "full": {
                    "repositories": args.repos,
                    "messages_each": args.messages,
                    "seconds": round(full, 2),
                    "entries_per_s": round(entries / full),
                    "replicator_peak_rss_mb": round(rep.peak_mb(), 1),
                    "baseline_read_all_at_owner_seconds": round(baseline, 2),
                },
            }
            log(f"full: {full:.1f} s; live: {args.live_reps} commits ...")
            lat = []
            rnd = random.Random(1)
            # the owner's own repository is the only one its control socket writes: write
            # to the others through the store is not possible while it runs, so the live
            # commits go to the owner's own repository, pinned too
            own = owner.call("id")["repository"]
            rep.call("replicate", repo=own)
            v = owner.call("log", limit=1)["versions"][0]["version"]
            rep.call("wait", repo=own, version=v, timeout=60)
            for i in range(args.live_reps):
                res = owner.call("put", path=f"/topics/live/{i:06d}-{rnd.getrandbits(32):08x}", value=b"x" * 200)
                t = time.perf_counter()
                rep.call("wait", repo=own, version=res["version"], timeout=30)
                lat.append((time.perf_counter() - t) * 1000)
            lat.sort()
            out["live"] = {
                "commits": len(lat),
                "pinned_repositories_live": args.repos + 1,
                "p50_ms": round(statistics.median(lat), 2),
                "p99_ms": round(lat[int(len(lat) * 0.99)], 2),
            }
            print(json.dumps(out, indent=2))
        finally:
            rep.stop()
            owner.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
