"""``pttctl``: the command line. Argument parsing and output only; the work is in
pttd.commands."""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence

from protocol.paths import validate_path
from pttd import commands
from pttd.control import MAX_INLINE_VALUE, ControlClient
from pttd.datadir import DataDir, default_data_dir
from pttd.errors import USER_ERRORS, PttError


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
    # These need a running daemon.
    sub.add_parser("status", help="the daemon: mode, addresses, peers, followed repositories")
    sub.add_parser("peers", help="connected peers")
    s = sub.add_parser("follow", help="follow a repository (remembered across restarts)")
    s.add_argument("key", help="the repository's public key (hex)")
    s.add_argument("--peer", action="append", default=[], metavar="HOST:PORT", help="where to fetch it (repeatable)")
    s.add_argument("--prefix", action="append", default=[], metavar="P", help="fetch only these paths (repeatable)")
    s = sub.add_parser("unfollow", help="stop following a repository (its data stays until gc)")
    s.add_argument("key")
    s = sub.add_parser("sync", help="fetch a repository's newest version now and wait for it")
    s.add_argument("key")
    s.add_argument("--peer", action="append", default=[], metavar="HOST:PORT")
    s.add_argument("--timeout", type=_seconds, default=60.0, help="seconds (default 60)")
    s = sub.add_parser("wait", help="wait until a followed repository holds a version (for scripts)")
    s.add_argument("key")
    s.add_argument("version", type=_version)
    s.add_argument("--timeout", type=_seconds, default=60.0, help="seconds (default 60)")
    s = sub.add_parser("user", help="hosted users of a gateway")
    us = s.add_subparsers(dest="user_command", required=True)
    ua = us.add_parser("add", help="add a user (asks for a password; --password-stdin for scripts)")
    ua.add_argument("name")
    ua.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    ua.add_argument("--no-password", action="store_true", help="no password login (for users of other logins)")
    ua.add_argument("--profile-name", help="the profile name (default: the user name)")
    us.add_parser("list", help="list hosted users")
    up = us.add_parser("passwd", help="set a user's password (asks for it; ends the user's login sessions)")
    up.add_argument("name")
    up.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    ue = us.add_parser(
        "export",
        help="write a user's repository key pair, sealed with a passphrase, to move the account "
        "(its writes here are refused from then on)",
    )
    ue.add_argument("name")
    ue.add_argument("-o", "--output", required=True, help="the account file to write (created, mode 0600)")
    ue.add_argument("--keep", action="store_true", help="a copy only: the user keeps writing here (risks a fork)")
    ue.add_argument("--passphrase-env", help="read the passphrase from this environment variable (else asked)")
    ui = us.add_parser("import", help="host the account of an account file (its repository is synced first)")
    ui.add_argument("file", help="the account file (- for stdin)")
    ui.add_argument("--name", help="the login name here (default: the exported one, if a local account's)")
    ui.add_argument(
        "--keep-name",
        action="store_true",
        help="take the file's login name even if it is not a local account's (an OpenID Connect subject): "
        "only for a file you trust, since it decides whose login this becomes",
    )
    ui.add_argument(
        "--peer", action="append", default=[], help="HOST:PORT serving the repository (its old gateway); repeatable"
    )
    ui.add_argument("--passphrase-env", help="read the passphrase from this environment variable (else asked)")
    ui.add_argument("--timeout", type=_seconds, default=60.0, help="seconds to sync the repository (default 60)")
    us.add_parser(
        "rotate-token-key", help="a new login-token signing key (tokens signed before work until they expire)"
    )
    sub.add_parser("topics", help="chat: topics this repository posted to")
    s = sub.add_parser("post", help="chat: post a text message to a topic")
    s.add_argument("topic")
    s.add_argument("text")
    s = sub.add_parser("read", help="chat: messages of a topic in this repository")
    s.add_argument("topic")
    s.add_argument("--limit", type=_version, help="the newest N only")
    s = sub.add_parser("friends", help="chat: list friends, or add one")
    fs = s.add_subparsers(dest="friends_command")
    fa = fs.add_parser("add", help="add a friend by repository key")
    fa.add_argument("key")
    s = sub.add_parser("dm", help="chat: send an encrypted direct message")
    s.add_argument("key")
    s.add_argument("text")
    sub.add_parser("dms", help="chat: direct-message conversations, opened")
    s = sub.add_parser("replicate", help="replicator: keep a repository whole and live (pin it)")
    s.add_argument("key")
    s = sub.add_parser(
        "unreplicate", help="replicator: stop keeping a repository (what was synced of it stays in the store)"
    )
    s.add_argument("key")
    s = sub.add_parser("join", help="join a hub (its wire address) with this data directory's repository")
    s.add_argument("hub", metavar="HOST:PORT")
    s.add_argument("--token", default="", help="the hub's join token, if it asks for one")
    s.add_argument("--repo", help="another repository this daemon serves (a gateway's user)")
    return p


