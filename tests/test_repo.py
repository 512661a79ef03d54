"""The repository API over the SQLite store: writes, versions, diff, gc, tamper checks."""

import logging
import os
import sqlite3
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.commit import Commit, sign_commit
from protocol.errors import PathError, SignatureError
from pttd.datadir import DataDir
from pttd.errors import CorruptBlock, ForkDetected, NotFound, PttError, RollbackRefused
from pttd.repo import collect_garbage, verify_store
from pttd.store import InsertFailed, Store, _Connection

paths_st = st.sampled_from([f"/p/{i}" for i in range(12)] + ["/profile.json", "/topics/a/1", "/topics/a/2"])
values_st = st.one_of(st.binary(max_size=80), st.binary(min_size=100, max_size=400))
op_st = st.tuples(st.sampled_from(["put", "del"]), paths_st, values_st)


@settings(max_examples=40, deadline=None)
@given(commits=st.lists(st.lists(op_st, min_size=1, max_size=6), min_size=1, max_size=8))
def test_get_after_put_and_delete_at_every_version(commits):
    with tempfile.TemporaryDirectory() as tmp:
        dd = DataDir.init(os.path.join(tmp, "d"), synchronous="NORMAL")
        repo = dd.repository()
        model: dict[str, bytes] = {}
        states = {0: {}}
        for ops in commits:
            with repo.batch() as b:
                for op, path, value in ops:
                    if op == "put":
                        b.put(path, value)
                        model[path] = value
                    elif path in model:
                        b.delete(path)
                        del model[path]
                    else:
                        with pytest.raises(NotFound):
                            b.delete(path)
            states[repo.head().seq] = dict(model)
        for version, state in states.items():
            listed = {e.path: e.size for e in repo.list("/", version)}
            assert listed == {p: len(v) for p, v in state.items()}
            for path in {p for _, p, _ in (op for ops in commits for op in ops)}:
                if path in state:
                    assert repo.get(path, version) == state[path]
                else:
                    with pytest.raises(NotFound):
                        repo.get(path, version)
        versions = sorted(states)
        for a, b in zip(versions, versions[1:]):
            changes = {c.path: c.change for c in repo.diff(a, b)}
            sa, sb = states[a], states[b]
            expect = {}
            for p in set(sa) | set(sb):
                if p not in sa:
                    expect[p] = "added"
                elif p not in sb:
                    expect[p] = "removed"
                elif sa[p] != sb[p]:
                    expect[p] = "changed"
            assert changes == expect
        assert verify_store(dd.store).ok
        dd.close()


def test_versions_history_and_errors(repo):
    assert repo.head().seq == 0
    sc1 = repo.put("/profile.json", b'{"name":"ada"}')
    sc2 = repo.put("/profile.json", b'{"name":"ada l."}')
    assert (sc1.seq, sc2.seq) == (1, 2)
    assert sc2.commit.prev == sc1.address
    assert repo.put("/profile.json", b'{"name":"ada l."}') is None  # same value: no new version
    assert [c.seq for c in repo.history()] == [2, 1, 0]
    assert repo.get("/profile.json", 1) == b'{"name":"ada"}'
    with pytest.raises(NotFound, match="does not exist"):
        repo.get("/profile.json", 9)
    with pytest.raises(NotFound, match="no such path"):
        repo.delete("/nope")
    with pytest.raises(PathError):
        repo.put("relative/path", b"x")
    assert repo.head().seq == 2  # failed writes left nothing behind


def test_listing_reads_tree_nodes_only(repo, datadir):
    with repo.batch() as b:
        for i in range(400):
            b.put(f"/v/{i:03d}", bytes([i % 256]) * 1000)
    datadir.store.drop_cache()
    before = datadir.store.blocks_read
    entries = list(repo.list("/v/"))
    assert len(entries) == 400 and {e.size for e in entries} == {1000}
    assert datadir.store.blocks_read - before < 100  # the 400 value blocks were not read


def test_failed_batch_stores_nothing(repo):
    repo.put("/a", b"1")
    with pytest.raises(RuntimeError):
        with repo.batch() as b:
            b.put("/b", b"2" * 1000)
            raise RuntimeError("client went away")
    assert repo.head().seq == 1
    with pytest.raises(NotFound):
        repo.get("/b")


