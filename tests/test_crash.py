"""A writer killed with SIGKILL in the middle of many commits loses no acknowledged commit."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from pttd.datadir import DataDir
from pttd.repo import verify_store

WRITER = textwrap.dedent(
    """
    import os, sys
    from pttd.datadir import DataDir
    repo = DataDir.open(sys.argv[1]).repository()
    i = 0
    while True:
        i += 1
        with repo.batch() as b:
            for j in range(20):
                b.put(f"/c/{i}/{j}", os.urandom(200))
            b.put("/counter", str(i).encode())
            if i % 7 == 0:
                b.put(f"/big/{i}", os.urandom(100_000))
            if i % 25 == 0:  # past the flush threshold: inserts in the background
                b.put(f"/huge/{i}", os.urandom(24 << 20))
        print(b.commit.seq, i, flush=True)
    """
)


def test_sigkill_mid_commits_loses_no_acknowledged_commit(tmp_path):
    path = str(tmp_path / "d")
    DataDir.init(path).close()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE, text=True)
    acked = []
    deadline = time.monotonic() + 60
    try:
        while len(acked) < 60 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(tuple(int(x) for x in line.split()))
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of the next commit
    finally:
        proc.kill()
        proc.wait(10)
    assert len(acked) == 60, "the writer did not get going"
    dd = DataDir.open(path)
    repo = dd.repository()
    last_seq, last_i = acked[-1]
    assert repo.head().seq >= last_seq
    for seq, i in acked:
        assert repo.get("/counter", seq) == str(i).encode()
        assert len(repo.get(f"/c/{i}/19")) == 200
        if i % 25 == 0:
            assert repo.info(f"/huge/{i}", seq).size == 24 << 20
    rep = verify_store(dd.store)
    assert rep.ok, rep.errors
    dd.close()