DAEMON_COMMANDS = (
    "status",
    "peers",
    "follow",
    "unfollow",
    "sync",
    "wait",
    "user",
    "topics",
    "post",
    "read",
    "friends",
    "dm",
    "dms",
    "join",
    "replicate",
    "unreplicate",
)


def _version(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"not a number from 0 up: {text!r}")
    n = int(text)
    if n >= 2**63:  # what the store and the daemon's messages hold
        raise argparse.ArgumentTypeError(f"too large: {text}")
    return n


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        s = -1.0
    if not 0 <= s <= 7 * 86400:  # NaN and infinity fail this too
        raise argparse.ArgumentTypeError(f"not a number of seconds from 0 to 604800: {text!r}")
    return s


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
        if d.get("vacuum_error"):
            print(
                f"the deleted data is still in the file: rebuilding it failed ({d['vacuum_error']}); "
                "run gc again once the cause is gone",
                file=out,
            )


def _human_daemon(command: str, d: dict, out) -> None:
    if command == "status":
        print(f"node {d['node']}  mode {d['mode']}  listening on {', '.join(d['listen'])}", file=out)
        print(f"{len(d['peers'])} peers", file=out)
        for f in d["follows"]:
            _print_follow(f, out)
        if "gateway" in d:
            g = d["gateway"]
            where = f"writer process {g['writer_pid']}" if g.get("writer_pid") else f"writer {g['writer']}"
            if g.get("writer_starts", 0) > 1:
                where += f" (started {g['writer_starts']} times)"
            print(f"gateway: {g['writes']} writes in {g['groups']} groups; {where}", file=out)
        if "pins" in d:
            print(
                f"{len(d['pins'])} pinned repositories (version, lag behind the newest head seen, last sync):", file=out
            )
            for f in d["pins"]:
                when = (
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f["last_sync"]))
                    if f.get("last_sync")
                    else "never"
                )
                version, lag = (f.get(k) if f.get(k) is not None else "-" for k in ("version", "lag"))
                print(f"  {f['repository']}  version {version}  lag {lag}  synced {when}", file=out)
    elif command == "peers":
        for p in d["peers"]:
            print(f"{p['id'][:16]}  {p['address']:<22} {p['direction']:>3}  {p['mode']}", file=out)
    elif command in ("follow", "sync", "wait"):
        _print_follow(d, out)
    elif command == "unfollow":
        print(f"no longer following {d['repository']}", file=out)
    elif command == "user" and "kid" in d:
        print(
            f"token key rotated: {d['kid']} (the previous one accepted {d['previous_accepted_for_seconds']} s more)",
            file=out,
        )
    elif command == "user":
        for u in d.get("users", [d]):
            print(f"{u['key']}  {u['name']}", file=out)
    elif command == "topics":
        for t in d["topics"]:
            print(t, file=out)
    elif command == "post":
        print(f"posted {d['post']['id']} to {d['post']['topic']}", file=out)
    elif command == "read":
        for m in d["messages"]:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m["date"] / 1000))
            value = m["message"]["value"]
            print(f"{when}  {m['id']}  {value if isinstance(value, str) else json.dumps(value)}", file=out)
    elif command == "friends":
        for f in d.get("friends", [d.get("friend")]):
            print(f"{f['key']}  {f.get('name', '')}".rstrip(), file=out)
    elif command == "dm":
        print(f"sent {d['dm']['id']} to {d['dm']['to']}", file=out)
    elif command == "replicate":
        _print_follow(d, out)
    elif command == "unreplicate":
        print(f"no longer replicating {d['repository']}", file=out)
    elif command == "join":
        print(f"{d['repository']} joined {d['hub']}: {d['message']}", file=out)
    elif command == "dms":
        for c in d["conversations"]:
            who = c.get("key") or f"channel {c['channel']['name']}"
            print(f"== {who}", file=out)
            for m in c["messages"]:
                value = m["message"]["value"]
                print(f"  {m['from'][:16]}  {value if isinstance(value, str) else json.dumps(value)}", file=out)


def _print_follow(f: dict, out) -> None:
    v = f["version"] if f["version"] is not None else "-"
    lag = f["lag"] if f.get("lag") is not None else "-"
    prefixes = ",".join(f["prefixes"])
    extra = f"  ({f['error']})" if f.get("error") else ""
    print(f"{f['repository']}  {f['state']:<8} version {v}  lag {lag}  {prefixes}{extra}", file=out)