def test_big_batch_flushed_in_the_background_is_whole_or_nothing(repo, datadir):
    """Over FLUSH_BLOCKS blocks, inserts run on a second thread while the batch goes on."""
    from pttd.store import FLUSH_BLOCKS

    n = FLUSH_BLOCKS * 2 + 500
    blocks_before, _ = datadir.store.block_stats()
    with pytest.raises(RuntimeError):
        with repo.batch() as b:
            for i in range(n):
                b.put(f"/bulk/{i:06d}", b"%06d" % i * 20)
            raise RuntimeError("stopped after the background inserts began")
    assert datadir.store.block_stats()[0] == blocks_before
    with repo.batch() as b:
        for i in range(n):
            b.put(f"/bulk/{i:06d}", b"%06d" % i * 20)
    assert sum(1 for _ in repo.list("/bulk/")) == n
    assert repo.get(f"/bulk/{n - 1:06d}") == b"%06d" % (n - 1) * 20
    assert verify_store(datadir.store).ok


def test_put_then_delete_in_one_batch_cancels(repo):
    with repo.batch() as b:
        b.put("/tmp", b"x")
        b.delete("/tmp")
    assert b.commit is None
    assert repo.head().seq == 0


def test_large_value_chunked_and_one_byte_edit_is_small(repo, datadir):
    data = bytearray(os.urandom(8 << 20))
    repo.put("/files/big", bytes(data))
    assert repo.info("/files/big").storage == "chunked"
    assert repo.get("/files/big") == data
    n0, bytes0 = datadir.store.block_stats()
    data[len(data) // 2] ^= 0xFF
    repo.put("/files/big", bytes(data))
    n1, bytes1 = datadir.store.block_stats()
    assert repo.get("/files/big") == data
    assert bytes1 - bytes0 <= 64 * 1024
    assert repo.get("/files/big", 1) != data


def test_put_file_streams_from_disk(repo, tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(os.urandom(300_000))
    repo.put_file("/f", str(f))
    assert repo.get("/f") == f.read_bytes()
    small = tmp_path / "s.bin"
    small.write_bytes(b"tiny")
    repo.put_file("/s", str(small))
    assert repo.info("/s").storage == "inline"


def _flip_byte_in(db_path, table, column, where="1=1", offset=None):
    db = sqlite3.connect(db_path)
    rowid, blob = db.execute(
        f"SELECT rowid, {column} FROM {table} WHERE {where} ORDER BY rowid DESC LIMIT 1"
    ).fetchone()
    blob = bytearray(blob)
    i = len(blob) // 2 if offset is None else offset
    blob[i] ^= 0x01
    db.execute(f"UPDATE {table} SET {column}=? WHERE rowid=?", (bytes(blob), rowid))
    db.commit()
    db.close()


@pytest.mark.parametrize("kind", [1, 2, 3, 4])
def test_flipped_byte_in_any_block_is_detected(tmp_path, kind):
    dd = DataDir.init(str(tmp_path / "d"))
    repo = dd.repository()
    repo.put("/small", b"s" * 500)  # a value block (kind 1)
    repo.put("/big", os.urandom(200_000))  # chunks (3) and a chunk-tree node (4)
    dd.close()
    _flip_byte_in(str(tmp_path / "d" / "pttd.sqlite3"), "blocks", "data", f"substr(data, 1, 1) = x'0{kind}'")
    dd = DataDir.open(str(tmp_path / "d"))
    rep = verify_store(dd.store)
    assert not rep.ok and any("corrupt block" in e for e in rep.errors)
    repo = dd.repository()
    with pytest.raises(CorruptBlock, match="corrupt block [0-9a-f]{64}"):
        repo.get("/small")
        repo.get("/big")
    dd.close()


@pytest.mark.parametrize("column,problem", [("sig", "bad signature"), ("block", "does not match its hash")])
def test_flipped_byte_in_a_commit_is_detected(tmp_path, column, problem):
    dd = DataDir.init(str(tmp_path / "d"))
    dd.repository().put("/x", b"1")
    dd.close()
    _flip_byte_in(str(tmp_path / "d" / "pttd.sqlite3"), "commits", column)
    dd = DataDir.open(str(tmp_path / "d"))
    assert not verify_store(dd.store).ok
    with pytest.raises(CorruptBlock, match=problem):
        dd.repository().get("/x")
    dd.close()


def test_a_commit_moved_to_another_seq_is_detected_though_it_was_read_before(tmp_path):
    """A commit read once is kept as checked; that copy was taken for any row with its
    hash, block and signature, whatever seq the row says."""
    dd = DataDir.init(str(tmp_path / "d"))
    repo = dd.repository()
    repo.put("/x", b"1")
    repo.put("/x", b"2")
    assert repo.get("/x", version=1) == b"1"  # commit 1 read, checked, kept
    dd.store.execute("DELETE FROM commits WHERE seq=2")
    dd.store.execute("UPDATE commits SET seq=2 WHERE seq=1")  # an older version passed off as newer
    with pytest.raises(CorruptBlock, match="stored as seq 2 says seq 1"):
        repo.get("/x")
    dd.close()


def test_secret_key_file_is_private(tmp_path):
    dd = DataDir.init(str(tmp_path / "d"))
    key_file = tmp_path / "d" / "keys" / f"{dd.default_repo_id()}.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "d" / "keys").stat().st_mode & 0o777 == 0o700
    dd.close()
    key_file.chmod(0o644)
    dd = DataDir.open(str(tmp_path / "d"))
    with pytest.raises(PttError, match="accessible by other users"):
        dd.repository()
    dd.close()


def test_remote_commits_bad_signature_rollback_and_fork(tmp_path):
    """A follower accepts newer commits of another repository and refuses the rest."""
    owner = DataDir.init(str(tmp_path / "owner"))
    repo = owner.repository()
    for i in range(3):
        repo.put("/n", b"%d" % i)
    commits = repo.history()[::-1]
    follower = Store(str(tmp_path / "f.sqlite3"), create=True)
    row = follower.add_repo(repo.key, owned=False)
    follower.accept_commit(row, commits[2].block, commits[2].signature)
    assert follower.head_seq(row) == 2
    with pytest.raises(RollbackRefused, match="older than the head"):
        follower.accept_commit(row, commits[1].block, commits[1].signature)
    bad_sig = bytes(64)
    with pytest.raises(SignatureError):
        follower.accept_commit(row, commits[3].block, bad_sig)
    assert follower.head_seq(row) == 2
    # The owner signs a second, different commit at seq 2: proof of a fork.
    sk = owner.keys.load(repo.id)
    forked = sign_commit(Commit(repo.key, 2, b"\x00" * 32, commits[1].address, 1), sk)
    with pytest.raises(ForkDetected):
        follower.accept_commit(row, forked.block, forked.signature)
    assert follower.forks(row) == [(2, forked.address)]
    # Once forked, the repository is no longer followed.
    with pytest.raises(ForkDetected, match="no longer following"):
        follower.accept_commit(row, commits[3].block, commits[3].signature)
    assert follower.head_seq(row) == 2
    owner.close()
    follower.close()


def test_gc_really_removes_deleted_data(tmp_path):
    dd = DataDir.init(str(tmp_path / "d"))
    repo = dd.repository()
    secret = b"SECRET-MARKER-" + os.urandom(16).hex().encode() + b"-" * 200
    repo.put("/keep", b"k" * 300)
    repo.put("/secret", secret)
    repo.put("/big-secret", secret * 400)
    repo.delete("/secret")
    repo.delete("/big-secret")
    rep = collect_garbage(dd.store, keep=1)
    assert rep.versions_pruned == 5 and rep.blocks_removed > 0
    assert [c.seq for c in repo.history()] == [5]
    with pytest.raises(NotFound, match="pruned"):
        repo.get("/keep", 1)
    assert repo.get("/keep") == b"k" * 300
    assert verify_store(dd.store).ok
    dd.close()
    for name in os.listdir(tmp_path / "d"):
        p = tmp_path / "d" / name
        if p.is_file():
            assert secret[:40] not in p.read_bytes(), name


def test_gc_without_keep_keeps_every_version(repo, datadir):
    repo.put("/a", b"x" * 500)
    repo.put("/a", b"y" * 500)
    rep = collect_garbage(datadir.store)
    assert rep.versions_pruned == 0 and rep.blocks_removed == 0
    assert repo.get("/a", 1) == b"x" * 500


def test_gc_refuses_to_sweep_when_a_tree_node_is_missing(tmp_path):
    dd = DataDir.init(str(tmp_path / "d"))
    repo = dd.repository()
    with repo.batch() as b:
        for i in range(300):
            b.put(f"/e/{i}", b"v" * 100)
    repo.put("/e/0", b"new")
    root = repo.head().commit.root
    leaf = dd.store.load_node(dd.store.load_node(root).vals[0])
    while leaf.level > 0:
        leaf_addr = leaf.vals[0]
        leaf = dd.store.load_node(leaf_addr)
    n_before, _ = dd.store.block_stats()
    dd.close()
    db = sqlite3.connect(str(tmp_path / "d" / "pttd.sqlite3"))
    db.execute("DELETE FROM blocks WHERE hash=?", (leaf_addr,))
    db.commit()
    db.close()
    dd = DataDir.open(str(tmp_path / "d"))
    with pytest.raises(PttError, match="missing block " + leaf_addr.hex()):
        collect_garbage(dd.store, keep=1)
    # Nothing was pruned or deleted: the old version is still readable.
    assert dd.store.block_stats()[0] == n_before - 1
    assert dd.repository().get("/e/0", 1) == b"v" * 100
    assert "missing block" in " ".join(verify_store(dd.store).errors)
    dd.close()


def test_read_only_repository_refuses_writes(tmp_path):
    owner = DataDir.init(str(tmp_path / "o"))
    repo = owner.repository()
    repo.put("/x", b"1")
    other = DataDir.init(str(tmp_path / "other"))
    row = other.store.add_repo(repo.key, owned=False)
    for sc in repo.history()[::-1]:
        other.store.accept_commit(row, sc.block, sc.signature)
    follower_view = other.repository(repo.id)
    assert not follower_view.writable
    with pytest.raises(PttError, match="read-only"):
        follower_view.put("/y", b"2")
    owner.close()
    other.close()


def test_store_from_a_newer_pttd_is_refused(tmp_path):
    dd = DataDir.init(str(tmp_path / "d"))
    dd.store.set_meta("schema", "99")
    dd.close()
    with pytest.raises(PttError, match="newer than this pttd understands"):
        DataDir.open(str(tmp_path / "d"))


@pytest.mark.parametrize("failure", [sqlite3.OperationalError("disk I/O error"), TypeError("a bug")])
def test_a_failed_background_insert_is_raised_by_the_next_use_as_the_stores_failure(failure):
    """SQLite's own error as it is; any other as InsertFailed, so that the write that
    meets it (a gateway's next request, say) does not take it for an error of its own."""

    class FailingDb:
        def execute(self, sql, params=()):
            raise failure

    conn = _Connection(FailingDb())
    conn.insert_blocks([(b"h" * 32, b"block")], background=True)
    expected = type(failure) if isinstance(failure, sqlite3.Error) else InsertFailed
    with pytest.raises(expected) as raised:
        conn.execute("SELECT 1")
    assert raised.value is failure or raised.value.__cause__ is failure
    conn.wait()  # raised once: the connection is usable again


def test_a_store_of_schema_8_gets_the_direct_messages_members_column(tmp_path, caplog):
    dd = DataDir.init(str(tmp_path / "d"))
    dd.store.execute(
        "INSERT INTO gw_dms(user, sender, path, peer, date) VALUES (?, ?, ?, ?, ?)", (b"u", b"s", "/p", b"o", 1)
    )
    dd.store.execute("ALTER TABLE gw_dms DROP COLUMN members")  # as schema 8 made it
    dd.store.set_meta("schema", "8")
    dd.close()
    with caplog.at_level(logging.INFO, logger="pttd.store"):
        dd = DataDir.open(str(tmp_path / "d"))
    try:
        assert "upgraded from schema 8 to 9" in caplog.text
        assert dd.store.get_meta("schema") == "9"
        assert dd.store.query("SELECT user, path, members FROM gw_dms") == [(b"u", "/p", None)]
    finally:
        dd.close()


def test_a_file_that_is_not_a_store_is_a_clear_error(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "pttd.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(PttError, match="cannot be opened"):
        DataDir.open(str(d))


def test_damaged_key_file_is_a_clear_error(tmp_path):
    dd = DataDir.init(str(tmp_path / "d"))
    key_file = tmp_path / "d" / "keys" / f"{dd.default_repo_id()}.key"
    key_file.write_text("not hex\n")
    with pytest.raises(PttError, match="not a 64-digit hex seed"):
        dd.repository()
    dd.close()


def test_bad_store_settings_and_paths_are_clear_errors(tmp_path):
    with pytest.raises(PttError, match="synchronous mode must be one of"):
        DataDir.init(str(tmp_path / "d"), synchronous="SOMETIMES")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PttError, match="not a directory"):
        DataDir.init(str(tmp_path / "file"))


def test_a_store_locked_by_another_process_is_a_one_line_error_and_close_does_not_wait(tmp_path):
    """Another process holding the write lock past the busy timeout: the write fails with
    a StoreBusy naming the store (a PttError: one line from pttctl; still an sqlite3
    error for whatever fails a group of writes on it), and closing the store does not
    wait out the busy timeout for its checkpoint (a read-only pttctl ls took 31 s)."""
    import threading

    from pttd.errors import StoreBusy

    path = str(tmp_path / "s.sqlite3")
    Store(path, create=True).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        store = Store(path, busy_timeout=0.2)
        with pytest.raises(StoreBusy, match="being written by another process") as exc:
            with store.write():
                pass
        assert isinstance(exc.value, PttError) and isinstance(exc.value, sqlite3.Error)
        store._db.execute("PRAGMA busy_timeout=30000")  # as long as a real one
        closing = threading.Thread(target=store.close)
        closing.start()
        closing.join(10)
        assert not closing.is_alive()
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_a_full_disk_is_reported_as_such_and_the_store_stays_usable(tmp_path):
    """SQLite rolls back by itself when the disk is full; the ROLLBACK after it used to
    fail and hide the error under 'cannot rollback - no transaction is active'."""
    dd = DataDir.init(str(tmp_path / "d"))
    try:
        repo = dd.repository()
        repo.put("/small", b"fits")
        pages = dd.store.query("PRAGMA page_count")[0][0]
        dd.store._db.execute(f"PRAGMA max_page_count={pages + 2}")
        with pytest.raises(sqlite3.OperationalError, match="full"):
            repo.put("/big", os.urandom(4 << 20))
        dd.store._db.execute("PRAGMA max_page_count=1073741823")
        assert repo.get("/small") == b"fits"
        with pytest.raises(NotFound):
            repo.get("/big")
        repo.put("/after", b"ok")
        assert repo.get("/after") == b"ok"
    finally:
        dd.close()


def test_writing_the_same_content_again_repairs_a_damaged_block(tmp_path):
    """A block damaged on the disk is replaced when the same bytes are written again (it
    was kept as it was: the acknowledged write stayed unreadable)."""
    dd = DataDir.init(str(tmp_path / "d"))
    try:
        repo = dd.repository()
        value = os.urandom(5000)
        repo.put("/a", value)
        addr = bytes.fromhex(repo.info("/a").address)
        dd.store._db.execute("UPDATE blocks SET data=? WHERE hash=?", (b"\x01" + b"x" * 5000, addr))
        dd.store.drop_cache()
        with pytest.raises(CorruptBlock):
            repo.get("/a")
        repo.put("/b", value)  # the same content, at another path
        assert repo.get("/a") == value and repo.get("/b") == value
    finally:
        dd.close()


@pytest.mark.parametrize("left", [1000, 0])
def test_a_file_that_shrinks_while_being_stored_is_refused_and_nothing_is_stored(tmp_path, monkeypatch, left):
    """Chunking was decided from the file's size before reading it: a file cut to 32 KiB
    or less meanwhile gave a chunked reference to a small value, which every reader
    refuses, in a leaf that other paths share (the commit was acknowledged, and those
    paths unreadable from then on). An emptied file was a ValueError traceback."""
    import pttd.repo

    real = pttd.repo.chunk_file

    def shrinking(filename, emit):
        with open(filename, "r+b") as f:
            f.truncate(left)  # cut by another process as we start reading
        return real(filename, emit)

    dd = DataDir.init(str(tmp_path / "d"))
    try:
        repo = dd.repository()
        repo.put("/neighbour", b"n" * 100)
        head = repo.head().commit.seq
        f = tmp_path / "big"
        f.write_bytes(os.urandom(200_000))
        monkeypatch.setattr(pttd.repo, "chunk_file", shrinking)
        with pytest.raises(PttError, match="changed while it was being stored"):
            repo.put_file("/big", str(f))
        assert repo.head().commit.seq == head and repo.get("/neighbour") == b"n" * 100
        with pytest.raises(NotFound):
            repo.get("/big")
    finally:
        dd.close()


def test_a_block_missing_from_an_owned_repository_is_found_though_a_followed_one_lacks_it_too(tmp_path):
    """A followed (sparse) repository's walk counts the blocks it never fetched, and
    used to put them in the set of blocks seen: an owned repository sharing such a
    block, walked after it, skipped it unchecked. verify said OK and gc swept, where
    a missing block must be an error and stop gc before it deletes anything."""
    from pttd.repo import Repository

    other = DataDir.init(str(tmp_path / "other"))
    dd = DataDir.init(str(tmp_path / "d"))
    try:
        orepo = other.repository()
        value = b"shared " + b"x" * 300
        orepo.put("/v", value)
        head = orepo.head()
        followed = dd.store.add_repo(orepo.key, owned=False)  # its root held, nothing under it
        dd.store.accept_commit(
            followed, head.block, head.signature, rows=[(head.commit.root, other.store.get_block(head.commit.root))]
        )
        alone = verify_store(dd.store)
        assert alone.ok and alone.not_fetched == 1  # its value, never fetched: counted, no error
        mine = Repository.create(dd.store, dd.keys)  # walked after the followed one, by id
        mine.put("/photo", value)  # the same value block
        vaddr = bytes.fromhex(mine.info("/photo").address)
        dd.store._db.execute("DELETE FROM blocks WHERE hash=?", (vaddr,))
        dd.store.drop_cache()
        rep = verify_store(dd.store)
        assert not rep.ok and any(vaddr.hex() in e for e in rep.errors)
    finally:
        dd.close()
        other.close()
    # gc: the same tree in an owned repository and in a followed one that fetched none of
    # it; the shared root node lost: gc stops before deleting (it swept the tree's blocks)
    other = DataDir.init(str(tmp_path / "other2"))
    dd = DataDir.init(str(tmp_path / "d2"))
    try:
        orepo = other.repository()
        orepo.put("/v", b"y" * 300)
        head = orepo.head()
        followed = dd.store.add_repo(orepo.key, owned=False)
        dd.store.accept_commit(followed, head.block, head.signature)  # nothing fetched
        mine = Repository.create(dd.store, dd.keys)
        mine.put("/v", b"y" * 300)
        assert mine.head().commit.root == head.commit.root
        dd.store._db.execute("DELETE FROM blocks WHERE hash=?", (head.commit.root,))
        dd.store.drop_cache()
        before = dd.store.block_stats()[0]
        with pytest.raises(PttError, match="missing block"):
            collect_garbage(dd.store)
        assert dd.store.block_stats()[0] == before
    finally:
        dd.close()
        other.close()


def test_an_init_that_fails_halfway_leaves_nothing_that_blocks_the_next(tmp_path, monkeypatch):
    """The store is built under another name and renamed once its repository exists: a
    failure between (a full disk, a key directory not writable) used to leave a store
    that init refused ('already a pttd data directory') and nothing could use ('has no
    repository of its own')."""
    import pttd.datadir

    real = pttd.datadir.Repository.create

    def failing(store, keys):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pttd.datadir.Repository, "create", failing)
    with pytest.raises(OSError):
        DataDir.init(str(tmp_path / "d"))
    assert not os.path.exists(tmp_path / "d" / "pttd.sqlite3")
    monkeypatch.setattr(pttd.datadir.Repository, "create", real)
    dd = DataDir.init(str(tmp_path / "d"))
    try:
        assert dd.repository().head().commit.seq == 0
        assert sorted(f for f in os.listdir(tmp_path / "d") if "init" in f) == []
    finally:
        dd.close()


def test_a_write_that_would_make_a_node_no_peer_can_receive_is_refused(tmp_path):
    """Paths chosen so that none is a cut fall into one leaf without bound: past 1 MiB a
    node could not go in any frame, and the repository could no longer be synced. Such a
    write is refused (one line), and nothing is stored."""
    from protocol import tree
    from protocol.errors import FormatError

    dd = DataDir.init(str(tmp_path / "d"))
    try:
        repo = dd.repository()
        repo.put("/before", b"x")
        head = repo.head().commit.seq
        paths, i = [], 0
        while len(paths) < 16_000:  # ~16,000 x (a short path and a 64-byte value) > 1 MiB
            p = f"/k/{i:07d}"
            if tree.key_level(p.encode()) == 0:
                paths.append(p)
            i += 1
        with pytest.raises(FormatError, match="would make a tree node of .* over 1048576"):
            with repo.batch() as b:
                for p in paths:
                    b.put(p, b"v" * 64)
        assert repo.head().commit.seq == head and repo.get("/before") == b"x"
        with repo.batch() as b:  # far fewer: fine
            for p in paths[:2000]:
                b.put(p, b"v" * 64)
        assert repo.get(paths[0]) == b"v" * 64
    finally:
        dd.close()


def test_the_checkpoint_after_a_write_does_not_wait_for_another_processs_reader(tmp_path, monkeypatch):
    """Past WAL_CHECKPOINT_BYTES a write is followed by a TRUNCATE checkpoint, which waits
    for the readers of other connections: for the whole busy timeout, holding the store's
    lock. It is skipped instead (the next write tries again), and the write returns."""
    import threading

    import pttd.store

    monkeypatch.setattr(pttd.store, "WAL_CHECKPOINT_BYTES", 1)
    dd = DataDir.init(str(tmp_path / "d"))
    reader = sqlite3.connect(dd.store.path, isolation_level=None)
    try:
        repo = dd.repository()
        repo.put("/a", b"1" * 100)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM blocks").fetchone()  # a read transaction held open
        repo.put("/b", b"2" * 100)  # a snapshot newer than the reader's: TRUNCATE must wait
        writing = threading.Thread(target=repo.put, args=("/c", b"3" * 100))
        writing.start()
        writing.join(10)
        assert not writing.is_alive()  # it waited the 30 s busy timeout before
        reader.execute("COMMIT")
        repo.put("/d", b"4" * 100)  # no reader now: the log is emptied
        assert dd.store.wal_bytes() == 0 and repo.get("/c") == b"3" * 100
    finally:
        reader.close()
        dd.close()


def test_verify_reports_every_missing_block_not_only_the_first(tmp_path):
    """verify stopped a version's tree at its first missing or corrupt block; what lay
    after it (and, marked seen, in every other version) went unchecked."""
    dd = DataDir.init(str(tmp_path / "d"))
    try:
        repo = dd.repository()
        with repo.batch() as b:
            for i in range(5):
                b.put(f"/v{i}", bytes([i]) * 500)
        gone = [bytes.fromhex(repo.info(f"/v{i}").address) for i in (1, 3)]
        for a in gone:
            dd.store._db.execute("DELETE FROM blocks WHERE hash=?", (a,))
        dd.store._db.execute(
            "UPDATE blocks SET data=? WHERE hash=?", (b"\x01bad", bytes.fromhex(repo.info("/v4").address))
        )
        dd.store.drop_cache()
        rep = verify_store(dd.store)
        named = " ".join(rep.errors)
        assert all(a.hex() in named for a in gone) and repo.info("/v4").address in named
        assert rep.values == 2  # /v0 and /v2 checked and sound
    finally:
        dd.close()


def test_a_gc_whose_vacuum_fails_says_its_blocks_are_deleted(tmp_path, capsysbinary, monkeypatch):
    """The sweep is committed before the file is rebuilt: a VACUUM that fails (a full
    disk, say) is reported beside what gc did, not as a failure of gc (it was a raw
    sqlite3 traceback after a gc that had deleted its blocks)."""
    from cli.pttctl import main

    monkeypatch.setenv("PTT_HOME", str(tmp_path / "home"))
    assert main(["init"]) == 0
    dd = DataDir.open(str(tmp_path / "home"))
    try:
        repo = dd.repository()
        repo.put("/a", os.urandom(5000))
        repo.put("/a", os.urandom(5000))
    finally:
        dd.close()

    def failing_vacuum(self):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Store, "vacuum", failing_vacuum)
    capsysbinary.readouterr()
    assert main(["gc", "--keep", "1"]) == 0
    out = capsysbinary.readouterr().out
    assert b"pruned 2 versions, removed 3 blocks" in out
    assert b"rebuilding it failed (database or disk is full)" in out


