"""``pttctl``: the command line. Argument parsing and output only; the work is in
pttd.commands."""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Sequence

from pttd import commands
from pttd.datadir import DataDir, default_data_dir
from pttd.errors import USER_ERRORS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit status 2, as argparse does
        self.exit(2, f"pttctl: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pttctl", description="Use a pttd repository on this machine.")
    p.add_argument("--data-dir", help="data directory (default: $PTT_HOME, else the user data directory)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    sub.add_parser("init", help="create the data directory and its repository")
    s = sub.add_parser("id", help="print the repository's public key")
    s.add_argument("--repo", help="another repository in this data directory")
    s = sub.add_parser("put", help="write a value (from FILE, or standard input)")
    s.add_argument("path")
    s.add_argument("file", nargs="?", default="-")
    s = sub.add_parser("get", help="read a value")
    s.add_argument("path")
    s.add_argument("--version", type=_version, help="read at this version")
    s.add_argument("-o", "--output", help="write to this file instead of standard output")
    s.add_argument("--repo", help="another repository in this data directory")
    s = sub.add_parser("rm", help="delete a path")
    s.add_argument("path")
    s = sub.add_parser("ls", help="list paths")
    s.add_argument("prefix", nargs="?", default="/")
    s.add_argument("--version", type=_version)
    s.add_argument("--repo")
    s = sub.add_parser("log", help="list versions, newest first")
    s.add_argument("-n", "--limit", type=_version)
    s.add_argument("--repo")
    s = sub.add_parser("diff", help="paths added, changed and removed between two versions")
    s.add_argument("v1", type=_version)
    s.add_argument("v2", type=_version)
    s.add_argument("--repo")
    sub.add_parser("verify", help="check every block, signature and tree")
    s = sub.add_parser("gc", help="prune old versions and delete unreferenced data")
    s.add_argument("--keep", type=_version, help="keep only the newest N versions of each repository")
    return p


def _version(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {n}")
    return n


def _human(command: str, res: commands.Result, out) -> None:
    d = res.data
    if command == "init":
        print(f"initialized {d['data_dir']}\nrepository {d['repository']}", file=out)
    elif command == "get":
        print(f"wrote {d['size']} bytes to {d['output']}", file=out)
    elif command == "id":
        print(d["repository"], file=out)
    elif command in ("put", "rm"):
        what = "unchanged at" if command == "put" and not d["changed"] else "wrote"
        print(f"{what} version {d['version']}", file=out)
    elif command == "ls":
        for e in d["entries"]:
            print(f"{e['size']:>12}  {e['path']}", file=out)
    elif command == "log":
        for v in d["versions"]:
            print(f"{v['version']:>8}  {v['time_iso']}  {v['commit'][:16]}", file=out)
    elif command == "diff":
        marks = {"added": "+", "changed": "~", "removed": "-"}
        for c in d["changes"]:
            print(f"{marks[c['change']]} {c['path']}", file=out)
    elif command == "verify":
        for e in d["errors"]:
            print(f"error: {e}", file=out)
        state = "ok" if d["ok"] else f"FAILED ({len(d['errors'])} problems)"
        print(
            f"{state}: {d['repositories']} repositories, {d['versions']} versions, {d['nodes']} tree nodes, "
            f"{d['values']} value blocks, {d['chunks']} chunks; {d['blocks_scanned']} blocks scanned",
            file=out,
        )
    elif command == "gc":
        print(
            f"pruned {d['versions_pruned']} versions, removed {d['blocks_removed']} blocks "
            f"({d['bytes_removed']} bytes), kept {d['blocks_kept']}; "
            f"files {d['file_bytes_before']} -> {d['file_bytes_after']} bytes",
            file=out,
        )


def run(args: argparse.Namespace) -> commands.Result:
    data_dir = args.data_dir or default_data_dir()
    if args.command == "init":
        return commands.init(data_dir)
    dd = DataDir.open(data_dir)
    try:
        c = args.command
        if c == "id":
            return commands.repo_id(dd, args.repo)
        if c == "put":
            if args.file == "-":
                return commands.put(dd, args.path, value=sys.stdin.buffer.read())
            if not os.path.isfile(args.file):
                raise commands.PttError(f"no such file: {args.file}")
            return commands.put(dd, args.path, filename=args.file)
        if c == "get":
            res = commands.get(dd, args.path, version=args.version, repo=args.repo)
            if args.output is not None:
                _write_file(args.output, res.stream)
                res.data["output"] = args.output
            elif args.json:
                value = b"".join(res.stream)
                res.data["value_base64"] = base64.b64encode(value).decode()
                try:
                    res.data["value"] = value.decode("utf-8")
                except UnicodeDecodeError:
                    res.data["value"] = None
            else:
                out = sys.stdout.buffer
                for piece in res.stream:  # streamed while the store is open
                    out.write(piece)
                out.flush()
            res.stream = None
            return res
        if c == "rm":
            return commands.rm(dd, args.path)
        if c == "ls":
            return commands.ls(dd, args.prefix, version=args.version, repo=args.repo)
        if c == "log":
            return commands.log(dd, limit=args.limit, repo=args.repo)
        if c == "diff":
            return commands.diff(dd, args.v1, args.v2, repo=args.repo)
        if c == "verify":
            return commands.verify(dd)
        if c == "gc":
            return commands.gc(dd, keep=args.keep)
        raise AssertionError(c)
    finally:
        dd.close()


def _write_file(path: str, stream) -> None:
    tmp = f"{path}.pttctl-tmp"
    try:
        with open(tmp, "wb") as f:
            for piece in stream:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = run(args)
    except USER_ERRORS as exc:
        if args.json:
            print(json.dumps({"error": str(exc)}))
        print(f"pttctl: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        msg = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
        if args.json:
            print(json.dumps({"error": msg}))
        print(f"pttctl: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(res.data))
    elif args.command != "get" or args.output is not None:
        _human(args.command, res, sys.stdout)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
