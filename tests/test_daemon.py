"""pttd start: starts on defaults, announces itself, refuses a second daemon, stops cleanly."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest


def wait_ready(proc, timeout=30.0):
    """Read the daemon's log until its ready line; fail on exit or after ``timeout``."""
    lines = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stderr:
            lines.append(line)
            if "ready:" in line:
                return lines
    finally:
        timer.cancel()
    raise AssertionError("pttd never became ready: " + "".join(lines))


def pttctl(data_dir, *args, input=b""):
    return subprocess.run(
        [sys.executable, "-m", "cli.pttctl", "--data-dir", str(data_dir), *args],
        input=input,
        capture_output=True,
        timeout=30,
    )


def start(data_dir, *extra):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli.pttd_main",
            "start",
            "--data-dir",
            str(data_dir),
            "--listen",
            "127.0.0.1:0",
            *extra,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_start_on_a_fresh_dir_then_stop_cleanly(tmp_path, sig):
    d = tmp_path / "data"
    proc = start(d)
    try:
        run_file = d / "run.json"
        wait_ready(proc)
        info = json.loads(run_file.read_text())
        assert info["pid"] == proc.pid and info["mode"] == "node" and len(info["node_id"]) == 64
        host, port = info["listen"][0].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0  # the real port, not 0
        # pttctl goes through the running daemon (which holds the store).
        put = pttctl(d, "put", "/a", input=b"through the daemon")
        assert put.returncode == 0, put.stderr
        status = pttctl(d, "--json", "status")
        assert json.loads(status.stdout)["listen"] == info["listen"]
        assert pttctl(d, "get", "/a").stdout == b"through the daemon"
        big = os.urandom(3 << 20)  # streamed back in several pieces
        (tmp_path / "big.bin").write_bytes(big)
        assert pttctl(d, "put", "/big", str(tmp_path / "big.bin")).returncode == 0
        assert pttctl(d, "get", "/big").stdout == big
        second = start(d)
        _, err = second.communicate(timeout=30)
        assert second.returncode == 1
        assert f"another pttd (pid {proc.pid}) is already running" in err
        assert run_file.exists()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "shutting down" in err and "stopped" in err
        assert not run_file.exists()
    finally:
        proc.kill()
    # The repository it created is usable afterwards.
    from pttd.datadir import DataDir

    dd = DataDir.open(str(d))
    assert dd.default_repo_id() == info["node_id"]
    assert dd.repository().get("/a") == b"through the daemon"
    dd.close()
    # Without a daemon, the daemon-only commands say so.
    res = pttctl(d, "status")
    assert res.returncode == 1 and b"no pttd is running" in res.stderr


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "pttd.toml"
    cfg.write_text('[daemon]\nmode = "node"\n[wire]\nlisten = "127.0.0.1:1"\nwindow = 4\n')
    proc = start(tmp_path / "d", "--config", str(cfg))  # --listen overrides the file's port 1
    try:
        wait_ready(proc)
        info = json.loads((tmp_path / "d" / "run.json").read_text())
        assert not info["listen"][0].endswith(":1")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    bad = tmp_path / "bad.toml"
    bad.write_text("[wire]\nwindw = 4\n")
    proc = start(tmp_path / "d2", "--config", str(bad))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "unknown setting 'windw' in [wire]" in err


def test_an_unknown_mode_is_a_clear_error(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[daemon]\nmode = "relay"\n')
    proc = start(tmp_path / "d", "--config", str(cfg))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "mode 'relay' is not one of node, gateway, hub, replicator" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "d" / "run.json")