def test_blocks_asked_for_are_read_only_as_far_as_one_answer_carries(tmp_path):
    """A peer's want of 4,096 large blocks made the store thread read and hash all of
    them (120 MB in 0.2 s, every other read waiting) for one answer of 4 MiB."""
    from blake3 import blake3

    store = Store(str(tmp_path / "s.sqlite3"), create=True)
    # small blocks first, then large ones: read by their sizes, not by what came before
    blocks = [os.urandom(100) for _ in range(10)] + [os.urandom(256 << 10) for _ in range(20)]
    rows = [(blake3(b).digest(), b) for b in blocks]
    store.put_fetched(rows, [])
    unknown = [os.urandom(32), os.urandom(32)]
    asked = [rows[0][0], unknown[0]] + [h for h, _ in rows[1:]] + [unknown[1]]
    before = store.blocks_read
    got, missing = store.get_blocks(asked, budget=1 << 20)
    # the 10 small and 3 large fit in 1 MiB; the rest is asked again, neither sent nor missing
    assert got == blocks[:13] and missing == unknown[:1]
    assert store.blocks_read - before == 13
    got, missing = store.get_blocks([h for h, _ in rows[12:]], budget=1000)
    assert got == [blocks[12]] and missing == []  # one at least, however large
    got, missing = store.get_blocks(asked)  # no budget: all
    assert got == blocks and missing == unknown
    store.close()


