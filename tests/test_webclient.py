"""The web client (pttd/gateway/webclient/) in headless Chromium, driven by Playwright.

Two users on two gateways and one hub, each in a browser context of their own: log in,
post, see each other live, react, edit, delete, hide, a direct message, an image; an
XSS attempt shows as text; unread marks; the phone-width layout; a dropped connection
resumed without losing or doubling anything; keyboard-only use; history paged in from
the hub; a bring-your-own-key login. Screenshots of the main screens are taken on every
run; with PTTD_SCREENSHOTS=1 they replace those in docs/screenshots/ (else they go to a
temporary directory, so that a test run leaves the checkout as it was).

The daemons run as trio tasks; the whole browser scenario runs in one worker thread
(Playwright's objects stay on the thread that made them) and calls back into trio only
through the helpers it is given.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import time
import zlib
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from tests.chromium import ARGS, CHROMIUM
from tests.gwutil import gateway, login, result
from tests.netutil import start_daemon

SHOTS = (
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "screenshots")
    if os.environ.get("PTTD_SCREENSHOTS") == "1"
    else tempfile.mkdtemp(prefix="pttd-screenshots-")
)
WAIT = 15_000  # ms: the longest any one page condition is waited for

pytestmark = pytest.mark.skipif(
    (not os.path.exists(CHROMIUM) or shutil.which("chromium") is None) and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (CI installs it and never skips these)",
)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
expect.set_options(timeout=WAIT)


def png(w: int, h: int, rgb=(220, 60, 60)) -> bytes:
    """A small valid PNG, made here (no fixture file)."""
    row = b"\x00" + bytes(rgb) * w
    raw = row * h

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@asynccontextmanager
async def chat_system(tmp_path, **gw_options):
    """One hub and two gateways joined to it, the page told of the hub."""
    async with trio.open_nursery() as nursery:
        hub = await start_daemon(nursery, os.path.join(tmp_path, "hub"), mode="hub")
        async with (
            gateway(tmp_path, "g1", hubs=[hub.address], hub_url=hub.http, **gw_options) as g1,
            gateway(tmp_path, "g2", hubs=[hub.address], hub_url=hub.http, **gw_options) as g2,
        ):
            yield hub, g1, g2
        nursery.cancel_scope.cancel()


class Browser:
    """Chromium with console errors collected per page."""

    def __init__(self, pw):
        self.browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        self.errors: list[str] = []
        self.allowed: list[re.Pattern] = []

    def page(self, url: str, **context_options):
        ctx = self.browser.new_context(**context_options)
        ctx.set_default_timeout(WAIT)
        page = ctx.new_page()
        name = url

        def console(msg):
            if msg.type == "error" and not any(p.search(msg.text) for p in self.allowed):
                self.errors.append(f"{name}: console: {msg.text}")

        page.on("console", console)
        page.on("pageerror", lambda exc: self.errors.append(f"{name}: page error: {exc}"))
        page.on("dialog", lambda d: (self.errors.append(f"{name}: dialog {d.message!r}"), d.dismiss()))
        page.goto(url)
        return page

    def close(self):
        self.browser.close()


def dev_login(page, ident: str) -> None:
    expect(page.locator("#login-dev")).to_be_visible()
    page.fill("#login-dev", ident)
    page.get_by_role("button", name="Dev login").click()
    expect(page.locator("#main")).to_be_attached()


def shot(page, name: str) -> None:
    os.makedirs(SHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SHOTS, name))


def msg(page, text: str):
    """The message (li) whose body is exactly ``text``."""
    return page.locator("li.msg").filter(has=page.locator(".body", has_text=re.compile("^" + re.escape(text) + "$")))


def set_name(page, name: str) -> str:
    """Set the profile name on the people screen; returns the user's key."""
    page.click("#people-link")
    expect(page.locator("#my-key")).to_be_visible()
    page.fill("#profile-name", name)
    page.locator("#profile-name").press("Enter")
    expect(page.locator(".me-name")).to_have_text(name)
    return page.locator("#my-key").inner_text().strip()