def test_port_in_use_and_bad_settings_are_one_line_errors(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = start(tmp_path / "d", "--listen", f"127.0.0.1:{port}")
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
    assert not (tmp_path / "d" / "run.json").exists()
    cfg = tmp_path / "c.toml"
    cfg.write_text('[daemon]\nlog_level = "LOUD"\n')
    proc = start(tmp_path / "d", "--config", str(cfg))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "log_level 'LOUD'" in err and "Traceback" not in err
    # a pin that is 64 hex digits but no key: named with its setting, exit 2, not at the pin
    cfg.write_text('[replicator]\npins = ["' + "ab" * 32 + '"]\n')
    proc = start(tmp_path / "d", "--config", str(cfg), "--mode", "replicator")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "[replicator] pins: " + "ab" * 32 + " is not a valid Ed25519 public key" in err
    # NaN passed every check and then stopped the daemon at the first connection; infinity
    # was a traceback at start; an address's error did not say whose it was
    for text, said in (
        ("[wire]\nhandshake_timeout = nan\n", "[wire] handshake_timeout must be a finite number, not nan"),
        ("[gateway]\ntoken_ttl = inf\nrefresh_ttl = inf\n", "[gateway] token_ttl must be a finite number, not inf"),
        ('[gateway]\nhttp = "localhost"\n', "[gateway] http: address 'localhost' is not HOST:PORT"),
    ):
        cfg.write_text(text)
        proc = start(tmp_path / "d", "--config", str(cfg), "--mode", "gateway")
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 2 and said in err and "Traceback" not in err, err


def test_pttctl_follow_sync_and_read_between_two_daemons(tmp_path):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a, b = start(a_dir), start(b_dir)
    try:
        wait_ready(a)
        wait_ready(b)
        a_info = json.loads((a_dir / "run.json").read_text())
        key, addr = a_info["node_id"], a_info["listen"][0]
        b_info = json.loads((b_dir / "run.json").read_text())
        for i in range(3):
            assert pttctl(a_dir, "put", f"/a/{i}", input=f"value {i}".encode() * 20).returncode == 0
        assert pttctl(a_dir, "put", "/b/secret", input=b"elsewhere" * 20).returncode == 0
        res = pttctl(b_dir, "follow", key, "--peer", addr, "--prefix", "/a/")
        assert res.returncode == 0, res.stderr
        res = pttctl(b_dir, "--json", "sync", key)
        assert res.returncode == 0, res.stderr
        synced = json.loads(res.stdout)
        assert synced["version"] == 4 and synced["state"] == "synced" and synced["prefixes"] == ["/a/"]
        listing = json.loads(pttctl(b_dir, "--json", "ls", "/a/", "--repo", key).stdout)
        assert [e["path"] for e in listing["entries"]] == ["/a/0", "/a/1", "/a/2"]
        # Outside the prefix: fetched on demand.
        assert pttctl(b_dir, "get", "/b/secret", "--repo", key).stdout == b"elsewhere" * 20
        assert len(json.loads(pttctl(b_dir, "--json", "log", "--repo", key).stdout)["versions"]) == 1
        peers = json.loads(pttctl(b_dir, "--json", "peers").stdout)["peers"]
        assert [p["id"] for p in peers] == [key]
        status = pttctl(b_dir, "status")
        assert status.returncode == 0 and key in status.stdout.decode()
        res = pttctl(b_dir, "unfollow", key)
        assert res.returncode == 0 and b"no longer following" in res.stdout
        res = pttctl(b_dir, "unfollow", key)
        assert res.returncode == 1 and b"not following" in res.stderr
        res = pttctl(b_dir, "follow", "nothex")
        assert res.returncode == 1 and b"not a repository key" in res.stderr
        # a sync that fails says why in one line (it said "internal error: ExceptionGroup")
        res = pttctl(b_dir, "sync", b_info["node_id"], "--timeout", "1")
        assert res.returncode == 1 and b"ExceptionGroup" not in res.stderr, res.stderr
        assert res.stderr.decode().count("\n") == 1 and b"own repository" in res.stderr, res.stderr
    finally:
        for p in (a, b):
            p.terminate()
            p.communicate(timeout=30)


def test_config_example_lists_every_setting_with_its_default():
    import dataclasses
    import os
    import re

    from pttd.config import Config, load

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config.example.toml")
    cfg = load(path)
    text = open(path).read()
    defaults = Config()
    sections = (
        ("wire", cfg.wire, defaults.wire),
        ("gateway", cfg.gateway, defaults.gateway),
        ("hub", cfg.hub, defaults.hub),
        ("replicator", cfg.replicator, defaults.replicator),
    )
    for section, obj, default in sections:
        for f in dataclasses.fields(obj):
            # set to its default, or shown commented out
            assert getattr(obj, f.name) == getattr(default, f.name) or f.name in ("listen", "http"), (section, f.name)
            assert re.search(rf"^#?\s*{f.name}\s*=", text, re.M), f"config.example.toml lacks [{section}] {f.name}"
    from pttd.config import OidcProvider

    for f in dataclasses.fields(OidcProvider):
        assert re.search(rf"^#\s*{f.name}\s*=", text, re.M), f"config.example.toml lacks [[oidc]] {f.name}"
    for name in ("synchronous", "page_size", "mode", "log_level", "control", "data_dir", "static", "hubs"):
        assert re.search(rf"^#?\s*{name}\s*=", text, re.M), name


def test_the_control_socket_path_is_absolute_checked_and_never_a_file(tmp_path):
    """A relative --control went into run.json as given: pttctl elsewhere found no
    daemon and wrote the store beside it. --control naming a file removed the file; a
    path too long for a socket ended in "None"."""
    sub = tmp_path / "sub"
    sub.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.pttd_main", "start", "--data-dir", "../d", "--control", "rel.sock"]
        + ["--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=sub,
    )
    try:
        wait_ready(proc)
        assert json.loads((tmp_path / "d" / "run.json").read_text())["control"] == str(sub / "rel.sock")
        res = pttctl(tmp_path / "d", "--json", "put", "/x", input=b"through the daemon")
        assert res.returncode == 0, res.stderr
        assert pttctl(tmp_path / "d", "status").returncode == 0  # a daemon-only command: it was found
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    proc = start(tmp_path / "d", "--control", str(precious))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "something else is there" in err and "Traceback" not in err, err
    assert precious.read_text() == "keep me"
    deep = tmp_path / ("x" * 100) / ("y" * 40)
    proc = start(deep)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "at most 107 bytes" in err and "None" not in err and "Traceback" not in err, err


def test_two_daemons_started_at_once_on_a_new_directory(tmp_path):
    """Both created the store before taking the lock, each removing the other's
    half-made one: tracebacks, or a second key left in keys/."""
    for i in range(3):
        d = tmp_path / f"d{i}"
        procs = [start(d), start(d)]
        try:
            deadline = time.monotonic() + 30
            while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.05)  # a process, not an event: polled
            lost = [p for p in procs if p.poll() is not None]
            assert len(lost) == 1, [p.returncode for p in procs]
            won = next(p for p in procs if p is not lost[0])
            wait_ready(won)
            _, err = lost[0].communicate(timeout=30)
            assert lost[0].returncode == 1 and "already running" in err and "Traceback" not in err, err
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    p.communicate(timeout=30)
        assert len(os.listdir(d / "keys")) == 1


