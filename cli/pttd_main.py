"""``pttd``: runs the daemon. Argument parsing and logging set-up only."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import trio

from pttd import config as config_mod
from pttd.daemon import MODES, Daemon
from pttd.errors import USER_ERRORS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pttd", description="The pttd daemon.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    s = sub.add_parser("start", help="run the daemon in the foreground")
    s.add_argument("--config", help="TOML config file (see config.example.toml); flags override it")
    s.add_argument("--mode", choices=MODES, help="node (default), gateway, hub or replicator")
    s.add_argument("--data-dir", help="data directory (default: $PTT_HOME, else the user data directory)")
    s.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"wire protocol address (default 0.0.0.0:{config_mod.DEFAULT_PORT}; port 0: any)",
    )
    s.add_argument("--http", metavar="HOST:PORT", help="gateway mode: the HTTP API (default 0.0.0.0:9988)")
    s.add_argument("--control", metavar="PATH", help="control socket (default <data-dir>/control.sock)")
    s.add_argument(
        "--peer", action="append", default=[], metavar="HOST:PORT", help="a static peer to dial (repeatable)"
    )
    s.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def make_config(args: argparse.Namespace) -> config_mod.Config:
    cfg = config_mod.load(args.config)
    if args.mode:
        cfg.mode = args.mode
    if args.data_dir:
        cfg.data_dir = args.data_dir
    if args.listen:
        cfg.wire.listen = args.listen
    if args.http:
        cfg.gateway.http = args.http
    if args.control:
        cfg.control = args.control
    if args.log_level:
        cfg.log_level = args.log_level
    cfg.peers = list(dict.fromkeys(cfg.peers + args.peer))
    config_mod.validate(cfg, "command line")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = make_config(args)
    except USER_ERRORS as exc:
        print(f"pttd: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    daemon = Daemon(cfg)
    try:
        trio.run(daemon.run)
    except USER_ERRORS as exc:
        print(f"pttd: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:  # an error raised inside the daemon's task tree
        user, rest = group.split(USER_ERRORS)
        if user is None or rest is not None:  # a bug of ours is in there: show it
            raise
        print(f"pttd: {_first(user)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _first(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