def two_users(g1: str, g2: str, image: bytes) -> list[str]:
    with sync_api.sync_playwright() as pw:
        b = Browser(pw)
        try:
            alice = b.page(g1 + "/", viewport={"width": 1100, "height": 720})
            expect(alice.get_by_role("heading", name="Development login")).to_be_visible()
            expect(alice.get_by_role("button", name="Create an account")).to_be_visible()
            shot(alice, "login.png")
            dev_login(alice, "alice")
            bob = b.page(g2 + "/", viewport={"width": 1100, "height": 720})
            dev_login(bob, "bob")
            alice_key = set_name(alice, "Alice")
            expect(alice.locator("svg.qr path")).to_have_attribute("d", re.compile("^M"))
            bob_key = set_name(bob, "Bob")

            # alice makes a topic and posts; bob sees both live, through the hub
            alice.click("#new-topic")
            alice.fill("#new-topic-name", "general")
            alice.locator("#new-topic-name").press("Enter")
            expect(alice.locator("h1#chat-title")).to_have_text("#general")
            composer = alice.locator("textarea.input")
            expect(composer).to_be_focused()
            composer.fill("hello from alice")
            composer.press("Enter")
            expect(msg(alice, "hello from alice")).to_have_count(1)
            bob_general = bob.locator('#topic-list a[data-topic="general"]')
            expect(bob_general).to_be_visible()
            bob_general.click()
            expect(msg(bob, "hello from alice")).to_have_count(1)
            expect(msg(bob, "hello from alice").locator(".author")).to_have_text("Alice")
            bob.locator("textarea.input").fill("hi alice")
            bob.locator("textarea.input").press("Enter")
            expect(msg(alice, "hi alice")).to_have_count(1)
            expect(msg(alice, "hi alice").locator(".author")).to_have_text("Bob")

            # a reaction (bob), shown to alice with its count
            m = msg(bob, "hello from alice")
            m.hover()
            m.get_by_role("button", name="Add a reaction").click()
            bob.get_by_role("button", name="React with 👍").click()
            expect(msg(alice, "hello from alice").locator(".reaction")).to_have_text("👍1")
            expect(msg(alice, "hello from alice").locator(".reaction")).to_have_attribute("title", "Bob")

            # alice edits her message: bob sees the new text, marked edited, reaction kept
            m = msg(alice, "hello from alice")
            m.hover()
            m.get_by_role("button", name="Edit").click()
            editor = alice.locator("textarea.edit")
            expect(editor).to_be_focused()
            editor.fill("hello, everyone")
            editor.press("Enter")
            expect(msg(bob, "hello, everyone")).to_have_count(1)
            expect(msg(bob, "hello, everyone").locator(".edited")).to_be_visible()
            expect(msg(bob, "hello from alice")).to_have_count(0)

            # an XSS attempt is text on both sides; nothing runs (a dialog would be an error)
            xss = '<script>alert(1)</script><img src=x onerror="alert(2)"> <b>bold</b>'
            composer.fill(xss)
            composer.press("Enter")
            expect(msg(bob, xss)).to_have_count(1)
            assert bob.locator(".msgs script, .msgs img[src=x], .msgs b").count() == 0

            # alice deletes a message: gone for bob too
            composer.fill("a mistake")
            composer.press("Enter")
            expect(msg(bob, "a mistake")).to_have_count(1)
            m = msg(alice, "a mistake")
            m.hover()
            m.get_by_role("button", name="Delete").click()
            alice.locator(".confirm-delete").click()
            expect(msg(alice, "a mistake")).to_have_count(0)
            expect(msg(bob, "a mistake")).to_have_count(0)

            # bob hides alice's XSS message (moderation): gone for bob only
            m = msg(bob, xss)
            m.hover()
            m.get_by_role("button", name="Hide this message (for you)").click()
            expect(msg(bob, xss)).to_have_count(0)
            expect(msg(alice, xss)).to_have_count(1)

            # an image: uploaded with a progress bar, shown inline on the other gateway
            alice.locator('.composer input[type="file"]').set_input_files(
                {"name": "red.png", "mimeType": "image/png", "buffer": image}
            )
            img = bob.locator('li.msg img.inline[alt="red.png"]')
            expect(img).to_have_class(re.compile("loaded"))
            assert img.evaluate("i => i.naturalWidth") == 40
            expect(bob.locator("li.msg figcaption .file-size")).to_have_text(f"{len(image)} B")
            # and a file that is not an image: a download link with its name and size
            alice.locator('.composer input[type="file"]').set_input_files(
                {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"some notes\n" * 300}
            )
            expect(bob.locator("li.msg a.file", has_text="notes.txt").locator(".file-size")).to_have_text("3.2 KB")
            # downloaded on the other gateway, which already held an older version of
            # alice's repository (from the image) and asks for a newer one
            link = bob.locator("li.msg a.file", has_text="notes.txt")
            with bob.expect_download() as dl:
                link.click()
            assert dl.value.suggested_filename == "notes.txt"
            assert open(dl.value.path(), "rb").read() == b"some notes\n" * 300
            shot(bob, "topic.png")
            # bob takes his reaction back (pressing it again): gone on both sides
            mine = msg(bob, "hello, everyone").locator(".reaction.mine")
            expect(mine).to_have_attribute("aria-pressed", "true")
            mine.click()
            expect(msg(alice, "hello, everyone").locator(".reaction")).to_have_count(0)
            expect(msg(bob, "hello, everyone").locator(".reaction")).to_have_count(0)

            # friends and a direct message each way
            for page, other in ((alice, bob_key), (bob, alice_key)):
                page.click("#people-link")
                page.fill("#friend-key", other)
                page.get_by_role("button", name="Add friend").click()
                expect(page.locator("#friend-list .name")).to_have_count(1)
            expect(alice.locator("#friend-list .name")).to_have_text("Bob")
            shot(alice, "people.png")
            alice.locator("#friend-list").get_by_role("button", name="Message").click()
            expect(alice.locator("h1#chat-title")).to_have_text("@ Bob")
            alice.locator("textarea.input").fill("psst, bob\nsecond line")
            alice.locator("textarea.input").press("Enter")
            bob_dm = bob.locator(f'#conv-list a[data-conv="key:{alice_key}"]')
            expect(bob_dm.locator(".badge")).to_have_text("1")
            bob_dm.click()
            expect(msg(bob, "psst, bob\nsecond line")).to_have_count(1)
            expect(bob_dm.locator(".badge")).to_have_count(0)
            bob.locator("textarea.input").fill("hello back")
            bob.locator("textarea.input").press("Enter")
            expect(msg(alice, "hello back")).to_have_count(1)
            expect(msg(alice, "hello back").locator(".author")).to_have_text("Bob")
            # an image in a direct message: stored sealed, its key inside the encrypted
            # message, opened by bob's gateway with it
            alice.locator('.composer input[type="file"]').set_input_files(
                {"name": "private.png", "mimeType": "image/png", "buffer": image}
            )
            private = bob.locator('li.msg img.inline[alt="private.png"]')
            expect(private).to_have_class(re.compile("loaded"))
            assert private.evaluate("i => i.naturalWidth") == 40
            sent = bob.evaluate(
                """async (key) => {
                    const s = JSON.parse(localStorage.getItem('pttd.session'));
                    const r = await fetch('dm?key=' + key, {headers: {Authorization: 'Bearer ' + s.token}});
                    const conv = (await r.json()).result[0];
                    const file = conv.messages[conv.messages.length - 1].message.value;
                    const raw = await fetch(`files/${file.key}/${file.id}`, {headers: {Authorization: 'Bearer ' + s.token}});
                    return {secret: file.secret, stored: raw.headers.get('content-type')};
                }""",
                alice_key,
            )
            assert len(sent["secret"]) == 64 and sent["stored"] == "application/octet-stream"  # not an image
            shot(alice, "direct-messages.png")

            # a private channel of friends, each message encrypted to each member
            alice.click("#people-link")
            alice.fill("#channel-name", "project")
            alice.locator("label.check input").check()
            alice.get_by_role("button", name="Create channel").click()
            expect(alice.locator("h1#chat-title")).to_have_text("≡ project")
            alice.locator("textarea.input").fill("channel hello")
            alice.locator("textarea.input").press("Enter")
            bob_channel = bob.locator("#conv-list a", has_text="project")
            expect(bob_channel.locator(".badge")).to_have_text("1")
            bob_channel.click()
            expect(msg(bob, "channel hello")).to_have_count(1)
            bob.locator("textarea.input").fill("channel reply")
            bob.locator("textarea.input").press("Enter")
            expect(msg(alice, "channel reply")).to_have_count(1)

            # unread: a post while bob reads a conversation marks the topic, across a reload
            alice.locator('#topic-list a[data-topic="general"]').click()
            alice.locator("textarea.input").fill("are you there?")
            alice.locator("textarea.input").press("Enter")
            expect(bob_general.locator(".badge")).to_have_text("1")
            bob.reload()
            expect(bob_general.locator(".badge")).to_have_text("1")
            expect(bob_channel).to_be_visible()
            expect(bob_channel.locator(".badge")).to_have_count(0)
            bob_general.click()
            expect(msg(bob, "are you there?")).to_have_count(1)
            expect(bob_general.locator(".badge")).to_have_count(0)

            # a phone-width screen: no sideways scrolling, the menu opens the topics
            phone = b.page(g2 + "/#/topic/general", viewport={"width": 375, "height": 740}, is_mobile=True)
            dev_login(phone, "bob")  # a new browser: a login of its own
            expect(msg(phone, "are you there?")).to_have_count(1)
            assert phone.evaluate("document.documentElement.scrollWidth") <= 375
            shot(phone, "phone.png")
            phone.click("#menu")
            expect(phone.locator("#sidebar")).to_be_visible()
            expect(phone.locator('#topic-list a[data-topic="general"]')).to_be_in_viewport()
            shot(phone, "phone-menu.png")
            phone.keyboard.press("Escape")
            expect(phone.locator("#menu")).to_have_attribute("aria-expanded", "false")
            return b.errors
        finally:
            b.close()


