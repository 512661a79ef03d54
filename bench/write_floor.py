"""The floor of a pure-Python write of 100,000 x 1 KiB in one commit, against the baseline
of repo_bench.py (SQLite executemany of the same blobs, same settings), in the same run.

    python bench/write_floor.py

What it writes is what a commit of the store writes (values as blocks, the tree built
whole by protocol.tree, rows inserted on a second thread while the next are hashed), with
none of the store's layers: no Batch, no Writer, no per-entry method calls; paths checked,
values hashed and references made in list comprehensions, 8,192 at a time. If this does
not reach the baseline, no arrangement of the same work in Python will (bench/README.md,
"why issue 2's write goal is blocked"). Prints one JSON object.
"""

import json
import os
import queue
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from blake3 import blake3  # noqa: E402
from msgpack import ExtType  # noqa: E402

import bench.repo_bench as RB  # noqa: E402
from protocol import tree  # noqa: E402
from protocol.paths import validate_path  # noqa: E402
from pttd.store import PAGE_SIZE, _insert_blocks  # noqa: E402

N = 100_000
CHUNK = 8192
PREFIX = b"\x01"  # KIND_VALUE
SIZE = (1024).to_bytes(4, "big")


def connect(base: str) -> sqlite3.Connection:
    db = sqlite3.connect(
        os.path.join(base, f"floor-{time.time_ns()}.sqlite3"), isolation_level=None, check_same_thread=False
    )
    db.execute(f"PRAGMA page_size={PAGE_SIZE}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE blocks(id INTEGER PRIMARY KEY, hash BLOB NOT NULL UNIQUE, data BLOB NOT NULL)")
    return db


def floor_write(base: str, entries: list[tuple[str, bytes]]) -> float:
    db = connect(base)
    db.execute("BEGIN")
    t = time.perf_counter()
    rows_q: queue.SimpleQueue = queue.SimpleQueue()

    def inserter() -> None:
        while (rows := rows_q.get()) is not None:
            _insert_blocks(db, rows)

    th = threading.Thread(target=inserter)
    th.start()
    new = tuple.__new__
    keys: list[bytes] = []
    refs: list = []
    for i in range(0, len(entries), CHUNK):
        part = entries[i : i + CHUNK]
        keys += [validate_path(p) for p, _ in part]
        blocks = [PREFIX + v for _, v in part]
        hashes = [blake3(b).digest() for b in blocks]
        refs += [new(ExtType, (tree.EXT_BLOCK, h + SIZE)) for h in hashes]
        rows_q.put(sorted(zip(hashes, blocks)))
    order = sorted(range(len(keys)), key=keys.__getitem__)
    nodes: dict[bytes, bytes] = {}
    tree.build_sorted([keys[i] for i in order], [refs[i] for i in order], nodes.__setitem__)
    rows_q.put(sorted(nodes.items()))
    rows_q.put(None)
    th.join()
    db.execute("COMMIT")
    dt = time.perf_counter() - t
    db.close()
    return dt


def main() -> None:
    entries = RB.make_entries(N)
    rows = [(blake3(v).digest(), v) for _, v in entries]
    base = tempfile.mkdtemp(prefix="pttd-floor-")
    runs = []
    try:
        for _ in range(5):  # interleaved: the machine's pace drifts
            runs.append((RB.sqlite_baseline(base, rows), floor_write(base, entries)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ratios = [b / f for b, f in runs]
    print(
        json.dumps(
            {
                "figure": "write_floor",
                "entries": N,
                "floor_entries_per_s": [round(N / f) for _, f in runs],
                "baseline_sqlite_insert_entries_per_s": [round(N / b) for b, _ in runs],
                "ratio_median": round(statistics.median(ratios), 3),
                "ratio_best": round(max(ratios), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
