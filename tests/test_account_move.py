"""Account moves: pttctl user export on one gateway, pttctl user import on another; the
repository keeps its key, its history and its followers (a hub)."""

from __future__ import annotations

import json
import os
import stat

import httpx
import pytest
import trio

from cli.pttctl import main as pttctl
from pttd.errors import PttError
from pttd.gateway import account
from tests.gwutil import gateway, login, result
from tests.netutil import start_daemon

PASSPHRASE = "correct horse battery staple"


async def hub_texts(hubweb: httpx.AsyncClient, topic: str) -> list[str]:
    return [m["message"]["value"] for m in result(await hubweb.get(f"/topics/{topic}"))]


async def wait_hub(hubweb, topic: str, want: list[str]) -> None:
    with trio.fail_after(10):  # polled: the hub's view follows syncs this test is not told of
        while await hub_texts(hubweb, topic) != want:
            await trio.sleep(0.05)


async def run_pttctl(running, *argv: str) -> tuple[int, str, str]:
    """pttctl in this process (its control client is blocking: a worker thread)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()

    def call() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return pttctl(["--data-dir", running.daemon.data_dir, "--json", *argv])

    code = await trio.to_thread.run_sync(call)
    return code, out.getvalue(), err.getvalue()


async def test_export_on_one_gateway_import_on_another(tmp_path, monkeypatch):
    monkeypatch.setenv("PTT_TEST_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("PTT_WRONG_PASSPHRASE", "not the passphrase")
    async with trio.open_nursery() as nursery:
        hub = await start_daemon(nursery, os.path.join(tmp_path, "hub"), mode="hub")
        async with (
            gateway(tmp_path, "g1", hubs=[hub.address]) as g1,
            gateway(tmp_path, "g2", hubs=[hub.address]) as g2,
            httpx.AsyncClient(base_url=hub.http, timeout=10.0) as hubweb,
        ):
            alice, h1 = await login(g1.web, "alice")
            texts = [f"message {i}" for i in range(3)]
            for t in texts:
                result(await g1.web.post("/topics/general", json={"data": t}, headers=h1))
            await wait_hub(hubweb, "general", texts)
            users_before = len(await g2.gateway.list_users())

            file = str(tmp_path / "alice.account")
            code, out, err = await run_pttctl(
                g1, "user", "export", "test:alice", "-o", file, "--passphrase-env", "PTT_TEST_PASSPHRASE"
            )
            assert code == 0, err
            assert json.loads(out) == {"name": "test:alice", "key": alice, "file": file, "moved": True}
            assert stat.S_IMODE(os.stat(file).st_mode) == 0o600
            doc = json.load(open(file))
            assert doc["key"] == alice and "seed" not in json.dumps(doc)  # the secret is sealed
            # a write that fails (a full disk) leaves no half file, and says what to do
            import errno

            import cli.pttctl

            def full_disk(fd, data):
                raise OSError(errno.ENOSPC, "No space left on device")

            again = str(tmp_path / "again.account")
            with monkeypatch.context() as m:
                m.setattr(cli.pttctl, "_write_fully", full_disk)
                code, _, err = await run_pttctl(
                    g1, "user", "export", "test:alice", "-o", again, "--passphrase-env", "PTT_TEST_PASSPHRASE"
                )
            assert code == 1 and "No space left" in err and "run the export again" in err, err
            assert not os.path.exists(again)
            # the file is never overwritten
            code, _, err = await run_pttctl(
                g1, "user", "export", "test:alice", "-o", file, "--passphrase-env", "PTT_TEST_PASSPHRASE"
            )
            assert code == 1 and "cannot create" in err

            # moved: the old gateway refuses alice's writes (two signers would fork the
            # repository) and still serves her reads
            assert "exported" in result(await g1.web.post("/topics/general", json={"data": "x"}, headers=h1), 403)
            assert len(result(await g1.web.get("/topics/general", headers=h1))) == 3

            # a wrong passphrase: refused, nothing stored
            code, _, err = await run_pttctl(
                g2, "user", "import", file, "--peer", g1.address, "--passphrase-env", "PTT_WRONG_PASSPHRASE"
            )
            assert code == 1 and "wrong passphrase" in err
            # the file names a login that is not a local account's: only if the operator says so
            code, _, err = await run_pttctl(
                g2, "user", "import", file, "--peer", g1.address, "--passphrase-env", "PTT_TEST_PASSPHRASE"
            )
            assert code == 1 and "--keep-name" in err
            assert len(await g2.gateway.list_users()) == users_before
            assert "seed" not in doc and "head" not in doc  # all sealed

            import_args = ["user", "import", file, "--peer", g1.address, "--keep-name"]
            import_args += ["--passphrase-env", "PTT_TEST_PASSPHRASE"]
            code, out, err = await run_pttctl(g2, *import_args)
            assert code == 0, err
            imported = json.loads(out)
            assert imported["key"] == alice and imported["name"] == "test:alice" and imported["version"] >= 4

            # the same login at the new gateway: the same repository, all her posts
            again, h2 = await login(g2.web, "alice")
            assert again == alice
            assert [p["message"]["value"] for p in result(await g2.web.get("/topics/general", headers=h2))] == texts
            assert result(await g2.web.get("/profile", headers=h2))["name"] == "alice"

            # she writes at the new home; the hub, following her key, keeps up
            result(await g2.web.post("/topics/general", json={"data": "from my new home"}, headers=h2))
            await wait_hub(hubweb, "general", texts + ["from my new home"])

            # importing twice is refused
            code, _, err = await run_pttctl(g2, *import_args)
            assert code == 1 and "already exists" in err
            nursery.cancel_scope.cancel()


async def test_import_without_the_history_is_refused(tmp_path):
    async with gateway(tmp_path, "g1") as g1, gateway(tmp_path, "g2") as g2:
        await login(g1.web, "carol")
        res = await g1.call("user_export", name="test:carol", passphrase=PASSPHRASE, keep=True)
        # no peer serves carol's repository to g2: taking it in would fork it
        with pytest.raises(Exception, match="without its history would fork"):
            await g2.call("user_import", account=res["account"], passphrase=PASSPHRASE, timeout=1, keep_name=True)
        assert await g2.gateway.list_users() == []


async def test_import_waits_for_the_version_the_file_names(tmp_path):
    async with gateway(tmp_path, "g1") as g1, gateway(tmp_path, "g2", peers=[]) as g2:
        await login(g1.web, "erin")
        res = await g1.call("user_export", name="test:erin", passphrase=PASSPHRASE, keep=True)
        sk, name, pw, head = account.open_account(res["account"], PASSPHRASE)
        assert head is not None and head >= 1
        # a file that says more was signed than the peers serve (its old home went on
        # writing, or the peer is a stale copy): refused, nothing stored
        ahead = account.seal_account(sk, "erin", pw, PASSPHRASE, head=head + 5)
        with pytest.raises(PttError, match="would fork"):
            await g2.call("user_import", account=ahead, passphrase=PASSPHRASE, peers=[g1.address], timeout=1)
        assert await g2.gateway.list_users() == []
        # the true file, from the same peer: taken in, under the name the file gives
        done = await g2.call(
            "user_import", account=res["account"], passphrase=PASSPHRASE, peers=[g1.address], keep_name=True
        )
        assert done["version"] >= head and done["name"] == "test:erin"


def test_account_files_refuse_tampering_and_bad_limits():
    from nacl.signing import SigningKey

    sk = SigningKey.generate()
    doc = account.seal_account(sk, "dave", None, PASSPHRASE)
    opened, name, pw, head = account.open_account(doc, PASSPHRASE)
    assert bytes(opened) == bytes(sk) and name == "dave" and pw is None and head is None
    with pytest.raises(account.AccountFileError, match="wrong passphrase"):
        account.open_account(doc, PASSPHRASE + "!")
    flipped = dict(doc, sealed=("0" if doc["sealed"][0] != "0" else "1") + doc["sealed"][1:])
    with pytest.raises(account.AccountFileError, match="wrong passphrase"):
        account.open_account(flipped, PASSPHRASE)
    other = SigningKey.generate().verify_key
    with pytest.raises(account.AccountFileError, match="does not match"):
        account.open_account(dict(doc, key=bytes(other).hex()), PASSPHRASE)
    greedy = dict(doc, kdf=dict(doc["kdf"], memlimit=1 << 40))
    with pytest.raises(account.AccountFileError, match="limits out of range"):
        account.open_account(greedy, PASSPHRASE)
    with pytest.raises(account.AccountFileError, match="not a pttd account file"):
        account.open_account({"format": "other"}, PASSPHRASE)
    with pytest.raises(account.AccountFileError, match="at least 8"):
        account.seal_account(sk, "dave", None, "short")


async def test_pttctl_user_passwd_sets_a_password(tmp_path, monkeypatch):
    import io

    async with gateway(tmp_path) as g:
        result(await g.web.post("/register", json={"data": {"username": "dee", "password": "the old one"}}))
        monkeypatch.setattr("sys.stdin", io.StringIO("the new one\n"))
        code, out, err = await run_pttctl(g, "user", "passwd", "dee", "--password-stdin")
        assert code == 0, err
        assert json.loads(out) == {"name": "dee", "sessions_ended": 1}
        new = {"data": {"username": "dee", "password": "the new one"}}
        assert result(await g.web.post("/login", json=new))["token"]


async def test_direct_messages_reach_the_old_homes_users_after_a_move(tmp_path):
    """The old home kept the moved user's row and took her for a user of its own: it
    never followed her envelopes, so what she sent from her new home to a friend on the
    old one was never delivered (the other way worked)."""

    def texts(convs) -> list[str]:
        return sorted(m["message"]["value"] for c in convs for m in c["messages"])

    async with gateway(tmp_path, "g1") as g1, gateway(tmp_path, "g2", peers=[g1.address]) as g2:
        alice, ha = await login(g1.web, "alice")
        carol, hc = await login(g1.web, "carol")
        result(await g1.web.post("/friends", json={"data": {"key": alice, "name": "A"}}, headers=hc))
        result(await g1.web.post("/friends", json={"data": {"key": carol, "name": "C"}}, headers=ha))
        result(await g1.web.post("/dm", json={"data": {"key": carol, "message": "before the move"}}, headers=ha))
        dave, _ = await login(g1.web, "dave")
        result(await g1.web.post("/friends", json={"data": {"key": dave, "name": "D"}}, headers=ha))
        group = {"members": [carol, dave], "message": "to both", "name": "pair"}
        result(await g1.web.post("/dms", json={"data": group}, headers=ha))
        exported = await g1.call("user_export", name="test:alice", passphrase=PASSPHRASE)
        await g2.call(
            "user_import", account=exported["account"], passphrase=PASSPHRASE, peers=[g1.address], keep_name=True
        )
        again, ha2 = await login(g2.web, "alice")
        assert again == alice
        # her own index at the new home has the message to the channel once, as at the old
        # (it was once per member: one envelope each)
        assert texts(result(await g2.web.get("/dm", headers=ha2))).count("to both") == 1
        result(await g1.web.post("/dm", json={"data": {"key": alice, "message": "carol to alice"}}, headers=hc))
        result(
            await g2.web.post("/dm", json={"data": {"key": carol, "message": "alice, moved, to carol"}}, headers=ha2)
        )
        want = ["alice, moved, to carol", "before the move", "carol to alice", "to both"]
        with trio.fail_after(20):
            while texts(result(await g1.web.get("/dm", headers=hc))) != want:
                await trio.sleep(0.05)
            while texts(result(await g2.web.get("/dm", headers=ha2))) != want:
                await trio.sleep(0.05)


async def test_a_name_taken_while_the_repository_is_brought_is_a_conflict(tmp_path, monkeypatch):
    """The name was checked before the repository was brought (up to a minute); a
    registration of it meanwhile made the import fail on the store's constraint, after
    the gateway had stopped following the repository."""
    async with gateway(tmp_path, "g1") as g1, gateway(tmp_path, "g2", peers=[g1.address]) as g2:
        await login(g1.web, "dave")
        res = await g1.call("user_export", name="test:dave", passphrase=PASSPHRASE, keep=True)
        key = bytes.fromhex(res["key"])
        await g2.gateway.node.follow(key, ["/topics/__gossiping/"], [g1.address])  # a friend's envelopes
        real = g2.gateway.node.sync_once

        async def meanwhile(*args, **kwargs):
            f = await real(*args, **kwargs)
            await g2.gateway.add_user("dave", "someone else's password", None)
            return f

        monkeypatch.setattr(g2.gateway.node, "sync_once", meanwhile)
        with pytest.raises(Exception, match="already exists here"):
            await g2.call("user_import", account=res["account"], passphrase=PASSPHRASE, name="dave")
        f = g2.gateway.node.follows.get(key)
        assert f is not None and f.persistent and f.prefixes == ["/topics/__gossiping/"]  # followed as before
        assert [u["name"] for u in await g2.gateway.list_users()] == ["dave"]