def _write_fully(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``, then to the disk."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def run(args: argparse.Namespace) -> commands.Result:
    data_dir = args.data_dir or default_data_dir()
    if args.command == "init":
        return commands.init(data_dir)
    client = ControlClient.for_data_dir(data_dir) if os.path.isdir(data_dir) else None
    if client is not None:
        return _remote(client, args)
    if args.command in DAEMON_COMMANDS:
        raise PttError(f"no pttd is running on {data_dir} (start one with: pttd start --data-dir {data_dir})")
    dd = DataDir.open(data_dir)
    try:
        c = args.command
        if c == "id":
            return commands.repo_id(dd, args.repo)
        if c == "put":
            if args.file == "-":
                return commands.put(dd, args.path, value=sys.stdin.buffer.read())
            if not os.path.isfile(args.file):
                raise PttError(f"no such file: {args.file}")
            return commands.put(dd, args.path, filename=args.file)
        if c == "get":
            res = commands.get(dd, args.path, version=args.version, repo=args.repo)
            if args.output is not None:
                _write_file(args.output, res.stream)
                res.data["output"] = args.output
            elif args.json:
                _json_value(res.data, b"".join(res.stream))
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


def _remote(client: ControlClient, args: argparse.Namespace) -> commands.Result:
    """The command, run by the daemon that holds the data directory."""
    c = args.command
    a: dict = {}
    if c in ("id", "ls", "get", "log", "diff") and args.repo:
        a["repo"] = args.repo
    if c in ("ls", "get") and args.version is not None:
        a["version"] = args.version
    if c in ("put", "get", "rm"):
        validate_path(args.path)  # the error a store would give, before anything is sent
    if c == "put":
        a["path"] = args.path
        if args.file == "-":
            value = sys.stdin.buffer.read()
            if len(value) > MAX_INLINE_VALUE:
                return _put_via_file(client, args.path, value)
            a["value"] = value
        else:
            if not os.path.isfile(args.file):
                raise PttError(f"no such file: {args.file}")
            a["filename"] = os.fsencode(os.path.abspath(args.file))  # any name the system takes
    elif c in ("get", "rm"):
        a["path"] = args.path
    elif c == "ls":
        a["prefix"] = args.prefix
    elif c == "log" and args.limit is not None:
        a["limit"] = args.limit
    elif c == "diff":
        a["v1"], a["v2"] = args.v1, args.v2
    elif c == "gc" and args.keep is not None:
        a["keep"] = args.keep
    elif c in ("follow", "unfollow", "sync", "wait"):
        a["repo"] = args.key
        if c == "wait":
            a["version"], a["timeout"] = args.version, args.timeout
        if c == "follow":
            a["peers"], a["prefixes"] = args.peer, args.prefix
        if c == "sync":
            a["peers"], a["timeout"] = args.peer, args.timeout
    if c == "get":
        return _remote_get(client, args, a)
    if c in ("user", "topics", "post", "read", "friends", "dm", "dms"):
        return commands.Result(_chat_call(client, args))
    if c == "join":
        return commands.Result(client.call("join", {"hub": args.hub, "token": args.token, "repo": args.repo}))
    if c in ("replicate", "unreplicate"):
        return commands.Result(client.call(c, {"repo": args.key}))
    progress = _progress_bar if c == "sync" and not args.json and sys.stderr.isatty() else None
    data = client.call(c, a, on_progress=progress)
    if progress:
        print(file=sys.stderr)
    return commands.Result(data, ok=data.get("ok", True) if c == "verify" else True)


def _new_password(name: str, from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    password = getpass.getpass(f"password for {name}: ")
    if getpass.getpass("again: ") != password:
        raise PttError("the two passwords differ")
    return password


def _passphrase(env: str | None, confirm: bool) -> str:
    if env:
        value = os.environ.get(env)
        if value is None:
            raise PttError(f"environment variable {env} is not set")
        return value
    value = getpass.getpass("passphrase of the account file: ")
    if confirm and getpass.getpass("again: ") != value:
        raise PttError("the two passphrases differ")
    return value


def _chat_call(client: ControlClient, args: argparse.Namespace) -> dict:
    c = args.command
    if c == "user":
        if args.user_command == "list":
            return client.call("user_list", {})
        if args.user_command == "rotate-token-key":
            return client.call("token_rotate", {})
        if args.user_command == "passwd":
            password = _new_password(args.name, args.password_stdin)
            return client.call("user_passwd", {"name": args.name, "password": password})
        if args.user_command == "export":
            passphrase = _passphrase(args.passphrase_env, confirm=True)
            try:  # made first: no user is marked moved for a file that cannot even be created
                fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                raise PttError(f"cannot create {args.output}: {exc.strerror}") from None
            try:
                res = client.call("user_export", {"name": args.name, "passphrase": passphrase, "keep": args.keep})
            except BaseException:
                os.close(fd)
                os.unlink(args.output)
                raise
            try:
                _write_fully(fd, (json.dumps(res["account"], indent=1) + "\n").encode())
            except OSError as exc:  # a full disk, say
                os.close(fd)
                os.unlink(args.output)
                moved = (
                    ". The user is marked moved already (their writes here are refused): run the export "
                    "again where it can be written (it writes the same account)"
                    if res["moved"]
                    else ""
                )
                raise PttError(f"cannot write {args.output}: {exc.strerror or exc}{moved}") from None
            os.close(fd)
            return {"name": res["name"], "key": res["key"], "file": args.output, "moved": res["moved"]}
        if args.user_command == "import":
            try:
                raw = sys.stdin.read() if args.file == "-" else open(args.file).read(1 << 20)
                doc = json.loads(raw)
            except OSError as exc:
                raise PttError(f"cannot read {args.file}: {exc.strerror}") from None
            except ValueError:
                raise PttError(f"{args.file} is not an account file (not JSON)") from None
            passphrase = _passphrase(args.passphrase_env, confirm=False)
            call = {
                "account": doc,
                "passphrase": passphrase,
                "name": args.name,
                "peers": args.peer,
                "keep_name": args.keep_name,
            }
            return client.call("user_import", {**call, "timeout": args.timeout})
        password = None if args.no_password else _new_password(args.name, args.password_stdin)
        return client.call("user_add", {"name": args.name, "password": password, "profile_name": args.profile_name})
    if c == "topics":
        return client.call("chat_topics", {})
    if c == "post":
        return client.call("chat_post", {"topic": args.topic, "text": args.text})
    if c == "read":
        return client.call("chat_read", {"topic": args.topic, "limit": args.limit})
    if c == "friends":
        if args.friends_command == "add":
            return client.call("chat_friend_add", {"key": args.key})
        return client.call("chat_friends", {})
    if c == "dm":
        return client.call("chat_dm", {"key": args.key, "text": args.text})
    return client.call("chat_dms", {})


def _put_via_file(client: ControlClient, path: str, value: bytes) -> commands.Result:
    fd, tmp = tempfile.mkstemp(prefix="pttctl-put-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(value)
        return commands.Result(client.call("put", {"path": path, "filename": tmp}))
    finally:
        os.remove(tmp)


def _remote_get(client: ControlClient, args: argparse.Namespace, a: dict) -> commands.Result:
    pieces: list[bytes] = []
    if args.output is not None:
        tmp = f"{args.output}.pttctl-tmp"
        try:
            with open(tmp, "wb") as f:
                data = client.call("get", a, on_chunk=f.write)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, args.output)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        data["output"] = args.output
        return commands.Result(data)
    if args.json:
        data = client.call("get", a, on_chunk=pieces.append)
        _json_value(data, b"".join(pieces))
        return commands.Result(data)
    out = sys.stdout.buffer
    data = client.call("get", a, on_chunk=out.write)
    out.flush()
    return commands.Result(data)


def _json_value(data: dict, value: bytes) -> None:
    data["value_base64"] = base64.b64encode(value).decode()
    try:
        data["value"] = value.decode("utf-8")
    except UnicodeDecodeError:
        data["value"] = None


def _progress_bar(info: dict) -> None:
    seen, have = info.get("newest_seen"), info.get("version")
    mb = info.get("fetched_bytes", 0) / 1e6
    print(
        f"\r{info['state']:>8}  version {have if have is not None else '-'} of {seen if seen is not None else '?'}"
        f"  {info.get('fetched_blocks', 0)} blocks, {mb:.1f} MB   ",
        end="",
        file=sys.stderr,
        flush=True,
    )


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
    except BrokenPipeError:  # (an OSError: before those)
        return _reader_gone()
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
    except sqlite3.Error as exc:  # the store itself failed (a full disk, say): nothing was written
        msg = f"the store failed: {exc}"
        if args.json:
            print(json.dumps({"error": msg}))
        print(f"pttctl: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        if args.json:
            print(json.dumps(res.data))
        elif args.command in DAEMON_COMMANDS:
            _human_daemon(args.command, res.data, sys.stdout)
        elif args.command != "get" or args.output is not None:
            _human(args.command, res, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        return _reader_gone()
    return 0 if res.ok else 1


def _reader_gone() -> int:
    """The output's reader went away (``pttctl ls | head``): no traceback, and none from
    the flush at exit either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 1


if __name__ == "__main__":
    sys.exit(main())
