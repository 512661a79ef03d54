"""``pttd``: runs the daemon. Argument parsing and logging set-up only."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import trio

from pttd.daemon import MODES, Daemon
from pttd.datadir import default_data_dir
from pttd.errors import USER_ERRORS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pttd", description="The pttd daemon.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    s = sub.add_parser("start", help="run the daemon in the foreground")
    s.add_argument("--mode", choices=MODES, default="node")
    s.add_argument("--data-dir", help="data directory (default: $PTT_HOME, else the user data directory)")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    daemon = Daemon(args.data_dir or default_data_dir(), mode=args.mode)
    try:
        trio.run(daemon.run)
    except USER_ERRORS as exc:
        print(f"pttd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
