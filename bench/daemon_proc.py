"""A `pttd start` process for the benchmarks: started, waited for, asked, measured, stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pttd.control import ControlClient  # noqa: E402


class Proc:
    def __init__(self, data_dir: str, mode: str, *extra: str, log_level: str = "INFO"):
        self.data_dir = data_dir
        self.log_path = data_dir + ".log"
        self.started = time.monotonic()
        self._info: dict | None = None
        with open(self.log_path, "w") as errlog:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli.pttd_main", "start", "--mode", mode, "--data-dir", data_dir]
                + ["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--log-level", log_level, *extra],
                cwd=ROOT,
                stderr=errlog,
            )

    def info(self, timeout: float = 300.0) -> dict:
        """Its run.json, once it is ready."""
        deadline = time.monotonic() + timeout
        while self._info is None and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"pttd exited: {open(self.log_path).read()[-2000:]}")
            try:
                info = json.load(open(os.path.join(self.data_dir, "run.json")))
                if info.get("pid") == self.proc.pid:
                    self._info = info
            except (FileNotFoundError, ValueError):
                time.sleep(0.01)
        if self._info is None:
            raise SystemExit("pttd did not start")
        return self._info

    def call(self, cmd: str, **args):
        return ControlClient(self.info()["control"]).call(cmd, args)

    def peak_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)