async def test_two_users_on_two_gateways_chat_in_the_browser(tmp_path):
    image = png(40, 30)
    async with chat_system(tmp_path) as (hub, g1, g2):
        with trio.fail_after(90):
            errors = await trio.to_thread.run_sync(two_users, g1.http, g2.http, image)
    assert errors == []


LONG = 260  # messages of a topic longer than the page keeps from the hub's snapshot (200)

SCROLL_TO_TOP_UNTIL_FIRST = """() => {
    const s = document.querySelector('.scroller');
    s.scrollTop = 0;
    s.dispatchEvent(new Event('scroll'));
    return [...document.querySelectorAll('li.msg .body')].some((b) => b.textContent === 'm000');
}"""


def resume_keyboard_history(gw: str, stop_servers, post_and_restart, session_key: str) -> list[str]:
    with sync_api.sync_playwright() as pw:
        b = Browser(pw)
        # while the servers are down the page's requests fail: those errors are expected here
        b.allowed.append(
            re.compile(r"net::ERR_CONNECTION_REFUSED|net::ERR_EMPTY_RESPONSE|Failed to load resource: net::")
        )
        try:
            page = b.page(gw + "/#/topic/long", viewport={"width": 1000, "height": 700})
            dev_login(page, "dave")
            first_token = page.evaluate(f"JSON.parse(localStorage.getItem('{session_key}')).token")

            # history: the newest messages first, older pages fetched from the hub on scroll
            expect(msg(page, f"m{LONG - 1:03d}")).to_have_count(1)
            page.wait_for_function(SCROLL_TO_TOP_UNTIL_FIRST, polling=100, timeout=WAIT)
            bodies = page.locator("li.msg .body").all_inner_texts()
            numbered = [t for t in bodies if re.fullmatch(r"m\d{3}", t)]
            assert numbered == [f"m{i:03d}" for i in range(LONG)], "every message once, in order"
            expect(page.locator("li.start")).to_have_text("This is the beginning of #long.")

            # keyboard only: Enter sends, Shift+Enter is a new line
            composer = page.locator("textarea.input")
            composer.focus()
            page.keyboard.type("line one")
            page.keyboard.press("Shift+Enter")
            page.keyboard.type("line two")
            page.keyboard.press("Enter")
            mine = msg(page, "line one\nline two")
            expect(mine).to_have_count(1)
            expect(composer).to_have_value("")
            # Escape goes to the messages (the newest), Tab to its actions, a reaction by keys
            page.keyboard.press("Escape")
            expect(mine).to_be_focused()
            page.keyboard.press("Tab")
            expect(mine.get_by_role("button", name="Add a reaction")).to_be_focused()
            page.keyboard.press("Enter")
            expect(page.get_by_role("button", name="React with 👍")).to_be_focused()
            page.keyboard.press("ArrowRight")
            page.keyboard.press("Enter")
            expect(mine.locator(".reaction")).to_have_text("❤️1")
            expect(mine).to_be_focused()
            # e edits, Escape cancels, Enter saves
            page.keyboard.press("e")
            editor = page.locator("textarea.edit")
            expect(editor).to_be_focused()
            page.keyboard.type(" and more")
            page.keyboard.press("Escape")
            expect(page.locator("textarea.edit")).to_have_count(0)
            expect(mine).to_be_focused()
            page.keyboard.press("e")
            expect(page.locator("textarea.edit")).to_be_focused()
            page.keyboard.press("Control+a")
            page.keyboard.type("edited by keyboard")
            page.keyboard.press("Enter")
            expect(msg(page, "edited by keyboard")).to_have_count(1)
            expect(msg(page, "edited by keyboard").locator(".edited")).to_be_visible()
            page.keyboard.press("ArrowUp")
            expect(msg(page, f"m{LONG - 1:03d}")).to_be_focused()

            # the hub and the gateway go away: a banner; what happened meanwhile arrives once back
            stop_servers()
            expect(page.locator("#banner")).to_be_visible()
            expect(page.locator("#banner")).to_contain_text("reconnecting")
            shot(page, "disconnected.png")
            post_and_restart()
            expect(page.locator("#banner")).to_be_hidden()
            for i in range(3):
                expect(msg(page, f"while away {i}")).to_have_count(1)
            conv = page.locator("#conv-list a", has_text="carol")
            expect(conv.locator(".badge")).to_have_text("2")
            conv.click()
            expect(msg(page, "dm while away 0")).to_have_count(1)
            expect(msg(page, "dm while away 1")).to_have_count(1)
            assert page.locator("li.msg").count() == 2
            page.locator('#topic-list a[data-topic="long"]').click()
            assert msg(page, "edited by keyboard").count() == 1

            # the access token (6 s here) is renewed before it expires: still logged in, no 401
            page.wait_for_function(
                "([k, t]) => JSON.parse(localStorage.getItem(k)).token !== t", arg=[session_key, first_token]
            )
            composer.fill("still here")
            composer.press("Enter")
            expect(msg(page, "still here")).to_have_count(1)
            return b.errors
        finally:
            b.close()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_reconnect_keyboard_and_history_pages(tmp_path):
    hub_http, hub_wire, g2_http, g2_wire = (free_port() for _ in range(4))
    hub_opts = dict(mode="hub", hub={"http": f"127.0.0.1:{hub_http}"}, listen=f"127.0.0.1:{hub_wire}")
    hub_dir, g2_dir = os.path.join(tmp_path, "hub"), os.path.join(tmp_path, "g2")
    async with trio.open_nursery() as nursery:
        hub = await start_daemon(nursery, hub_dir, **hub_opts)
        g2_opts = dict(
            mode="gateway",
            hubs=[hub.address],
            listen=f"127.0.0.1:{g2_wire}",
            gateway={
                "test_login": True,
                "token_ttl": 6.0,
                "hub_url": hub.http,
                "http": f"127.0.0.1:{g2_http}",
            },
        )
        running = {"hub": hub, "g2": await start_daemon(nursery, g2_dir, **g2_opts)}
        async with (
            gateway(tmp_path, "g1", hubs=[hub.address], hub_url=hub.http) as g1,
            httpx.AsyncClient(base_url=running["g2"].http, timeout=10.0) as g2web,
            httpx.AsyncClient(base_url=hub.http, timeout=10.0) as hubweb,
        ):
            carol, hc = await login(g1.web, "carol")
            dave, hd = await login(g2web, "dave")
            result(await g1.web.post("/profile", json={"data": {"name": "carol"}}, headers=hc))
            result(await g1.web.post("/friends", json={"data": {"key": dave}}, headers=hc))
            result(await g2web.post("/friends", json={"data": {"key": carol, "name": "carol"}}, headers=hd))
            for i in range(LONG):
                result(await g1.web.post("/topics/long", json={"data": f"m{i:03d}"}, headers=hc))
            with trio.fail_after(20):
                while len(result(await hubweb.get("/topics/long"))) < LONG:
                    await trio.sleep(0.05)
            token = trio.lowlevel.current_trio_token()

            async def stop():
                await running["hub"].stop()
                await running["g2"].stop()

            async def post_and_restart():
                for i in range(3):
                    result(await g1.web.post("/topics/long", json={"data": f"while away {i}"}, headers=hc))
                for i in range(2):
                    body = {"data": {"key": dave, "message": f"dm while away {i}"}}
                    result(await g1.web.post("/dm", json=body, headers=hc))
                running["hub"] = await start_daemon(nursery, hub_dir, **hub_opts)
                running["g2"] = await start_daemon(nursery, g2_dir, **g2_opts)

            with trio.fail_after(90):
                errors = await trio.to_thread.run_sync(
                    resume_keyboard_history,
                    running["g2"].http,
                    lambda: trio.from_thread.run(stop, trio_token=token),
                    lambda: trio.from_thread.run(post_and_restart, trio_token=token),
                    "pttd.session",
                )
            assert errors == []
            running["hub"].daemon.stop()
            running["g2"].daemon.stop()


