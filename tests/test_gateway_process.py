"""The gateway as users run it: a `pttd start --mode gateway` process, pttctl, SIGKILL, schemathesis."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from nacl.signing import SigningKey

# A fixed seed keeps CI repeatable; PTTD_FUZZ_SEED=random (or a number) explores further.
FUZZ_SEED = os.environ.get("PTTD_FUZZ_SEED", "20261126")
if FUZZ_SEED == "random":
    FUZZ_SEED = str(random.randint(0, 2**32))

CONFIG = """
[gateway]
test_login = true
registration = true
"""


class Gateway:
    def __init__(self, tmp_path, name: str = "gw", synchronous: str = "FULL"):
        self.dir = tmp_path / name
        self.config = tmp_path / f"{name}.toml"
        self.config.write_text(CONFIG + f'\n[store]\nsynchronous = "{synchronous}"\n')
        self.log = tmp_path / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        run = self.dir / "run.json"
        if run.exists():
            run.unlink()  # left by a killed daemon
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli.pttd_main", "start", "--mode", "gateway", "--data-dir", str(self.dir)]
                + ["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--config", str(self.config)],
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pttd exited: {self.log.read_text()}")
            try:
                info = json.loads(run.read_text())
                if info.get("pid") == self.proc.pid:
                    self.url = info["http"][0]
                    return self.url
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.02)
        raise AssertionError(f"pttd not ready in 30 s: {self.log.read_text()}")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def pttctl(self, *args, input: bytes = b""):
        return subprocess.run(
            [sys.executable, "-m", "cli.pttctl", "--data-dir", str(self.dir), *args],
            input=input,
            capture_output=True,
            timeout=60,
        )


@pytest.fixture
def gw(tmp_path):
    g = Gateway(tmp_path)
    g.start()
    yield g
    g.stop(signal.SIGKILL)


def test_pttctl_users_and_chat_actions(gw):
    r = gw.pttctl("user", "add", "bob", "--password-stdin", input=b"a long password\n")
    assert r.returncode == 0, r.stderr
    bob = r.stdout.decode().split()[0]
    assert len(bob) == 64
    again = gw.pttctl("user", "add", "bob", "--password-stdin", input=b"a long password\n")
    assert again.returncode == 1 and b"already exists" in again.stderr
    listed = json.loads(gw.pttctl("--json", "user", "list").stdout)
    assert [(u["name"], u["key"], u["password"]) for u in listed["users"]] == [("bob", bob, True)]
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        res = http.post("/login", json={"data": {"username": "bob", "password": "a long password"}})
        assert res.status_code == 200 and res.json()["result"]["key"] == bob
        token = res.json()["result"]["token"]
        # the chat actions act on the data directory's own repository
        assert gw.pttctl("post", "general", "from the command line").returncode == 0
        assert gw.pttctl("topics").stdout.decode().split() == ["general"]
        read = gw.pttctl("read", "general")
        assert read.returncode == 0 and "from the command line" in read.stdout.decode()
        assert "from the command line" in gw.pttctl("read", "general", "--limit", "1").stdout.decode()
        nothing = gw.pttctl("read", "general", "--limit", "0")
        assert nothing.returncode == 1 and b"limit must be a positive" in nothing.stderr
        assert gw.pttctl("friends", "add", bob).returncode == 0
        assert bob in gw.pttctl("friends").stdout.decode()
        sent = gw.pttctl("dm", bob, "hello bob")
        assert sent.returncode == 0, sent.stderr
        convs = http.get("/dm", params={"token": token}).json()["result"]
        assert [m["message"]["value"] for m in convs[0]["messages"]] == ["hello bob"]
        assert "hello bob" in gw.pttctl("dms").stdout.decode()
        bad = gw.pttctl("post", "../x", "no")
        assert bad.returncode == 1 and b"topic" in bad.stderr


def test_every_answered_post_survives_sigkill(tmp_path):
    """A client posts 1,000 messages while the gateway is killed at a random moment."""
    g = Gateway(tmp_path)
    url = g.start()
    acked: list[tuple[str, str]] = []  # (token, post id)
    kill_at = random.randint(100, 900)
    stop = threading.Event()
    lock = threading.Lock()
    tokens = []
    with httpx.Client(base_url=url, timeout=10) as http:
        for i in range(4):
            tokens.append(http.post("/test-login", json={"data": {"id": f"c{i}"}}).json()["result"]["token"])

    def client(token: str, n: int) -> None:
        with httpx.Client(base_url=url, timeout=10) as http:
            for k in range(n):
                if stop.is_set():
                    return
                try:
                    r = http.post("/topics/crash", json={"data": f"m{k}"}, headers={"Authorization": f"Bearer {token}"})
                except httpx.HTTPError:
                    return  # the gateway is gone: this post was not answered
                if r.status_code == 200:
                    with lock:
                        acked.append((token, r.json()["result"]["id"]))
                        if len(acked) >= kill_at and not stop.is_set():
                            stop.set()
                            g.proc.kill()

    threads = [threading.Thread(target=client, args=(t, 250)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    g.proc.kill()
    g.proc.wait(timeout=30)
    assert len(acked) >= kill_at
    url = g.start()
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            for token in tokens:
                r = http.get("/topics/crash", headers={"Authorization": f"Bearer {token}"})
                have = {p["id"] for p in r.json()["result"]}
                want = {pid for t, pid in acked if t == token}
                assert want <= have, f"{len(want - have)} answered posts lost"
    finally:
        g.stop()


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_schema(gw):
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        token = http.post("/test-login", json={"data": {"id": "fuzzer"}}).json()["result"]["token"]
        spec = http.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1") and "/topics/{topic}" in spec["paths"]
    checks = [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "unsupported_method",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{gw.url}/openapi.json", "--checks", ",".join(checks)]
        # /events is a stream that stays open: its own tests cover it
        + ["--exclude-path", "/events", "-H", f"Authorization: Bearer {token}", "--max-examples", "8"]
        # one worker: hypothesis parses lambdas with Python's ast, which is not thread-safe on 3.11
        + ["--workers", "1", "--phases", "examples,coverage,fuzzing", "--seed", FUZZ_SEED],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, NO_COLOR="1"),
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "27 passed" in r.stdout or " passed" in r.stdout


def test_rekey_reseals_every_key_and_keeps_users_logged_in(tmp_path):
    g = Gateway(tmp_path)
    url = g.start()
    with httpx.Client(base_url=url, timeout=10) as http:
        creds = {"data": {"username": "ann", "password": "ann's password"}}
        token = http.post("/register", json=creds).json()["result"]["token"]
        post = http.post("/topics/t", json={"data": "before the rotation"}, params={"token": token}).json()["result"]
        # a user logged in with their own key: nothing of theirs is sealed here (rekey
        # failed on their empty row, so the key could not be rotated once anyone had)
        own = SigningKey.generate()
        c = http.get("/login/challenge", params={"key": own.verify_key.encode().hex()}).json()["result"]
        signed = {"key": own.verify_key.encode().hex(), "nonce": c["nonce"]}
        signed["signature"] = own.sign(bytes.fromhex(c["sign"])).signature.hex()
        assert http.post("/login", json={"data": signed}).status_code == 200
    old_key = (g.dir / "gateway.key").read_text()
    # refused while the daemon runs
    busy = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.pttd_main",
            "rekey",
            "--data-dir",
            str(g.dir),
            "--new-key-file",
            str(tmp_path / "k2"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert busy.returncode == 1 and "already running" in busy.stderr
    g.stop()
    new_file = tmp_path / "new.key"
    r = subprocess.run(
        [sys.executable, "-m", "cli.pttd_main", "rekey", "--data-dir", str(g.dir), "--new-key-file", str(new_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "re-sealed 1 hosted users' keys" in r.stdout
    assert os.stat(new_file).st_mode & 0o777 == 0o600 and new_file.read_text() != old_key
    # the old key no longer opens the store
    with pytest.raises(AssertionError, match="does not open"):
        g.start()
    g.config.write_text(CONFIG + f'\nkey_file = "{new_file}"\n')
    url = g.start()
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            # the same token still works: the signing secret was re-sealed, not replaced
            got = http.get("/topics/t", params={"token": token}).json()["result"]
            assert [p["id"] for p in got] == [post["id"]]
            assert http.post("/login", json=creds).status_code == 200
            assert http.post("/topics/t", json={"data": "after"}, params={"token": token}).status_code == 200
    finally:
        g.stop()
    # and to a passphrase
    env = dict(os.environ, NEW_PASS="a long passphrase")
    r = subprocess.run(
        [sys.executable, "-m", "cli.pttd_main", "rekey", "--data-dir", str(g.dir), "--config", str(g.config)]
        + ["--new-passphrase-env", "NEW_PASS"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    os.environ["PTTD_GATEWAY_PASSPHRASE"] = "a long passphrase"
    try:
        url = g.start()
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/me", params={"token": token}).status_code == 200
        g.stop()
        os.environ["PTTD_GATEWAY_PASSPHRASE"] = "the wrong passphrase"
        with pytest.raises(AssertionError, match="does not open"):
            g.start()
    finally:
        del os.environ["PTTD_GATEWAY_PASSPHRASE"]