def test_the_caches_of_nodes_hold_a_bounded_number_of_bytes(tmp_path, monkeypatch):
    """The caches counted nodes, not bytes: 8,192 decoded nodes and 2,048 served blocks
    of a repository whose owner made nodes of megabytes (a hub syncs whoever joins)
    could hold gigabytes."""
    import pttd.store as store_mod
    from protocol import tree

    monkeypatch.setattr(store_mod, "NODE_CACHE_BYTES", 1 << 20)
    monkeypatch.setattr(store_mod, "SERVED_CACHE_BYTES", 1 << 20)
    dd = DataDir.init(str(tmp_path / "d"))
    repo = dd.repository()
    roots = []
    for n in range(12):  # one large leaf per version: 400 keys without a cut, ~40 KB
        with repo.batch() as b:
            for i in range(400):
                key = f"/big{n}/{'x' * 60}{i:04d}"
                if tree.key_level(key.encode()) == 0:
                    b.put(key, b"v")
        roots.append(repo.head().commit.root)
    store = dd.store
    store.drop_cache()
    for root in roots:
        for address in tree.path_nodes(root, b"/big", store.load_node):
            store.node_block(address)
    assert store._nodes_bytes <= 1 << 20 and store._served_bytes <= 1 << 20
    assert sum(len(b) for b in store._served.values()) == store._served_bytes
    assert len(store._nodes) >= 1  # still caching
    dd.close()
