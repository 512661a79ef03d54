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
    s.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="gateway, hub and replicator modes: the HTTP API (default port 9988, 9989 and 10237)",
    )
    s.add_argument("--control", metavar="PATH", help="control socket (default <data-dir>/control.sock)")
    s.add_argument(
        "--peer", action="append", default=[], metavar="HOST:PORT", help="a static peer to dial (repeatable)"
    )
    s.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    r = sub.add_parser(
        "rekey",
        help="gateway: seal the hosted users' keys with a new gateway key (the daemon must be stopped)",
    )
    r.add_argument("--config", help="TOML config file: where the current key comes from")
    r.add_argument("--data-dir", help="data directory (default: $PTT_HOME, else the user data directory)")
    new = r.add_mutually_exclusive_group(required=True)
    new.add_argument("--new-key-file", metavar="PATH", help="the new key file (created 0600 if it does not exist)")
    new.add_argument("--new-passphrase-env", metavar="VAR", help="take the new passphrase from this variable")
    return p


def rekey(args: argparse.Namespace) -> int:
    """Re-seal with a new gateway key; the current one as the daemon would find it."""
    import os

    from pttd.daemon import DataDirLock
    from pttd.datadir import DataDir, default_data_dir
    from pttd.errors import PttError
    from pttd.gateway.keys import GatewayKey
    from pttd.gateway.keys import rekey as do_rekey

    try:
        cfg = config_mod.load(args.config)
        path = os.path.abspath(os.path.expanduser(args.data_dir or cfg.data_dir or default_data_dir()))
        new_pass = None
        if args.new_passphrase_env:
            new_pass = os.environ.get(args.new_passphrase_env)
            if not new_pass:
                raise PttError(f"${args.new_passphrase_env} is not set")
        dd = DataDir.open(path)
        lock = DataDirLock(dd.path)
        try:
            lock.acquire()
            g = cfg.gateway
            key_file = os.path.abspath(os.path.expanduser(g.key_file or os.path.join(dd.path, "gateway.key")))
            passphrase = os.environ.get(g.passphrase_env) if g.passphrase_env else None
            if passphrase is None and not os.path.exists(key_file):
                raise PttError(f"no gateway key at {key_file} (and ${g.passphrase_env} is not set)")
            old = GatewayKey.load(dd.store, key_file, passphrase, g.passphrase_env)
            new_file = os.path.abspath(args.new_key_file) if args.new_key_file else None
            if new_file is not None and new_file == key_file:
                raise PttError("the new key file must be another file than the current one")
            n = do_rekey(dd.store, old, new_file, new_pass)
        finally:
            lock.release()
            dd.close()
    except USER_ERRORS as exc:
        print(f"pttd: {exc}", file=sys.stderr)
        return 1
    where = f"key file {new_file}" if new_file else f"the passphrase in ${args.new_passphrase_env}"
    print(f"re-sealed {n} hosted users' keys with {where}")
    if new_file:
        print(f'start the gateway with: [gateway] key_file = "{new_file}" (or move it to {key_file})')
    print("keep a backup of the old key until you no longer need backups made before this rotation")
    return 0


def make_config(args: argparse.Namespace) -> config_mod.Config:
    cfg = config_mod.load(args.config)
    if args.mode:
        cfg.mode = args.mode
    if args.data_dir:
        cfg.data_dir = args.data_dir
    if args.listen:
        cfg.wire.listen = args.listen
    if args.http:  # the HTTP API of the mode that has one
        cfg.gateway.http = cfg.hub.http = cfg.replicator.http = args.http
    if args.control:
        cfg.control = args.control
    if args.log_level:
        cfg.log_level = args.log_level
    cfg.peers = list(dict.fromkeys(cfg.peers + args.peer))
    config_mod.validate(cfg, "command line")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "rekey":
        return rekey(args)
    try:
        cfg = make_config(args)
    except USER_ERRORS as exc:
        print(f"pttd: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    daemon = Daemon(cfg, own_process=True)
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
