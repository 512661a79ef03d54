"""pttd start: starts on defaults, announces itself, refuses a second daemon, stops cleanly."""

import json
import os
import signal
import subprocess
import sys
import threading

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


def start(data_dir, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "cli.pttd_main", "start", "--data-dir", str(data_dir), *extra],
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
    dd.close()


def test_unavailable_mode_is_a_clear_error(tmp_path):
    proc = start(tmp_path / "d", "--mode", "hub")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "mode 'hub' is not available" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "d" / "run.json")
