"""pttctl as a user runs it: output, --json, and one-line errors with non-zero exits."""

import json
import os
import subprocess
import sys

import pytest

from cli.pttctl import main


@pytest.fixture
def home(tmp_path, monkeypatch):
    d = tmp_path / "home"
    monkeypatch.setenv("PTT_HOME", str(d))
    return d


def run(capsysbinary, *args):
    code = main(list(args))
    out, err = capsysbinary.readouterr()
    return code, out, err


def test_round_trip(home, capsysbinary, tmp_path, monkeypatch):
    code, out, _ = run(capsysbinary, "init")
    assert code == 0 and b"repository" in out
    code, out, _ = run(capsysbinary, "--json", "id")
    key = json.loads(out)["repository"]
    assert len(key) == 64
    f = tmp_path / "p.json"
    f.write_bytes(b'{"name":"ada"}')
    assert run(capsysbinary, "put", "/profile.json", str(f))[0] == 0
    f.write_bytes(b'{"name":"grace"}')
    assert run(capsysbinary, "put", "/profile.json", str(f))[0] == 0
    code, out, _ = run(capsysbinary, "get", "/profile.json", "--version", "1")
    assert (code, out) == (0, b'{"name":"ada"}')
    code, out, _ = run(capsysbinary, "--json", "get", "/profile.json")
    assert json.loads(out)["value"] == '{"name":"grace"}'
    big = tmp_path / "big"
    big.write_bytes(os.urandom(500_000))
    assert run(capsysbinary, "put", "/files/big", str(big))[0] == 0
    out_file = tmp_path / "copy"
    assert run(capsysbinary, "get", "/files/big", "-o", str(out_file))[0] == 0
    assert out_file.read_bytes() == big.read_bytes()
    code, out, _ = run(capsysbinary, "--json", "ls", "/")
    entries = json.loads(out)["entries"]
    assert [(e["path"], e["size"]) for e in entries] == [("/files/big", 500_000), ("/profile.json", 16)]
    code, out, _ = run(capsysbinary, "ls", "/files/")
    assert out.split() == [b"500000", b"/files/big"]
    assert run(capsysbinary, "rm", "/files/big")[0] == 0
    code, out, _ = run(capsysbinary, "diff", "1", "4")
    assert out.splitlines() == [b"~ /profile.json"]
    code, out, _ = run(capsysbinary, "--json", "diff", "0", "3")
    assert {c["path"]: c["change"] for c in json.loads(out)["changes"]} == {
        "/files/big": "added",
        "/profile.json": "added",
    }
    code, out, _ = run(capsysbinary, "--json", "log")
    assert [v["version"] for v in json.loads(out)["versions"]] == [4, 3, 2, 1, 0]
    code, out, _ = run(capsysbinary, "verify")
    assert code == 0 and out.startswith(b"ok:")
    code, out, _ = run(capsysbinary, "--json", "gc", "--keep", "2")
    assert code == 0 and json.loads(out)["versions_pruned"] == 3
    code, out, err = run(capsysbinary, "get", "/profile.json", "--version", "1")
    assert code == 1 and b"pruned" in err
    with open(f, "rb") as stdin:
        monkeypatch.setattr("sys.stdin", type("Stdin", (), {"buffer": stdin})())
        assert run(capsysbinary, "put", "/from-stdin")[0] == 0
    assert run(capsysbinary, "get", "/from-stdin")[1] == b'{"name":"grace"}'


@pytest.mark.parametrize(
    "args,message",
    [
        (["get", "relative"], b"not absolute"),
        (["get", "/a/../b"], b"'..' segment"),
        (["get", "/missing"], b"no such path: /missing"),
        (["get", "/missing", "--version", "7"], b"version 7 does not exist"),
        (["rm", "/missing"], b"no such path"),
        (["diff", "0", "9"], b"version 9 does not exist"),
        (["put", "/x", "/no/such/file"], b"no such file"),
        (["gc", "--keep", "0"], b"at least 1"),
        (["init"], b"already a pttd data directory"),
        (["ls", "--repo", "zz"], b"not a repository key"),
    ],
)
def test_errors_are_one_line_and_non_zero(home, capsysbinary, args, message):
    assert run(capsysbinary, "init")[0] == 0
    code, out, err = run(capsysbinary, *args)
    assert code == 1
    assert message in err
    assert err.count(b"\n") == 1 and b"Traceback" not in err
    code, out, _ = run(capsysbinary, "--json", *args)
    assert code == 1 and "error" in json.loads(out)


def test_missing_data_dir_is_a_clear_error(tmp_path, capsysbinary):
    code, out, err = run(capsysbinary, "--data-dir", str(tmp_path / "nowhere"), "ls")
    assert code == 1 and b"no data directory at" in err and b"pttctl --data-dir" in err


def test_usage_errors_exit_2(home, capsysbinary):
    with pytest.raises(SystemExit) as exc:
        main(["get"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["log", "-n", "-3"])
    assert exc.value.code == 2
    # numbers no message or store holds, and timeouts that are not a time, are usage
    # errors too (they were tracebacks and "internal error")
    key = "ab" * 32
    for args in (
        ["log", "-n", "99999999999999999999999"],
        ["get", "/x", "--version", "9223372036854775808"],
        ["diff", "1", "\u0661"],
        ["wait", key, "1", "--timeout", "nan"],
        ["sync", key, "--timeout", "-1"],
        ["wait", key, "1", "--timeout", "inf"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2, args
        assert b"Traceback" not in capsysbinary.readouterr().err


def test_verify_reports_corruption_with_exit_1(home, capsysbinary):
    import sqlite3

    run(capsysbinary, "init")
    run(capsysbinary, "put", "/a", __file__)
    db = sqlite3.connect(str(home / "pttd.sqlite3"))
    rowid, data = db.execute("SELECT rowid, data FROM blocks ORDER BY length(data) DESC LIMIT 1").fetchone()
    db.execute("UPDATE blocks SET data=? WHERE rowid=?", (data[:-1] + bytes([data[-1] ^ 1]), rowid))
    db.commit()
    db.close()
    code, out, _ = run(capsysbinary, "verify")
    assert code == 1 and b"FAILED" in out and b"corrupt block" in out


def test_installed_entry_point_runs(tmp_path):
    env = dict(os.environ, PTT_HOME=str(tmp_path / "h"))
    subprocess.run([sys.executable, "-m", "cli.pttctl", "init"], env=env, check=True, capture_output=True, timeout=60)
    res = subprocess.run([sys.executable, "-m", "cli.pttctl", "get", "/nope"], env=env, capture_output=True, timeout=60)
    assert res.returncode == 1 and res.stderr.strip() == b"pttctl: no such path: /nope"