def test_pttctl_output_to_a_closed_pipe_home_with_a_tilde_and_a_directory_made_before(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), PTT_HOME="~/ptt")
    res = subprocess.run(
        [sys.executable, "-m", "cli.pttctl", "init"], capture_output=True, env=env, timeout=30, cwd=tmp_path
    )
    assert res.returncode == 0 and (home / "ptt" / "pttd.sqlite3").exists(), res.stderr  # not ./~/ptt
    made = tmp_path / "made"
    made.mkdir(mode=0o755)
    os.chmod(made, 0o755)
    assert pttctl(made, "init").returncode == 0
    assert os.stat(made).st_mode & 0o777 == 0o700  # the store holds secrets
    for i in range(3):
        assert pttctl(made, "put", f"/many/{i}", input=b"x").returncode == 0
    listing = subprocess.Popen(
        [sys.executable, "-m", "cli.pttctl", "--data-dir", str(made), "ls", "/"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    listing.stdout.close()  # the reader is gone before anything is written
    _, err = listing.communicate(timeout=30)
    assert b"Traceback" not in err and b"Broken pipe" not in err, err


def test_a_name_that_is_not_utf8_through_the_daemon(tmp_path):
    d = tmp_path / "d"
    proc = start(d)
    try:
        wait_ready(proc)
        odd = os.fsdecode(bytes(tmp_path) + b"/rep\xfft.txt")
        with open(os.fsencode(odd), "wb") as f:
            f.write(b"the file's bytes")
        res = subprocess.run(
            [sys.executable, "-m", "cli.pttctl", "--data-dir", str(d), "put", "/files/r", odd],
            capture_output=True,
            timeout=30,
        )
        assert res.returncode == 0, res.stderr
        assert pttctl(d, "get", "/files/r").stdout == b"the file's bytes"
        res = subprocess.run(
            [sys.executable, "-m", "cli.pttctl", "--data-dir", str(d), "--json", "put", os.fsdecode(b"/bad\xff")],
            capture_output=True,
            timeout=30,
        )
        assert res.returncode == 1 and b"Traceback" not in res.stderr
        assert "not valid UTF-8" in json.loads(res.stdout)["error"]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_a_daemon_closing_the_control_connection_mid_request_is_an_error_not_silence(tmp_path):
    """pttctl's quiet exit for a closed output pipe also swallowed a closed control
    connection (a daemon stopping, or refusing a large request): exit 1, nothing said."""
    import socket

    path = str(tmp_path / "c.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)

    def refuse() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=refuse, daemon=True).start()
    (tmp_path / "run.json").write_text(json.dumps({"control": path}))
    try:
        res = pttctl(tmp_path, "--json", "put", "/x", "-", input=os.urandom(8 << 20))
    finally:
        server.close()
    assert res.returncode == 1 and b"closed the control connection" in res.stderr, res.stderr
    assert "closed the control connection" in json.loads(res.stdout)["error"]