def key_login(gw: str, seed: str, key: str) -> list[str]:
    with sync_api.sync_playwright() as pw:
        b = Browser(pw)
        # the gateway may answer reads 404 until it has synced the repository, and writes 403
        b.allowed.append(re.compile(r"status of 40[34]"))
        try:
            page = b.page(gw + "/", viewport={"width": 1000, "height": 700})
            page.fill("#login-seed", seed)
            page.get_by_role("button", name="Log in with key").click()
            expect(page.locator("#main")).to_be_attached()
            assert page.locator("#login-seed").count() == 0
            page.click("#people-link")
            expect(page.locator("#my-key")).to_have_text(key)
            # the gateway does not hold this key: a write is refused, and the page says why
            page.click("#new-topic")
            page.fill("#new-topic-name", "mine")
            page.locator("#new-topic-name").press("Enter")
            expect(page.locator(".toast.error", has_text="write through your own node")).to_be_visible()
            # the seed was not kept anywhere
            stored = page.evaluate("JSON.stringify(Object.assign({}, localStorage, sessionStorage))")
            assert seed not in stored
            return b.errors
        finally:
            b.close()


async def test_bring_your_own_key_login(tmp_path):
    async with trio.open_nursery() as nursery:
        hub = await start_daemon(nursery, os.path.join(tmp_path, "hub"), mode="hub")
        node = await start_daemon(nursery, os.path.join(tmp_path, "node"), hubs=[hub.address])
        keys = os.path.join(tmp_path, "node", "keys")
        (name,) = [n for n in os.listdir(keys) if n.endswith(".key")]
        with open(os.path.join(keys, name)) as f:
            seed = f.read().strip()
        async with gateway(tmp_path, "g1", hubs=[hub.address], hub_url=hub.http) as g1:
            with trio.fail_after(60):
                errors = await trio.to_thread.run_sync(key_login, g1.http, seed, name[: -len(".key")])
        assert errors == []
        node.daemon.stop()
        nursery.cancel_scope.cancel()


