"""Repository benchmark: prints one JSON object per figure, each beside a baseline
measured in the same run (these machines are shared and noisy: compare ratios).

    python bench/repo_bench.py            # all figures (a few minutes)
    python bench/repo_bench.py --quick    # smaller sizes, for a smoke run

Figures (issue 2):
  write_one_commit     N x 1 KiB in one commit: entries/s, vs plain SQLite inserts of the
                       same blobs (rowid table + UNIQUE hash index, one executemany) and
                       blake3 of the same bytes
  write_many_commits   the same entries in N/100 commits of 100
  one_new_entry        one new entry into an N-entry repository, 300 random keys: new
                       blocks and new bytes stored besides the value (median, worst)
  diff_one_entry       diff of two versions one entry apart: blocks read
  large_value          a 64 MiB value, then one byte changed in the middle: new bytes
                       stored; MB/s of storing a large value vs blake3 and SQLite alone
  memory_1m            peak RSS of a process writing 1,000,000 small entries
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from blake3 import blake3  # noqa: E402

from protocol import tree  # noqa: E402
from pttd.datadir import DataDir  # noqa: E402
from pttd.store import PAGE_SIZE, Writer  # noqa: E402


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def fresh_dir(base: str, name: str) -> str:
    return os.path.join(base, name)


def sqlite_baseline(base: str, rows: list[tuple[bytes, bytes]]) -> float:
    """Seconds to insert (hash, blob) rows into a plain table like ours, one transaction."""
    path = os.path.join(base, f"baseline-{random.random()}.sqlite3")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA page_size={PAGE_SIZE}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA wal_autocheckpoint=0")  # the same settings as our store
    db.execute("CREATE TABLE blobs(id INTEGER PRIMARY KEY, hash BLOB NOT NULL UNIQUE, data BLOB NOT NULL)")
    t = time.perf_counter()
    db.execute("BEGIN")
    db.executemany("INSERT INTO blobs(hash, data) VALUES (?, ?)", rows)
    db.execute("COMMIT")
    dt = time.perf_counter() - t
    db.close()
    return dt


def naive_kv_baseline(base: str, entries: list[tuple[str, bytes]]) -> float:
    """Seconds for what a plain application would do: a path -> value table, one INSERT
    per entry in one transaction, SQLite's defaults but for WAL and synchronous=FULL."""
    path = os.path.join(base, f"naive-{random.random()}.sqlite3")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE kv(path TEXT PRIMARY KEY, value BLOB NOT NULL)")
    t = time.perf_counter()
    db.execute("BEGIN")
    for p, v in entries:
        db.execute("INSERT INTO kv(path, value) VALUES (?, ?)", (p, v))
    db.execute("COMMIT")
    dt = time.perf_counter() - t
    db.close()
    return dt


def blake3_baseline(values: list[bytes]) -> float:
    t = time.perf_counter()
    for v in values:
        blake3(v).digest()
    return time.perf_counter() - t


def make_entries(n: int, seed: int = 1) -> list[tuple[str, bytes]]:
    rnd = random.Random(seed)
    return [(f"/bench/{i:08d}", rnd.randbytes(1024)) for i in range(n)]


