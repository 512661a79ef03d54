"""Gateway benchmark: posts/s and latency through the HTTP API, beside the same-run rate of
a bare route of the same HTTP stack (its ceiling); and start-up with many hosted users.

    python bench/gateway_bench.py                  # 1,000 users, 1 and 64 clients; 10,000-user start-up
    python bench/gateway_bench.py --quick          # shorter runs, 2,000-user start-up
    python bench/gateway_bench.py --seconds 10 --concurrency 1,16,64

The gateway runs as its own process (``pttd start --mode gateway``, the default store
settings: synchronous=FULL, so every answered post is on the disk). The clients run in
this process: raw HTTP/1.1 keep-alive connections on trio, each sending one request and
reading its answer before the next, so the client side costs little CPU. Progress on
stderr; one JSON object on stdout.

Figures, per number of concurrent clients, in ``--rounds`` rounds (default 3) of a
ceiling run then a posts run, each posts run set against the ceiling just before it; the
round with the median ratio is reported, every round's figures beside it:
  ceiling  GET /health (no auth, no work): requests/s, p50/p99 ms
  posts    POST /topics/bench as that client's user (users spread over the 1,000 hosted):
           posts/s, p50/p99 ms, and posts/s as a fraction of the ceiling
  startup  seconds from exec to the first answer of /health with N hosted users, and the
           resident memory (VmRSS of the daemon and its writer process) then and after N/100 users
           have each posted once
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jwt  # noqa: E402
import trio  # noqa: E402

from pttd.daemon import GATEWAY_PAGE_SIZE  # noqa: E402
from pttd.datadir import DataDir  # noqa: E402
from pttd.gateway.keys import GatewayKey  # noqa: E402
from pttd.gateway.service import create_users  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(data_dir: str, users: int) -> list[tuple[str, str]]:
    """A gateway data directory with ``users`` hosted users; [(key hex, token)]."""
    dd = DataDir.init(data_dir, page_size=GATEWAY_PAGE_SIZE)  # as `pttd start --mode gateway` makes it
    try:
        key = GatewayKey.load(dd.store, os.path.join(dd.path, "gateway.key"), None)
        out = []
        for start in range(0, users, 1000):
            names = [(f"user{i}", None, f"User {i}") for i in range(start, min(users, start + 1000))]
            for u in create_users(dd.store, key, names):
                now = int(time.time())
                claims = {"sub": u.hex, "name": u.name, "iat": now, "exp": now + 86400}
                out.append((u.hex, jwt.encode(claims, key.token_secret, algorithm="HS256")))
        return out
    finally:
        dd.close()


class Daemon:
    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.started = time.monotonic()
        self.errlog = open(os.path.join(os.path.dirname(data_dir), os.path.basename(data_dir) + ".log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.pttd_main", "start", "--mode", "gateway", "--data-dir", data_dir]
            + ["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--log-level", "WARNING"],
            cwd=ROOT,
            stderr=self.errlog,
        )

    def address(self, timeout: float = 60.0) -> tuple[str, int]:
        run = os.path.join(self.data_dir, "run.json")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"pttd exited with {self.proc.returncode}")
            try:
                info = json.load(open(run))
                host, port = info["http"][0].removeprefix("http://").rsplit(":", 1)
                return host, int(port)
            except (FileNotFoundError, ValueError, KeyError):
                time.sleep(0.005)
        raise SystemExit("pttd did not start")

    def pids(self) -> list[int]:
        """The daemon and its children (the gateway's writer process)."""
        return [self.proc.pid] + children(self.proc.pid)

    def rss_mb(self) -> float:
        """Resident memory of the daemon and its children together."""
        total = 0.0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) / 1024
            except OSError:
                pass
        return total

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.errlog.close()


class Conn:
    """One HTTP/1.1 keep-alive connection: a request, then its whole answer."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buf = b""

    async def call(self, request: bytes) -> tuple[int, bytes]:
        await self.stream.send_all(request)
        while b"\r\n\r\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise ConnectionError("the gateway closed the connection")
            self.buf += data
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            data = await self.stream.receive_some(65536)
            if not data:
                raise ConnectionError("the gateway closed the connection")
            rest += data
        self.buf = rest[length:]
        return status, rest[:length]


def request(method: str, path: str, token: str | None = None, body: bytes | None = None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: bench"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + (body or b"")


def children(pid: int) -> list[int]:
    """Child processes of ``pid``, whichever of its threads started them."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system, all threads) the processes have used."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def load(
    host: str, port: int, requests: list[bytes], seconds: float, warmup: float = 0.5, pids: list[int] | None = None
) -> dict:
    """Each request of ``requests`` is one client, repeating it for ``seconds``. With the
    server's ``pids`` (the daemon and its writer process): their CPU time per request
    too, a figure that a busy machine moves much less than rates and latencies."""
    latencies: list[float] = []
    errors = 0
    done = 0
    measuring = False

    async def client(req: bytes) -> None:
        while True:  # the server closes a keep-alive connection after many requests
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                try:
                    await requests_on(Conn(stream), req)
                except (ConnectionError, trio.BrokenResourceError):
                    continue

    async def requests_on(conn: Conn, req: bytes) -> None:
        nonlocal errors, done
        while True:
            t0 = time.perf_counter()
            status, body = await conn.call(req)
            dt = time.perf_counter() - t0
            if status != 200:
                errors += 1
                if errors < 5:
                    log(f"  answer {status}: {body[:200]!r}")
            if measuring:
                latencies.append(dt)
                done += 1

    async with trio.open_nursery() as nursery:
        for req in requests:
            nursery.start_soon(client, req)
        await trio.sleep(warmup)
        measuring = True
        t0 = time.perf_counter()
        cpu0 = cpu_seconds(pids) if pids else 0.0
        await trio.sleep(seconds)
        measuring = False
        cpu = cpu_seconds(pids) - cpu0 if pids else 0.0
        elapsed = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    latencies.sort()
    return {
        "requests": done,
        "per_s": round(done / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2) if latencies else None,
        "errors": errors,
        **({"server_cpu_ms_per_request": round(cpu * 1000 / done, 3)} if pids and done else {}),
    }


