"""Sync benchmark: two pttd daemons in separate processes over 127.0.0.1, beside
ceilings measured in the same run (these machines are shared and noisy: compare ratios).

    python bench/sync_bench.py                      # every scenario (about 10 minutes)
    python bench/sync_bench.py --quick              # smaller sizes, for a smoke run
    python bench/sync_bench.py --only full_small,incremental --reps 5
    python bench/sync_bench.py --hypercore hc.jsonl # also ratios to hypercore's figures
                                                    # (the output of anchors/hypercore/run.sh,
                                                    # run in the same sitting)
    python bench/sync_bench.py --compare out.json --hypercore hc.jsonl   # ratios only

Progress goes to stderr; one JSON object is printed on stdout at the end.

Scenarios (issue 3), each with an owner daemon and a fresh follower daemon:
  full_small   N x 1 KiB distinct values in one commit; the follower runs ``sync``:
               seconds, entries/s, MB/s, bytes on the wire, blocks. Ceilings: (a) the
               same bytes over a plain loopback socket between two processes, (b) a
               receive + blake3 + SQLite insert loop of N 1-KiB blocks (synchronous=FULL,
               our page size, a transaction per batch like the fetcher's).
  full_large   one 100 MiB random value; same figures and ceilings (b with blocks of
               the chunks' mean size).
  incremental  after full_small, the follower follows live; the owner writes one new
               1 KiB entry (control ``put``): ms until the follower holds the new version
               (its ``wait`` answers; from the put's answer, and from before the put),
               bytes on the wire both ways; median of --inc-reps.
  sparse_one   owner with 1,000,000 x 100 B entries (10 commits); the follower follows
               with prefix /nothing/ (holds only the head), then reads 100 random paths
               with ``get --repo`` (one get round trip each): ms and bytes per read;
               baseline: the same control get of a path already stored.
  edit_64m     a 64 MiB value synced, one byte in the middle changed, synced again:
               bytes on the wire for the second sync.
Every figure carries the peak RSS (VmHWM) of each daemon process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from blake3 import blake3  # noqa: E402

from pttd.control import ControlClient  # noqa: E402
from pttd.datadir import DataDir  # noqa: E402
from pttd.store import PAGE_SIZE  # noqa: E402

MB = 1e6
RSS_LIMIT_MB = 300
# A control call that hangs (a stuck daemon) fails the scenario instead of the run.
socket.setdefaulttimeout(600)


def code_version() -> dict:
    """Which pttd is measured: the git commit (and files changed since), or the commit a
    snapshot (``git archive``) was taken from, named in its SNAPSHOT file."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
            changed = [ln[3:] for ln in dirty.stdout.splitlines() if not ln[3:].startswith("bench/")]
            return {"commit": head.stdout.strip(), "changed": changed}
    except OSError:
        pass
    try:
        with open(os.path.join(ROOT, "SNAPSHOT")) as f:
            return {"commit": f.read().strip(), "changed": [], "snapshot": ROOT}
    except OSError:
        return {"commit": None}