class FakeProvider:
    """An OpenID Connect provider's authorization endpoint (implicit flow): it "logs in"
    at once and sends the browser back with a signed id_token in the URL fragment."""

    def __init__(self, client_id: str):
        import http.server
        import threading
        import urllib.parse

        import jwt
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        self.jwks = {"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}
        provider = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                now = int(time.time())
                claims = {
                    "iss": provider.issuer,
                    "sub": "user-42",
                    "aud": client_id,
                    "iat": now,
                    "exp": now + 300,
                    "nonce": q.get("nonce"),
                    "name": "Olive",
                    "email": "olive@example.org",
                }
                token = jwt.encode(claims, provider.key, algorithm="RS256", headers={"kid": "k1"})
                frag = urllib.parse.urlencode({"id_token": token, "state": q.get("state", "")})
                self.send_response(302)
                self.send_header("Location", f"{q['redirect_uri']}#{frag}")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def oidc_login(gw: str) -> list[str]:
    with sync_api.sync_playwright() as pw:
        b = Browser(pw)
        b.allowed.append(re.compile(r"status of 401"))  # the wrong password, on purpose
        try:
            page = b.page(gw + "/", viewport={"width": 1000, "height": 700})
            page.get_by_role("button", name="Log in with Test ID").click()
            expect(page.locator(".me-name")).to_have_text("Olive")
            assert "id_token" not in page.url, "the token is taken out of the URL"
            page.reload()  # still logged in after a reload
            expect(page.locator(".me-name")).to_have_text("Olive")
            page.click("#people-link")
            expect(page.locator("#my-key")).to_be_visible()
            expect(page.locator("#pw-current")).to_have_count(0)  # no password to change
            page.click("#logout")
            expect(page.get_by_role("heading", name="Log in with a password")).to_be_visible()
            assert page.evaluate("localStorage.getItem('pttd.session')") is None
            # a new account with a password, then a log out and a log in with it
            page.fill("#login-user", "erin")
            page.fill("#login-pass", "correct horse")
            page.click("#register")
            expect(page.locator(".me-name")).to_have_text("erin")
            page.click("#logout")
            page.fill("#login-user", "erin")
            page.fill("#login-pass", "wrong horse!")
            page.get_by_role("button", name="Log in", exact=True).click()
            expect(page.locator(".login .status")).to_have_text("wrong username or password")
            page.fill("#login-pass", "correct horse")
            page.get_by_role("button", name="Log in", exact=True).click()
            expect(page.locator(".me-name")).to_have_text("erin")
            # a new password, from the people screen (shown to password accounts only)
            page.click("#people-link")
            page.fill("#pw-current", "correct horse")
            page.fill("#pw-new", "battery staple")
            page.fill("#pw-again", "battery staple")
            page.get_by_role("button", name="Change password").click()
            expect(page.locator(".toast", has_text="Your password was changed")).to_be_visible()
            page.click("#logout")
            page.fill("#login-user", "erin")
            page.fill("#login-pass", "battery staple")
            page.get_by_role("button", name="Log in", exact=True).click()
            expect(page.locator(".me-name")).to_have_text("erin")
            # a crafted link with a provider's "error" (no login started in this tab):
            # nothing of it is shown, and the user stays logged in
            page.goto(gw + "/?again=1#error=access_denied&error_description=Log%20in%20at%20evil.example")
            expect(page.locator(".me-name")).to_have_text("erin")
            expect(page.get_by_text("evil.example")).to_have_count(0)
            assert "error=" not in page.url
            # a hash that is no percent-encoding: routed as no topic, no error thrown
            page.goto(gw + "/?c=1#/topic/%E0")
            expect(page.locator(".me-name")).to_have_text("erin")
            expect(page).not_to_have_url(re.compile(r"%E0"))
            # one view failing on a change does not keep the others from hearing of it
            b.allowed.append(re.compile(r"a view that fails"))
            ran = page.evaluate(
                """async () => {
                    const s = await import('./app/store.js');
                    let ran = false;
                    s.on('test-change', () => { throw new Error('a view that fails'); });
                    s.on('test-change', () => { ran = true; });
                    s.changed('test-change');
                    s.flushNow();
                    return ran;
                }"""
            )
            assert ran is True
            return b.errors
        finally:
            b.close()


async def test_openid_connect_and_password_logins(tmp_path):
    from pttd.config import OidcProvider

    provider = FakeProvider("pttd-web")
    try:
        jwks = os.path.join(tmp_path, "jwks.json")
        with open(jwks, "w") as f:
            json.dump(provider.jwks, f)
        oidc = OidcProvider(
            name="Test ID",
            issuer=provider.issuer,
            client_id="pttd-web",
            jwks=jwks,
            authorization_endpoint=provider.issuer + "/authorize",
        )
        async with gateway(tmp_path, "g1", oidc=[oidc]) as g1:
            with trio.fail_after(60):
                errors = await trio.to_thread.run_sync(oidc_login, g1.http)
        assert errors == []
    finally:
        provider.close()


def own_messages_and_channel_links(base: str, bob: str, channel: dict, bob_says) -> list[str]:
    with sync_api.sync_playwright() as pw:
        b = Browser(pw)
        try:
            # one user in two tabs (two logins): what one sends, the other shows at once
            tab1 = b.page(base + "/", viewport={"width": 1100, "height": 720})
            dev_login(tab1, "alice")
            tab2 = b.page(base + "/", viewport={"width": 1100, "height": 720})
            dev_login(tab2, "alice")
            for tab in (tab1, tab2):
                tab.evaluate("(k) => { location.hash = '#/dm/key:' + k; }", bob)
                expect(tab.locator("textarea.input")).to_be_visible()
            bob_says("are you there?")  # seen live in both: their streams are up
            for tab in (tab1, tab2):
                expect(msg(tab, "are you there?")).to_have_count(1)
            tab1.locator("textarea.input").fill("hi bob, from my laptop")
            tab1.locator("textarea.input").press("Enter")
            expect(msg(tab1, "hi bob, from my laptop")).to_have_count(1)
            expect(msg(tab2, "hi bob, from my laptop")).to_have_count(1)  # it was missing until a reload
            # a private channel's address opened directly (a reload on it): shown once the
            # channels are loaded, not "Loading…" for good
            key = "channel:" + channel["id"] + ":" + ",".join(sorted(channel["members"]))
            tab3 = b.page(base + "/#/dm/" + key.replace(":", "%3A"), viewport={"width": 1100, "height": 720})
            dev_login(tab3, "alice")
            expect(tab3.locator("h1#chat-title")).to_have_text("≡ " + channel["name"])
            return b.errors
        finally:
            b.close()


async def test_own_messages_in_other_tabs_and_a_private_channel_opened_by_its_address(tmp_path):
    """Two bugs of the web client found by a review: a direct message sent from one tab
    (or device) never showed in the user's others until a reload (the gateway sent dm
    events to the recipient only), and a private channel opened by its address stayed
    on "Loading…" (nothing routed again once the channels were loaded)."""
    async with gateway(tmp_path, "g1") as g:
        alice, ha = await login(g.web, "alice")
        bob, hb = await login(g.web, "bob")
        result(await g.web.post("/friends", json={"data": {"key": bob, "name": "Bob"}}, headers=ha))
        channel = result(await g.web.post("/pchannels", json={"data": {"members": [bob], "name": "plans"}}, headers=ha))
        token = trio.lowlevel.current_trio_token()

        def bob_says(text: str) -> None:  # from the browser's thread, into trio
            async def send() -> None:
                result(await g.web.post("/dm", json={"data": {"key": alice, "message": text}}, headers=hb))

            trio.from_thread.run(send, trio_token=token)

        with trio.fail_after(60):
            errors = await trio.to_thread.run_sync(own_messages_and_channel_links, g.http, bob, channel, bob_says)
        assert errors == []


SCROLL_TO_TOP_ONCE = """() => {
    const s = document.querySelector('.scroller');
    s.scrollTop = 0;
    s.dispatchEvent(new Event('scroll'));
}"""


def edit_of_an_old_message(base: str, edit_old_then_post, carol_reacts) -> list[str]:
    with sync_api.sync_playwright() as pw:
        b = Browser(pw)
        try:
            page = b.page(base + "/#/topic/long", viewport={"width": 1000, "height": 700})
            dev_login(page, "alice")
            expect(msg(page, f"m{LONG - 1:03d}")).to_have_count(1)
            edit_old_then_post()
            expect(msg(page, "after the edit")).to_have_count(1)  # the edit's event came before it

            # the picker open on a message that someone else reacts to meanwhile (it is
            # redrawn): the picker stays, and works; then hovering shows the toolbar again
            last = msg(page, "after the edit")
            last.hover()
            last.get_by_role("button", name="Add a reaction").click()
            expect(page.get_by_role("button", name="React with 👍")).to_be_visible()
            carol_reacts()
            expect(last.locator(".reaction")).to_have_text("🎉1")
            page.get_by_role("button", name="React with 👍").click()
            expect(last.locator(".reaction")).to_have_count(2)
            other = msg(page, f"m{LONG - 1:03d}")
            other.hover()
            expect(other.get_by_role("button", name="Add a reaction")).to_be_visible()

            # reaching the top once draws older messages above and keeps the view where it
            # was (it jumped to the oldest drawn and loaded no more without another scroll)
            drawn = page.locator("li.msg").count()
            page.evaluate(SCROLL_TO_TOP_ONCE)
            page.wait_for_function(f"() => document.querySelectorAll('li.msg').length > {drawn}", timeout=WAIT)
            page.wait_for_function("() => document.querySelector('.scroller').scrollTop > 0", timeout=WAIT)

            page.wait_for_function(SCROLL_TO_TOP_UNTIL_FIRST, polling=100, timeout=WAIT)
            bodies = page.locator("li.msg .body").all_inner_texts()
            numbered = [t for t in bodies if re.fullmatch(r"m\d{3}", t)]
            assert numbered == [f"m{i:03d}" for i in range(LONG) if i != 5], "no gap above the edited one"
            assert bodies.count("m005, edited") == 1
            return b.errors
        finally:
            b.close()


async def test_an_edit_of_an_old_message_a_picker_redrawn_and_the_top_of_a_long_topic(tmp_path):
    """Three bugs a review of the web client found. An edit event for a message older
    than the pages held put it in, and the next page started from its date: the
    messages between were never shown (the same rule keeps out an edit of a message the
    hub hides). A reaction picker open on a message redrawn meanwhile vanished, and no
    message offered its toolbar on hover after. Reaching the top of the drawn messages
    jumped to the oldest of them and loaded no more."""
    async with chat_system(tmp_path) as (hub, g1, _g2):
        _, ha = await login(g1.web, "alice")
        _, hc = await login(g1.web, "carol")
        result(await g1.web.post("/topics/long", json={"data": "alice was here"}, headers=ha))  # in its audience
        posted = [
            result(await g1.web.post("/topics/long", json={"data": f"m{i:03d}"}, headers=hc)) for i in range(LONG)
        ]
        async with httpx.AsyncClient(base_url=hub.http, timeout=10.0) as hubweb:
            with trio.fail_after(20):
                while len(result(await hubweb.get("/topics/long"))) < LONG + 1:
                    await trio.sleep(0.05)
        token = trio.lowlevel.current_trio_token()

        last: list[str] = []

        async def edit_and_post() -> None:
            edited = {"data": "m005, edited"}
            result(await g1.web.put(f"/topics/long/{posted[5]['id']}", json=edited, headers=hc))
            last.append(result(await g1.web.post("/topics/long", json={"data": "after the edit"}, headers=hc))["id"])

        async def react() -> None:
            reaction = {"data": {"msgID": last[0], "emoji": "🎉"}}
            result(await g1.web.post("/topics/long/reactions", json=reaction, headers=hc))

        with trio.fail_after(90):
            errors = await trio.to_thread.run_sync(
                edit_of_an_old_message,
                g1.http,
                lambda: trio.from_thread.run(edit_and_post, trio_token=token),
                lambda: trio.from_thread.run(react, trio_token=token),
            )
        assert errors == []