def bench_writes(base: str, n: int, reps: int) -> DataDir:
    entries = make_entries(n)
    values = [v for _, v in entries]
    rows = [(blake3(v).digest(), v) for v in values]
    # Interleaved repetitions, medians: the machine is shared and noisy.
    t_sqlite_runs, t_naive_runs, t_one_runs = [], [], []
    t_blake3 = blake3_baseline(values)
    for rep in range(reps):
        t_sqlite_runs.append(sqlite_baseline(base, rows))
        t_naive_runs.append(naive_kv_baseline(base, entries))
        dd = DataDir.init(fresh_dir(base, f"one-{rep}"))
        repo = dd.repository()
        t = time.perf_counter()
        with repo.batch() as b:
            for p, v in entries:
                b.put(p, v)
        t_one_runs.append(time.perf_counter() - t)
        if rep < reps - 1:
            dd.close()
    t_sqlite = statistics.median(t_sqlite_runs)
    t_naive = statistics.median(t_naive_runs)
    t_one = statistics.median(t_one_runs)
    emit(
        {
            "figure": "write_one_commit",
            "entries": n,
            "value_bytes": 1024,
            "repetitions": reps,
            "seconds": round(t_one, 3),
            "entries_per_s": round(n / t_one),
            "entries_per_s_best": round(n / min(t_one_runs)),
            "baseline_sqlite_insert_entries_per_s": round(n / t_sqlite),
            "baseline_blake3_entries_per_s": round(n / t_blake3),
            "ratio_vs_sqlite_insert": round(t_sqlite / t_one, 3),
            "baseline_naive_kv_insert_entries_per_s": round(n / t_naive),
            "ratio_vs_naive_kv_insert": round(t_naive / t_one, 3),
            "goal": ">= 80000 entries/s and ratio_vs_sqlite_insert >= 1",
        }
    )

    many = DataDir.init(fresh_dir(base, "many"))
    r2 = many.repository()
    t = time.perf_counter()
    for i in range(0, n, 100):
        with r2.batch() as b:
            for p, v in entries[i : i + 100]:
                b.put(p, v)
    t_many = time.perf_counter() - t
    assert r2.head().commit.root == repo.head().commit.root, "same entries must give the same root"
    emit(
        {
            "figure": "write_many_commits",
            "entries": n,
            "commits": n // 100,
            "seconds": round(t_many, 3),
            "entries_per_s": round(n / t_many),
            "commits_per_s": round((n // 100) / t_many, 1),
            "baseline_sqlite_insert_entries_per_s": round(n / t_sqlite),
            "ratio_vs_sqlite_insert": round(t_sqlite / t_many, 3),
            "same_root_as_one_commit": True,
        }
    )
    many.close()
    return dd


class NewBlockCounter:
    """Counts the blocks a transaction adds that the store did not hold before."""

    def __init__(self, store):
        self.store = store
        self.blocks = 0
        self.bytes = 0
        self.values = 0
        self._orig = Writer.emit
        counter = self

        def emit(writer, address, block):
            if writer.get(address) is None and not counter.store.has_block(address):
                if block[0] == 0x01:
                    counter.values += 1
                else:
                    counter.blocks += 1
                    counter.bytes += len(block)
            return counter._orig(writer, address, block)

        Writer.emit = emit

    def reset(self):
        self.blocks = self.bytes = self.values = 0

    def close(self):
        Writer.emit = self._orig


def bench_one_new_entry(dd: DataDir, n: int, samples: int) -> None:
    repo = dd.repository()
    rnd = random.Random(7)
    counter = NewBlockCounter(dd.store)
    blocks, sizes, depths, commit_bytes = [], [], [], []
    try:
        for _ in range(samples):
            path = f"/bench/{rnd.randrange(n * 10):08d}x"
            counter.reset()
            sc = repo.put(path, rnd.randbytes(1024))
            depths.append(len(tree.path_nodes(sc.commit.root, path.encode(), dd.store.load_node)))
            blocks.append(counter.blocks + counter.values)
            sizes.append(counter.bytes)
            commit_bytes.append(len(sc.block) + len(sc.signature))
            repo.delete(path)  # keep the repository at n entries
    finally:
        counter.close()
    emit(
        {
            "figure": "one_new_entry",
            "repository_entries": n,
            "samples": samples,
            "tree_depth_median": statistics.median(depths),
            "new_blocks_median": statistics.median(blocks),
            "new_blocks_max": max(blocks),
            "max_of_blocks_minus_depth": max(b - d for b, d in zip(blocks, depths)),
            "new_bytes_besides_value_median": statistics.median(sizes),
            "new_bytes_besides_value_max": max(sizes),
            "signed_commit_bytes": statistics.median(commit_bytes),
            "goal": "blocks <= depth + 2; bytes < 8192 median, < 16384 worst",
        }
    )


def bench_diff(dd: DataDir, n: int) -> None:
    repo = dd.repository()
    repo.put("/bench/diff-probe", b"x" * 1024)
    head = repo.head().seq
    reads = []
    for v1, v2 in ((head - 1, head), (head, head - 1)):
        dd.store.drop_cache()
        before = dd.store.blocks_read
        changes = list(repo.diff(v1, v2))
        reads.append(dd.store.blocks_read - before)
        assert len(changes) == 1
    # Baseline: what a full comparison would read (every node of both trees).
    emit(
        {
            "figure": "diff_one_entry",
            "repository_entries": n,
            "blocks_read": max(reads),
            "tree_depth": len(tree.path_nodes(repo.head().commit.root, b"/bench/diff-probe", dd.store.load_node)),
            "goal": "< 20",
        }
    )


def bench_large_value(base: str, size: int, reps: int) -> None:
    data = bytearray(random.Random(3).randbytes(size))
    src = os.path.join(base, "large.bin")
    with open(src, "wb") as f:
        f.write(data)
    chunk_rows = [(blake3(data[i : i + 12288]).digest(), bytes(data[i : i + 12288])) for i in range(0, size, 12288)]
    t_store_runs, t_sql_runs = [], []
    for rep in range(reps):  # interleaved with the baseline, medians
        t_sql_runs.append(sqlite_baseline(base, chunk_rows))
        dd = DataDir.init(fresh_dir(base, f"large-{rep}"))
        repo = dd.repository()
        t = time.perf_counter()
        repo.put_file("/files/large", src)
        t_store_runs.append(time.perf_counter() - t)
        if rep < reps - 1:
            dd.close()
    t_store = statistics.median(t_store_runs)
    t_sql = statistics.median(t_sql_runs)
    _, bytes0 = dd.store.block_stats()
    data[size // 2] ^= 0xFF
    with open(src, "r+b") as f:
        f.seek(size // 2)
        f.write(bytes([data[size // 2]]))
    t = time.perf_counter()
    repo.put_file("/files/large", src)
    t_edit = time.perf_counter() - t
    _, bytes1 = dd.store.block_stats()
    assert repo.get("/files/large") == data
    t = time.perf_counter()
    dd.store.checkpoint("TRUNCATE")
    t_ckpt = time.perf_counter() - t
    t_b3 = blake3_baseline([bytes(data)])
    mb = size / 1e6
    emit(
        {
            "figure": "large_value",
            "value_bytes": size,
            "repetitions": reps,
            "store_MB_per_s": round(mb / t_store, 1),
            "store_MB_per_s_runs": [round(mb / x, 1) for x in t_store_runs],
            "deferred_checkpoint_seconds": round(t_ckpt, 3),
            "edit_store_seconds": round(t_edit, 3),
            "one_byte_edit_new_bytes": bytes1 - bytes0,
            "baseline_blake3_MB_per_s": round(mb / t_b3, 1),
            "baseline_sqlite_insert_12KiB_blobs_MB_per_s": round(mb / t_sql, 1),
            "ratio_vs_sqlite_insert": round(t_sql / t_store, 3),
            "goal": "edit <= 32768 new bytes; >= 200 MB/s",
        }
    )
    dd.close()


PEAK_RSS = """
def peak_rss_mb():
    # VmHWM is this process's own high-water mark (ru_maxrss can carry the parent's).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
"""

MEMORY_CHILD = (
    PEAK_RSS
    + """
import os, random, sys, time, json
from pttd.datadir import DataDir
n, per_commit = int(sys.argv[2]), int(sys.argv[3])
dd = DataDir.init(sys.argv[1])
repo = dd.repository()
rnd = random.Random(5)
t = time.perf_counter()
for start in range(0, n, per_commit):
    with repo.batch() as b:
        for i in range(start, min(n, start + per_commit)):
            b.put(f"/topics/t{i % 97}/{i:09d}", rnd.randbytes(100))
dt = time.perf_counter() - t
print(json.dumps({"peak_rss_MB": peak_rss_mb(), "seconds": dt}))
"""
)


def bench_memory(base: str, n: int) -> None:
    out = {}
    baseline = subprocess.run(
        [sys.executable, "-c", PEAK_RSS + "import pttd.datadir\nprint(peak_rss_mb())"],
        capture_output=True,
        text=True,
        check=True,
    )
    for per_commit in (n // 10, n):
        res = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, fresh_dir(base, f"mem-{per_commit}"), str(n), str(per_commit)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[per_commit] = json.loads(res.stdout)
    emit(
        {
            "figure": "memory_1m",
            "entries": n,
            "value_bytes": 100,
            "peak_rss_MB_commits_of_10pct": round(out[n // 10]["peak_rss_MB"], 1),
            "peak_rss_MB_one_commit": round(out[n]["peak_rss_MB"], 1),
            "seconds_one_commit": round(out[n]["seconds"], 1),
            "baseline_rss_MB_after_import": round(float(baseline.stdout), 1),
            "goal": "< 400 MB",
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", help="comma-separated figure groups: writes,large,memory")
    args = ap.parse_args()
    n = 20_000 if args.quick else 100_000
    groups = set((args.only or "writes,large,memory").split(","))
    emit(
        {
            "figure": "machine",
            "nproc": os.cpu_count(),
            "python": sys.version.split()[0],
            "sqlite": sqlite3.sqlite_version,
        }
    )
    with tempfile.TemporaryDirectory(prefix="pttd-bench-") as base:
        if "writes" in groups:
            dd = bench_writes(base, n, 1 if args.quick else 3)
            bench_one_new_entry(dd, n, 60 if args.quick else 300)
            bench_diff(dd, n)
            dd.close()
        if "large" in groups:
            bench_large_value(base, (16 if args.quick else 64) << 20, 1 if args.quick else 3)
        if "memory" in groups:
            bench_memory(base, 100_000 if args.quick else 1_000_000)
    emit({"figure": "done", "max_rss_MB_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


if __name__ == "__main__":
    main()
