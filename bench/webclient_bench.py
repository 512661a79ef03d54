"""The web client's weight and its first render of a long topic, in headless Chromium.

    python bench/webclient_bench.py            # 1,000 messages, 5 loads
    python bench/webclient_bench.py --quick    # 300 messages, 3 loads
    python bench/webclient_bench.py --messages 5000 --runs 3

Prints one JSON object:

- ``weight``: bytes of the JavaScript and CSS the page loads (every .js and .css of
  pttd/gateway/webclient/), raw and gzipped, beside the goal of 300 KB;
- ``first_render``: a hub and a gateway (``pttd start`` processes), one user who posted
  N messages to a topic; each run opens a fresh page at ``/#/topic/bench`` with the
  session already stored, and reads the page's own ``pttd:first-render`` mark (set when
  the topic is first drawn with its messages), counted from the start of the
  navigation: loading the modules, GET /gateway.json, the hub's snapshot of N messages,
  the drawing. The baseline, measured in the same browser in the same run, is the load
  of a trivial page from the same gateway (its icon, one small file): the ratio is what
  the chat costs beyond the browser's own fixed cost of opening a page. Also the time to
  draw every message by scrolling to the top (the history the page keeps, then the
  pages it asks the hub for).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from daemon_proc import ROOT, Proc  # noqa: E402

sys.path.insert(0, ROOT)
from tests.chromium import ARGS, CHROMIUM  # noqa: E402

WEBCLIENT = os.path.join(ROOT, "pttd", "gateway", "webclient")
GOAL_BYTES = 300 * 1024
GOAL_MS = 1000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def weight() -> dict:
    files = {}
    for dirpath, _, names in os.walk(WEBCLIENT):
        for n in names:
            if n.endswith((".js", ".css")):
                p = os.path.join(dirpath, n)
                files[os.path.relpath(p, WEBCLIENT)] = open(p, "rb").read()
    raw = sum(len(b) for b in files.values())
    gz = sum(len(gzip.compress(b, 9)) for b in files.values())
    html = os.path.getsize(os.path.join(WEBCLIENT, "index.html"))
    return {
        "js_css_bytes": raw,
        "js_css_gzip_bytes": gz,
        "files": len(files),
        "largest": max(files, key=lambda k: len(files[k])),
        "index_html_bytes": html,
        "goal_bytes": GOAL_BYTES,
        "met": raw < GOAL_BYTES,
    }


def _config(base: str, text: str) -> str:
    path = os.path.join(base, "gateway.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


SCROLL_TO_TOP_UNTIL_FIRST = """(first) => {
    const s = document.querySelector('.scroller');
    s.scrollTop = 0;
    s.dispatchEvent(new Event('scroll'));
    return [...document.querySelectorAll('li.msg .body')].some((b) => b.textContent === first);
}"""


def first_render(base: str, messages: int, runs: int) -> dict:
    from playwright.sync_api import sync_playwright

    hub = Proc(os.path.join(base, "hub"), "hub")
    gw = None
    try:
        hi = hub.info()
        cfg = _config(
            base,
            f'[peers]\nhubs = ["{hi["listen"][0]}"]\n[gateway]\ntest_login = true\nhub_url = "{hi["http"][0]}"\n',
        )
        gw = Proc(os.path.join(base, "gw"), "gateway", "--config", cfg)
        gi = gw.info()
        url = gi["http"][0]
        with httpx.Client(base_url=url, timeout=30) as g, httpx.Client(base_url=hi["http"][0], timeout=30) as h:
            session = g.post("/test-login", json={"data": {"id": "bench"}}).json()["result"]
            auth = {"Authorization": f"Bearer {session['token']}"}
            g.post("/profile", json={"data": {"name": "Bench"}}, headers=auth).raise_for_status()
            log(f"posting {messages} messages ...")
            t0 = time.monotonic()
            for i in range(messages):
                text = f"message {i:05d}: " + "lorem ipsum dolor sit amet " * (1 + i % 4)
                g.post("/topics/bench", json={"data": text}, headers=auth).raise_for_status()
            posted = time.monotonic() - t0
            deadline = time.monotonic() + 120
            while len(h.get("/topics/bench").json()["result"]) < messages:
                if time.monotonic() > deadline:
                    raise SystemExit("the hub did not show every message")
                time.sleep(0.1)
        log("measuring in chromium ...")
        stored = json.dumps(
            {
                "key": session["key"],
                "token": session["token"],
                "refresh_token": session["refresh_token"],
                "ttl": session["expires_in"] * 1000,
                "exp": int(time.time() * 1000) + session["expires_in"] * 1000,
            }
        )
        renders, baselines, everything, errors, boots, snapshots = [], [], [], [], [], []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            try:
                for _ in range(runs):
                    ctx = browser.new_context(viewport={"width": 1100, "height": 800})
                    ctx.add_init_script(f"localStorage.setItem('pttd.session', {json.dumps(stored)})")
                    page = ctx.new_page()
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    # baseline: a trivial page of the same gateway
                    page.goto(url + "/app/icon.svg")
                    baselines.append(page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd"))
                    page.goto(url + "/#/topic/bench")
                    page.wait_for_function(
                        "() => performance.getEntriesByName('pttd:first-render').length > 0", timeout=30_000
                    )
                    ms = page.evaluate("performance.getEntriesByName('pttd:first-render')[0].startTime")
                    last = f"message {messages - 1:05d}: "
                    assert page.locator("li.msg .body", has_text=last).count() == 1, "the newest message is drawn"
                    renders.append(ms)
                    marks = page.evaluate(
                        "Object.fromEntries(['pttd:boot', 'pttd:snapshot'].map("
                        "(n) => [n, performance.getEntriesByName(n)[0].startTime]))"
                    )
                    boots.append(marks["pttd:boot"])
                    snapshots.append(marks["pttd:snapshot"])
                    t0 = time.perf_counter()
                    page.wait_for_function(
                        SCROLL_TO_TOP_UNTIL_FIRST,
                        arg="message 00000: " + "lorem ipsum dolor sit amet ",
                        polling=50,
                        timeout=120_000,
                    )
                    everything.append((time.perf_counter() - t0) * 1000)
                    drawn = page.locator("li.msg").count()
                    if errors:
                        raise SystemExit(f"page errors: {errors}")
                    ctx.close()
            finally:
                browser.close()
        med, base_med = statistics.median(renders), statistics.median(baselines)
        return {
            "messages": messages,
            "runs": runs,
            "first_render_ms_median": round(med, 1),
            "first_render_ms_runs": [round(x, 1) for x in renders],
            "baseline_trivial_page_ms_median": round(base_med, 1),
            "ratio_to_baseline": round(med / base_med, 2) if base_med else None,
            "modules_loaded_ms_median": round(statistics.median(boots), 1),
            "snapshot_received_ms_median": round(statistics.median(snapshots), 1),
            "scroll_to_first_message_ms_median": round(statistics.median(everything), 1),
            "messages_drawn_after_scrolling": drawn,
            "posting_seconds": round(posted, 2),
            "goal_ms": GOAL_MS,
            "met": med < GOAL_MS,
        }
    finally:
        if gw is not None:
            gw.stop()
        hub.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.messages, args.runs = 300, 3
    base = tempfile.mkdtemp(prefix="pttd-webclient-bench-")
    try:
        out = {"machine": {"cpus": os.cpu_count()}, "weight": weight()}
        out["first_render"] = first_render(base, args.messages, args.runs)
        print(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