def progress(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def med(xs):
    return statistics.median(xs) if xs else None


def rnd3(x):
    return None if x is None else round(x, 3)


# --- daemons in their own processes -------------------------------------------------


class DaemonProc:
    """``pttd start`` in a child process, driven through its control socket."""

    def __init__(self, data_dir: str, name: str, logs: str, config: str | None = None):
        self.data_dir = data_dir
        self.name = name
        self.log_path = os.path.join(logs, f"{name}.log")
        self.config = config
        self.proc: subprocess.Popen | None = None
        self.client: ControlClient | None = None
        self.address = ""
        self.node_id = ""
        self.final_peak_rss_mb: float | None = None

    def start(self, timeout: float = 60) -> DaemonProc:
        cmd = [sys.executable, "-m", "cli.pttd_main", "start", "--data-dir", self.data_dir, "--listen", "127.0.0.1:0"]
        if self.config:
            cmd += ["--config", self.config]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        run_file = os.path.join(self.data_dir, "run.json")
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon {self.name} exited ({self.proc.returncode}); see {self.log_path}")
            try:
                with open(run_file) as f:
                    info = json.load(f)
                if info.get("pid") == self.proc.pid:
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"daemon {self.name} not ready within {timeout} s; see {self.log_path}")
            time.sleep(0.02)
        self.client = ControlClient(info["control"])
        self.address = info["listen"][0]
        self.node_id = info["node_id"]
        return self

    def call(self, cmd: str, **args):
        return self.client.call(cmd, args)

    def status(self) -> dict:
        return self.client.call("status", {})

    def wire_bytes(self) -> tuple[int, int]:
        """(bytes in, bytes out) over every peer session now open."""
        peers = self.status()["peers"]
        return sum(p["bytes_in"] for p in peers), sum(p["bytes_out"] for p in peers)

    def _proc_status(self, field: str) -> float | None:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def peak_rss_mb(self) -> float | None:
        if self.proc is not None and self.proc.poll() is None:
            return self._proc_status("VmHWM")
        return self.final_peak_rss_mb

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.final_peak_rss_mb = self._proc_status("VmHWM")
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            progress(f"daemon {self.name} did not stop within {timeout} s of SIGTERM: killed")
            self.kill()
            rc = None
        self._log.close()
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Bench:
    def __init__(self, base: str, config: str | None):
        self.base = base
        self.logs = os.path.join(base, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.config = config
        self.running: list[DaemonProc] = []
        self._n = 0

    def daemon(self, data_dir: str, name: str) -> DaemonProc:
        self._n += 1
        d = DaemonProc(data_dir, f"{self._n:02d}-{name}", self.logs, self.config)
        self.running.append(d)
        return d.start()

    def stop(self, d: DaemonProc) -> None:
        d.stop()
        if d in self.running:
            self.running.remove(d)

    def stop_all(self) -> None:
        for d in list(self.running):
            self.stop(d)

    def fresh(self, name: str) -> str:
        self._n += 1
        return os.path.join(self.base, f"{self._n:02d}-{name}")


def wait_until(pred, timeout: float, what: str, interval: float = 0.0005):
    deadline = time.perf_counter() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.perf_counter() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def follow_info(d: DaemonProc, key: str) -> dict | None:
    for f in d.status()["follows"]:
        if f["repository"] == key:
            return f
    return None


# --- source repositories, built in-process before their daemon starts ------------------


def build_small(path: str, n: int, seed: int = 1) -> float:
    dd = DataDir.open_or_init(path)[0]
    rnd = random.Random(seed)
    t = time.perf_counter()
    with dd.repository().batch() as b:
        for i in range(n):
            b.put(f"/f/{i:06d}", rnd.randbytes(1024))
    dt = time.perf_counter() - t
    dd.close()
    return dt


def build_value(path: str, src_file: str) -> float:
    dd = DataDir.open_or_init(path)[0]
    t = time.perf_counter()
    dd.repository().put_file("/big.bin", src_file)
    dt = time.perf_counter() - t
    dd.close()
    return dt


def sparse_path(i: int) -> str:
    return f"/topics/t{i % 97}/{i:09d}"


def build_many(path: str, n: int, per_commit: int) -> float:
    dd = DataDir.open_or_init(path)[0]
    repo = dd.repository()
    rnd = random.Random(5)
    t = time.perf_counter()
    for start in range(0, n, per_commit):
        with repo.batch() as b:
            for i in range(start, min(n, start + per_commit)):
                b.put(sparse_path(i), rnd.randbytes(100))
        progress(f"  sparse source: {min(n, start + per_commit):,} entries, {time.perf_counter() - t:.1f} s")
    dt = time.perf_counter() - t
    dd.close()
    return dt


def random_file(path: str, size: int, seed: int) -> None:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(rnd.randbytes(n))
            left -= n


# --- ceilings: child processes over a loopback socket ----------------------------------

# Receivers print their port, accept one connection, and print a JSON result.
RECV_PLAIN = r"""
import json, socket, sys, time
n = int(sys.argv[1])
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
print(ls.getsockname()[1], flush=True)
s, _ = ls.accept()
t = time.perf_counter()
buf = bytearray(1 << 20); mv = memoryview(buf); got = 0
while got < n:
    k = s.recv_into(mv)
    if not k: break
    got += k
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "bytes": got}), flush=True)
"""

RECV_STORE = r"""
import json, os, socket, sqlite3, sys, time
from blake3 import blake3
n, size, path, page = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
flush_blocks, flush_bytes = int(sys.argv[5]), int(sys.argv[6])
db = sqlite3.connect(path, isolation_level=None)
db.execute(f"PRAGMA page_size={page}")
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("PRAGMA wal_autocheckpoint=0")
db.execute("CREATE TABLE blocks(id INTEGER PRIMARY KEY, hash BLOB NOT NULL UNIQUE, data BLOB NOT NULL)")
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
print(ls.getsockname()[1], flush=True)
s, _ = ls.accept()
t = time.perf_counter()
f = s.makefile("rb", buffering=1 << 20)
rows, rows_bytes, done = [], 0, 0
def flush():
    global rows, rows_bytes
    db.execute("BEGIN")
    db.executemany("INSERT OR IGNORE INTO blocks(hash, data) VALUES (?, ?)", rows)
    db.execute("COMMIT")
    rows, rows_bytes = [], 0
while done < n:
    b = f.read(size)
    if len(b) < size: break
    rows.append((blake3(b).digest(), b)); rows_bytes += size; done += 1
    if len(rows) >= flush_blocks or rows_bytes >= flush_bytes:
        flush()
if rows:
    flush()
dt = time.perf_counter() - t
stored = db.execute("SELECT count(*) FROM blocks").fetchone()[0]
print(json.dumps({"seconds": dt, "blocks": done, "stored": stored}), flush=True)
"""

SEND = r"""
import os, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
data = os.urandom(n)  # all distinct: the store ceiling must insert every block
s = socket.create_connection(("127.0.0.1", port))
s.sendall(data)
s.close()
"""


def _pair(recv_code: str, recv_args: list[str], nbytes: int, timeout: float = 300) -> dict:
    recv = subprocess.Popen([sys.executable, "-c", recv_code, *recv_args], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        port = recv.stdout.readline().strip()
        send = subprocess.run([sys.executable, "-c", SEND, port, str(nbytes)], timeout=timeout)
        if send.returncode:
            raise RuntimeError("ceiling sender failed")
        out, _ = recv.communicate(timeout=timeout)
        return json.loads(out)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()


def ceiling_socket(nbytes: int) -> float:
    """Seconds to move ``nbytes`` over a plain loopback socket between two processes."""
    return _pair(RECV_PLAIN, [str(nbytes)], nbytes)["seconds"]


def ceiling_store(base: str, n: int, size: int) -> float:
    """Seconds to receive n blocks of ``size`` bytes, blake3 each and insert them into a
    fresh SQLite table (synchronous=FULL, a transaction per fetcher-sized batch)."""
    from pttd import fetch

    path = os.path.join(base, f"ceiling-{random.random()}.sqlite3")
    res = _pair(
        RECV_STORE,
        [str(n), str(size), path, str(PAGE_SIZE), str(fetch.FLUSH_BLOCKS), str(fetch.FLUSH_BYTES)],
        n * size,
    )
    for suffix in ("", "-wal", "-shm"):
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            pass
    if res["stored"] != n:
        raise RuntimeError(f"store ceiling stored {res['stored']} of {n} blocks")
    return res["seconds"]


# --- one fresh follower syncing everything ---------------------------------------------


def one_full_sync(bench: Bench, owner: DaemonProc, name: str, timeout: float) -> tuple[DaemonProc, dict]:
    fol = bench.daemon(bench.fresh(name), name)
    t = time.perf_counter()
    res = fol.call("sync", repo=owner.node_id, peers=[owner.address], timeout=timeout)
    wall = time.perf_counter() - t
    bin_, bout = fol.wire_bytes()
    return fol, {
        "wall_s": wall,
        "daemon_s": res["seconds"],
        "version": res["version"],
        "blocks": res["fetched_blocks"],
        "block_bytes": res["fetched_bytes"],
        "bytes_in": bin_,
        "bytes_out": bout,
        "follower_peak_rss_MB": fol.peak_rss_mb(),
    }


def full_sync_figure(bench, owner, name, reps, payload, entries, timeout, store_ceiling_size=None):
    """Interleaved repetitions: pttd sync, socket ceiling, store ceiling; medians."""
    runs, t_sock, t_store = [], [], []
    fol = None
    for rep in range(reps):
        if fol is not None:
            bench.stop(fol)
        fol, r = one_full_sync(bench, owner, f"{name}-follower{rep}", timeout)
        runs.append(r)
        progress(f"  {name} rep {rep}: {r['wall_s']:.2f} s, {r['blocks']} blocks, {r['bytes_in']:,} bytes in")
        t_sock.append(ceiling_socket(r["bytes_in"]))
        if store_ceiling_size is None:
            n_blocks, size = entries, payload // entries
        else:
            n_blocks = r["blocks"]
            size = store_ceiling_size or max(1, r["block_bytes"] // max(1, r["blocks"]))
        t_store.append(ceiling_store(bench.base, n_blocks, size))
        progress(f"  ceilings: socket {t_sock[-1]:.3f} s, receive+blake3+sqlite {t_store[-1]:.3f} s")
    wall = med([r["wall_s"] for r in runs])
    sock, store = med(t_sock), med(t_store)
    last = runs[-1]
    fig = {
        "repetitions": reps,
        "seconds": rnd3(wall),
        "seconds_runs": [rnd3(r["wall_s"]) for r in runs],
        "daemon_reported_seconds": rnd3(med([r["daemon_s"] for r in runs])),
        "payload_MB_per_s": round(payload / MB / wall, 1),
        "blocks_fetched": last["blocks"],
        "blocks_per_s": round(last["blocks"] / wall),
        "block_bytes_fetched": last["block_bytes"],
        "wire_bytes_in": last["bytes_in"],
        "wire_bytes_out": last["bytes_out"],
        "wire_overhead_pct": round(100 * (last["bytes_in"] - payload) / payload, 1),
        "ceiling_socket_MB_per_s": round(last["bytes_in"] / MB / sock, 1),
        "ratio_vs_socket": round(sock / wall, 3),
        "ratio_vs_receive_blake3_sqlite": round(store / wall, 3),
        "owner_peak_rss_MB": owner.peak_rss_mb(),
        "follower_peak_rss_MB": max(r["follower_peak_rss_MB"] or 0 for r in runs),
    }
    if entries:
        fig["entries"] = entries
        fig["entries_per_s"] = round(entries / wall)
        fig["ceiling_receive_blake3_sqlite_blocks_per_s"] = round(entries / store)
    else:
        n_blocks = last["blocks"]
        fig["ceiling_receive_blake3_sqlite_blocks"] = n_blocks
        fig["ceiling_receive_blake3_sqlite_block_bytes"] = max(1, last["block_bytes"] // max(1, n_blocks))
    fig["ceiling_receive_blake3_sqlite_MB_per_s"] = round(payload / MB / store, 1)
    return fol, fig


# --- scenarios -------------------------------------------------------------------------


def scen_full_small(bench: Bench, n: int, reps: int, keep_for_incremental: bool):
    src = bench.fresh("small-owner")
    t_build = build_small(src, n)
    progress(f"full_small: source of {n:,} x 1 KiB built in {t_build:.1f} s")
    owner = bench.daemon(src, "small-owner")
    if reps == 0:  # only the incremental scenario asked for: one untimed sync
        fol, _ = one_full_sync(bench, owner, "small-follower", 600)
        return owner, fol, None
    fol, fig = full_sync_figure(bench, owner, "full_small", reps, n * 1024, n, 600)
    fig = {"scenario": "full_small", "value_bytes": 1024, **fig, "source_build_s": round(t_build, 1)}
    fig["goal"] = ">= 5x hypercore's blocks/s"
    if not keep_for_incremental:
        bench.stop(fol)
        bench.stop(owner)
        fig["owner_peak_rss_MB"] = owner.peak_rss_mb()
    return owner, fol, fig


def scen_incremental(bench: Bench, owner: DaemonProc, fol: DaemonProc, reps: int) -> dict:
    key = owner.node_id
    fol.call("follow", repo=key, peers=[owner.address], prefixes=[])
    # live: the owner must hold the follower's live subscription before the first put
    wait_until(
        lambda: any(key in p["subscribed"] for p in owner.status()["peers"]), 10, "the follower's live subscription"
    )
    wait_until(lambda: (follow_info(fol, key) or {}).get("state") == "synced", 30, "the follow to settle")
    time.sleep(0.3)
    rnd = random.Random(11)
    from_answer, from_start, put_ms, b_in, b_out, b_in_settled, b_out_settled = [], [], [], [], [], [], []
    for i in range(reps):
        version = follow_info(fol, key)["version"]
        in0, out0 = fol.wire_bytes()
        value = rnd.randbytes(1024)
        # The follower is told first to answer when it holds the next version (`pttctl
        # wait`, event-driven: no polling load on it while it works).
        held: list[float] = []

        def wait_next(v=version, out=held) -> None:
            fol.call("wait", repo=key, version=v + 1, timeout=10)
            out.append(time.perf_counter())

        waiter = threading.Thread(target=wait_next)
        waiter.start()
        time.sleep(0.02)  # the wait is registered before the write (not measured)
        t0 = time.perf_counter()
        owner.call("put", path=f"/inc/{i:04d}", value=value)
        t1 = time.perf_counter()
        waiter.join(15)
        if not held:
            raise RuntimeError("the follower did not get the new version within 10 s")
        t2 = held[0]
        in1, out1 = fol.wire_bytes()
        time.sleep(0.1)
        in2, out2 = fol.wire_bytes()
        from_answer.append((t2 - t1) * 1000)
        from_start.append((t2 - t0) * 1000)
        put_ms.append((t1 - t0) * 1000)
        b_in.append(in1 - in0)
        b_out.append(out1 - out0)
        b_in_settled.append(in2 - in0)
        b_out_settled.append(out2 - out0)
        time.sleep(0.05)
    got = fol.call("get", path=f"/inc/{reps - 1:04d}", repo=key)
    assert got["size"] == 1024, got
    # Baseline: one control call's round trip (what the polling adds to each figure).
    status_ms = []
    for _ in range(50):
        t = time.perf_counter()
        fol.status()
        status_ms.append((time.perf_counter() - t) * 1000)
    return {
        "scenario": "incremental",
        "repetitions": reps,
        "ms_from_put_answer": rnd3(med(from_answer)),
        "ms_from_put_answer_max": rnd3(max(from_answer)),
        "ms_from_before_put": rnd3(med(from_start)),
        "owner_put_ms": rnd3(med(put_ms)),
        "wire_bytes_in": med(b_in),
        "wire_bytes_out": med(b_out),
        "wire_bytes_total": med([a + b for a, b in zip(b_in_settled, b_out_settled)]),
        "wire_bytes_in_after_100ms": med(b_in_settled),
        "wire_bytes_total_max": max(a + b for a, b in zip(b_in_settled, b_out_settled)),
        "baseline_status_call_ms": rnd3(med(status_ms)),
        "owner_peak_rss_MB": owner.peak_rss_mb(),
        "follower_peak_rss_MB": fol.peak_rss_mb(),
        "goal": "< 5 ms, < 8 KB",
    }


def scen_full_large(bench: Bench, size: int, reps: int) -> dict:
    src_file = os.path.join(bench.base, "large.bin")
    random_file(src_file, size, 3)
    src = bench.fresh("large-owner")
    t_build = build_value(src, src_file)
    os.remove(src_file)
    progress(f"full_large: source of {size / MB:.0f} MB built in {t_build:.1f} s")
    owner = bench.daemon(src, "large-owner")
    try:
        fol, fig = full_sync_figure(bench, owner, "full_large", reps, size, 0, 600, store_ceiling_size=0)
        bench.stop(fol)
    finally:
        bench.stop(owner)
    fig["owner_peak_rss_MB"] = owner.peak_rss_mb()
    return {"scenario": "full_large", "value_bytes": size, **fig, "goal": ">= 2x hypercore's MB/s"}


def scen_sparse_one(bench: Bench, n: int, reads: int) -> dict:
    src = bench.fresh("sparse-owner")
    t_build = build_many(src, n, 100_000)
    progress(f"sparse_one: source of {n:,} x 100 B built in {t_build:.1f} s")
    owner = bench.daemon(src, "sparse-owner")
    fol = bench.daemon(bench.fresh("sparse-follower"), "sparse-follower")
    key = owner.node_id
    try:
        t = time.perf_counter()
        fol.call("follow", repo=key, peers=[owner.address], prefixes=["/nothing/"])
        f = wait_until(
            lambda: (lambda x: x if x and x["state"] == "synced" and x["version"] is not None else None)(
                follow_info(fol, key)
            ),
            120,
            "the sparse follow",
            0.002,
        )
        t_follow = time.perf_counter() - t
        head_in, head_out = fol.wire_bytes()
        time.sleep(0.3)
        rnd = random.Random(17)
        ms, b_in, b_out, again_ms = [], [], [], []
        for _ in range(reads):
            i = rnd.randrange(n)
            path = sparse_path(i)
            in0, out0 = fol.wire_bytes()
            t0 = time.perf_counter()
            got = fol.call("get", path=path, repo=key)
            dt = time.perf_counter() - t0
            in1, out1 = fol.wire_bytes()
            assert got["size"] == 100, got
            ms.append(dt * 1000)
            b_in.append(in1 - in0)
            b_out.append(out1 - out0)
            t0 = time.perf_counter()  # baseline: the same read, now stored
            fol.call("get", path=path, repo=key)
            again_ms.append((time.perf_counter() - t0) * 1000)
        fig = {
            "scenario": "sparse_one",
            "repository_entries": n,
            "value_bytes": 100,
            "reads": reads,
            "ms": rnd3(med(ms)),
            "ms_p90": rnd3(sorted(ms)[int(0.9 * (len(ms) - 1))]),
            "ms_max": rnd3(max(ms)),
            "wire_bytes_in": med(b_in),
            "wire_bytes_out": med(b_out),
            "wire_bytes_total": med([a + b for a, b in zip(b_in, b_out)]),
            "wire_bytes_total_max": max(a + b for a, b in zip(b_in, b_out)),
            "baseline_stored_read_ms": rnd3(med(again_ms)),
            "follow_head_only_s": rnd3(t_follow),
            "follow_head_only_wire_bytes": head_in + head_out,
            "follow_head_only_blocks": f["fetched_blocks"],
            "source_build_s": round(t_build, 1),
            "goal": "< 10 KB, < 5 ms per read",
        }
    finally:
        bench.stop(fol)
        bench.stop(owner)
    fig["owner_peak_rss_MB"] = owner.peak_rss_mb()
    fig["follower_peak_rss_MB"] = fol.peak_rss_mb()
    return fig


def scen_edit(bench: Bench, size: int) -> dict:
    src_file = os.path.join(bench.base, "edit.bin")
    random_file(src_file, size, 4)
    owner = bench.daemon(bench.fresh("edit-owner"), "edit-owner")
    fol = bench.daemon(bench.fresh("edit-follower"), "edit-follower")
    key = owner.node_id
    try:
        owner.call("put", path="/big.bin", filename=src_file)
        t = time.perf_counter()
        first = fol.call("sync", repo=key, peers=[owner.address], timeout=600)
        t_first = time.perf_counter() - t
        in0, out0 = fol.wire_bytes()
        with open(src_file, "r+b") as f:
            f.seek(size // 2)
            b = f.read(1)
            f.seek(size // 2)
            f.write(bytes([b[0] ^ 0xFF]))
        owner.call("put", path="/big.bin", filename=src_file)
        t = time.perf_counter()
        second = fol.call("sync", repo=key, peers=[owner.address], timeout=600)
        t_second = time.perf_counter() - t
        in1, out1 = fol.wire_bytes()
        h = blake3()
        fol.client.call("get", {"path": "/big.bin", "repo": key}, on_chunk=h.update)
        with open(src_file, "rb") as f:
            want = blake3(f.read()).digest()
        fig = {
            "scenario": "edit_64m",
            "value_bytes": size,
            "first_sync_s": rnd3(t_first),
            "first_sync_MB_per_s": round(size / MB / t_first, 1),
            "first_sync_wire_bytes_in": in0,
            "second_sync_s": rnd3(t_second),
            "second_sync_wire_bytes_in": in1 - in0,
            "second_sync_wire_bytes_out": out1 - out0,
            "second_sync_wire_bytes_total": (in1 - in0) + (out1 - out0),
            "second_sync_blocks": second["fetched_blocks"] - first["fetched_blocks"],
            "second_sync_block_bytes": second["fetched_bytes"] - first["fetched_bytes"],
            "follower_value_matches": h.digest() == want,
            "goal": "second sync <= 32 KiB on the wire",
        }
    finally:
        bench.stop(fol)
        bench.stop(owner)
        os.remove(src_file)
    fig["owner_peak_rss_MB"] = owner.peak_rss_mb()
    fig["follower_peak_rss_MB"] = fol.peak_rss_mb()
    return fig


# --- hypercore, from anchors/hypercore/run.sh's output ----------------------------------


def vs_hypercore(path: str, figs: dict) -> dict:
    hc = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                o = json.loads(line)
                hc[o.get("scenario")] = o
    m = lambda s: (hc.get(s) or {}).get("median") or {}  # noqa: E731
    out: dict = {"machine": hc.get("machine")}
    fs, hs = figs.get("full_small"), m("full_small")
    if fs and hs:
        out["full_small"] = {
            "pttd_entries_per_s": fs["entries_per_s"],
            "hypercore_blocks_per_s": round(hs["blocks_s"]),
            "ratio": round(fs["entries_per_s"] / hs["blocks_s"], 2),
            "pttd_wire_bytes": fs["wire_bytes_in"],
            "hypercore_socket_bytes_in": hs["socket_bytes_in"],
            "goal": ">= 5",
        }
    fl, hl = figs.get("full_large"), m("full_large")
    if fl and hl:
        out["full_large"] = {
            "pttd_MB_per_s": fl["payload_MB_per_s"],
            "hypercore_MB_per_s": round(hl["payload_MB_s"], 1),
            "ratio": round(fl["payload_MB_per_s"] / hl["payload_MB_s"], 2),
            "goal": ">= 2",
        }
    fi, hi = figs.get("incremental"), m("incremental")
    if fi and hi:
        out["incremental"] = {
            "pttd_ms_from_before_put": fi["ms_from_before_put"],
            "pttd_ms_from_put_answer": fi["ms_from_put_answer"],
            "hypercore_ms": hi["latency_ms"],
            "speed_ratio_hypercore_ms_over_pttd_ms": round(hi["latency_ms"] / fi["ms_from_before_put"], 2),
            "pttd_wire_bytes_in": fi["wire_bytes_in"],
            "hypercore_socket_bytes_in": hi["socket_bytes_in"],
        }
    fsp = figs.get("sparse_one")
    if fsp:
        o = {"pttd_ms": fsp["ms"], "pttd_wire_bytes_total": fsp["wire_bytes_total"]}
        for s in ("sparse_one", "drive_sparse"):
            h = m(s)
            if h:
                o[f"{s}_hypercore_ms"] = h["latency_ms"]
                o[f"{s}_hypercore_bytes_total"] = h["socket_bytes_in"] + h["socket_bytes_out"]
                o[f"{s}_speed_ratio"] = round(h["latency_ms"] / fsp["ms"], 2)
                o[f"{s}_bytes_ratio"] = round(
                    (h["socket_bytes_in"] + h["socket_bytes_out"]) / fsp["wire_bytes_total"], 2
                )
        out["sparse_one"] = o
    fe, he = figs.get("edit_64m"), m("drive_edit")
    if fe and he:
        out["edit_64m"] = {
            "pttd_bytes_in": fe["second_sync_wire_bytes_in"],
            "hypercore_drive_edit_bytes_in": he["socket_bytes_in"],
            "bytes_ratio_hypercore_over_pttd": round(he["socket_bytes_in"] / fe["second_sync_wire_bytes_in"], 1),
        }
    return out


# --- main ------------------------------------------------------------------------------

SCENARIOS = ("full_small", "incremental", "full_large", "sparse_one", "edit_64m")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    ap.add_argument("--only", help="comma-separated: " + ",".join(SCENARIOS))
    ap.add_argument("--reps", type=int, help="repetitions of full_small and full_large (default 3; quick 1)")
    ap.add_argument("--inc-reps", type=int, default=20, help="incremental writes (default 20)")
    ap.add_argument("--config", help="a TOML config for both daemons (default: pttd's defaults)")
    ap.add_argument("--hypercore", metavar="FILE", help="anchors/hypercore/run.sh output: add ratios to it")
    ap.add_argument("--keep", action="store_true", help="keep the data directories and daemon logs")
    ap.add_argument("--compare", metavar="JSON", help="only print the ratios of an earlier run's output to --hypercore")
    args = ap.parse_args()
    if args.compare:
        if not args.hypercore:
            ap.error("--compare needs --hypercore")
        with open(args.compare) as f:
            earlier = json.load(f)
        print(json.dumps(vs_hypercore(args.hypercore, earlier["figures"]), indent=1))
        return
    only = set((args.only or ",".join(SCENARIOS)).split(","))
    unknown = only - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    q = args.quick
    reps = args.reps if args.reps is not None else (1 if q else 3)
    sizes = {
        "small": 20_000 if q else 100_000,
        "large": (16 if q else 100) << 20,
        "many": 100_000 if q else 1_000_000,
        "edit": (16 if q else 64) << 20,
        "inc": 5 if q else args.inc_reps,
    }
    out: dict = {
        "bench": "sync_bench",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "nproc": os.cpu_count(),
            "python": sys.version.split()[0],
            "sqlite": sqlite3.sqlite_version,
            "loadavg_at_start": os.getloadavg(),
        },
        "code": code_version(),
        "quick": q,
        "config": args.config or "defaults (synchronous FULL, window 8, want_batch 1024)",
    }
    figs: dict = {}
    base = tempfile.mkdtemp(prefix="pttd-sync-bench-")
    bench = Bench(base, os.path.abspath(args.config) if args.config else None)
    t_all = time.perf_counter()

    def run(name, fn, *a):
        progress(f"== {name}")
        t = time.perf_counter()
        try:
            res = fn(*a)
        except Exception as exc:  # reported, and the other scenarios still run
            progress(f"{name} FAILED: {exc.__class__.__name__}: {exc}")
            figs[name] = {"scenario": name, "error": f"{exc.__class__.__name__}: {exc}"}
            bench.stop_all()
            return None
        progress(f"{name}: {json.dumps(res if isinstance(res, dict) else res[2])}")
        progress(f"{name} took {time.perf_counter() - t:.1f} s")
        return res

    try:
        if "full_small" in only or "incremental" in only:
            keep = "incremental" in only
            res = run("full_small", scen_full_small, bench, sizes["small"], reps if "full_small" in only else 0, keep)
            if res is not None:
                owner, fol, fig = res
                if fig is not None:
                    figs["full_small"] = fig
                if keep:
                    inc = run("incremental", scen_incremental, bench, owner, fol, sizes["inc"])
                    if inc is not None:
                        figs["incremental"] = inc
                    bench.stop(fol)
                    bench.stop(owner)
                    if inc is not None:
                        inc["owner_peak_rss_MB"] = owner.peak_rss_mb()
                        inc["follower_peak_rss_MB"] = fol.peak_rss_mb()
                        if "full_small" in figs:
                            figs["full_small"]["owner_peak_rss_MB"] = owner.peak_rss_mb()
        if "full_large" in only:
            r = run("full_large", scen_full_large, bench, sizes["large"], reps)
            if r is not None:
                figs["full_large"] = r
        if "sparse_one" in only:
            r = run("sparse_one", scen_sparse_one, bench, sizes["many"], 100)
            if r is not None:
                figs["sparse_one"] = r
        if "edit_64m" in only:
            r = run("edit_64m", scen_edit, bench, sizes["edit"])
            if r is not None:
                figs["edit_64m"] = r
    finally:
        bench.stop_all()
        if args.keep:
            progress(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    rss = [v for f in figs.values() for k, v in f.items() if k.endswith("peak_rss_MB") and isinstance(v, (int, float))]
    out["figures"] = figs
    out["max_daemon_peak_rss_MB"] = max(rss) if rss else None
    out["rss_under_limit"] = bool(rss) and max(rss) < RSS_LIMIT_MB
    if args.hypercore:
        out["vs_hypercore"] = vs_hypercore(args.hypercore, figs)
    out["loadavg_at_end"] = os.getloadavg()
    out["seconds_total"] = round(time.perf_counter() - t_all, 1)
    print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()