def run_load(
    host: str,
    port: int,
    users: list[tuple[str, str]],
    concurrency: list[int],
    seconds: float,
    daemon: Daemon,
    rounds: int = 3,
) -> dict:
    """Per number of clients, ``rounds`` rounds of a ceiling run then a posts run: the
    machine's pace drifts by tens of percent within minutes, so each posts run is set
    against the ceiling measured just before it, and the median round is reported."""
    out = {}
    health = request("GET", "/health")
    for c in concurrency:
        step = max(1, len(users) // c)
        posts = [
            request("POST", "/topics/bench", users[(i * step) % len(users)][1], b'{"data":"a benchmark message"}')
            for i in range(c)
        ]
        runs = []
        for r in range(rounds):
            log(f"{c} clients, round {r + 1}/{rounds}: ceiling (GET /health) ...")
            ceiling = trio.run(load, host, port, [health] * c, seconds, 0.5, daemon.pids())
            log(f"{c} clients, round {r + 1}/{rounds}: posts ...")
            post = trio.run(load, host, port, posts, seconds, 0.5, daemon.pids())
            ratio = round(post["per_s"] / ceiling["per_s"], 3) if ceiling["per_s"] else None
            log(f"  ceiling {ceiling['per_s']}/s, posts {post['per_s']}/s, p99 {post['p99_ms']} ms, ratio {ratio}")
            runs.append({"ceiling": ceiling, "posts": post, "posts_vs_ceiling": ratio})
        median = sorted(runs, key=lambda x: x["posts_vs_ceiling"] or 0.0)[len(runs) // 2]
        out[str(c)] = {
            **median,  # the round with the median ratio
            "rounds": [
                {
                    "ceiling_per_s": x["ceiling"]["per_s"],
                    "posts_per_s": x["posts"]["per_s"],
                    "posts_p99_ms": x["posts"]["p99_ms"],
                    "posts_vs_ceiling": x["posts_vs_ceiling"],
                }
                for x in runs
            ],
            "posts_p99_ms_worst_round": max(x["posts"]["p99_ms"] or 0 for x in runs),
        }
    return out


def startup(base: str, users: int) -> dict:
    d = os.path.join(base, "startup")
    log(f"start-up: creating {users} hosted users ...")
    t0 = time.perf_counter()
    tokens = prepare(d, users)
    created = time.perf_counter() - t0
    daemon = Daemon(d)
    try:
        host, port = daemon.address()

        async def first_answer() -> None:
            while True:
                try:
                    stream = await trio.open_tcp_stream(host, port)
                    break
                except OSError:
                    await trio.sleep(0.005)
            async with stream:
                status, _ = await Conn(stream).call(request("GET", "/health"))
                assert status == 200

        trio.run(first_answer)
        ready = time.monotonic() - daemon.started
        rss_ready = daemon.rss_mb()
        some = tokens[:: max(1, users // (users // 100))][: users // 100]
        posts = [request("POST", "/topics/hello", t, b'{"data":"hi"}') for _k, t in some]

        async def post_all() -> None:
            stream = await trio.open_tcp_stream(host, port)
            conn = Conn(stream)
            async with stream:
                for p in posts:
                    status, body = await conn.call(p)
                    assert status == 200, body

        trio.run(post_all)
        return {
            "hosted_users": users,
            "create_seconds": round(created, 2),
            "ready_seconds": round(ready, 3),
            "rss_mb_ready": round(rss_ready, 1),
            "users_posted": len(posts),
            "rss_mb_after_posts": round(daemon.rss_mb(), 1),
        }
    finally:
        daemon.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="ceiling + posts runs per number of clients, median reported (3; --quick: 1)",
    )
    ap.add_argument("--startup-users", type=int, default=10_000, help="0: no start-up figure")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.startup_users = 2.0, 2000
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    base = tempfile.mkdtemp(prefix="pttd-gw-bench-")
    try:
        d = os.path.join(base, "gw")
        log(f"creating {args.users} hosted users ...")
        users = prepare(d, args.users)
        daemon = Daemon(d)
        try:
            host, port = daemon.address()
            concurrency = [int(c) for c in args.concurrency.split(",")]
            results = run_load(host, port, users, concurrency, args.seconds, daemon, args.rounds)
            rss = daemon.rss_mb()
        finally:
            daemon.stop()
        out = {
            "machine": {"cpus": os.cpu_count()},
            "store": "synchronous=FULL (every answered post is on the disk)",
            "hosted_users": args.users,
            "seconds_per_run": args.seconds,
            "rounds": args.rounds,
            "load": results,
            "rss_mb_after_load": round(rss, 1),
            "startup": startup(base, args.startup_users) if args.startup_users else None,
        }
        print(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
