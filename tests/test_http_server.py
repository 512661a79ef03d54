"""The HTTP/1.1 server (pttd.gateway.server) on a real socket, with a small ASGI app:
framing, keep-alive, pipelining, request bodies, streamed answers, bad requests."""

from __future__ import annotations

import trio

from pttd.gateway import server


async def echo_app(scope, receive, send) -> None:
    """Answers the method, path and request body; /stream streams three parts; /boom
    fails; /refuse answers 401 without reading the body."""
    if scope["path"] == "/boom":
        raise RuntimeError("a bug")
    if scope["path"] == "/wait":  # a stream that lasts until the client goes away
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"open", "more_body": True})
        assert (await receive())["type"] == "http.disconnect"
        return
    if scope["path"] == "/refuse":
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"no"})
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for part in (b"one", b"two", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if scope["path"] == "/ignore-body":
        body = b"ignored"
    answer = f"{scope['method']} {scope['path']} ".encode() + body
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": answer})


class Raw:
    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buf = b""

    async def read_answer(self) -> tuple[bytes, dict, bytes]:
        """One answer: (status line, headers, body), by Content-Length or chunked."""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in self.buf:
                self.buf += await self._more()
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            status, *lines = head.split(b"\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
            if b"content-length" in headers:
                n = int(headers[b"content-length"])
                while len(self.buf) < n:
                    self.buf += await self._more()
                body, self.buf = self.buf[:n], self.buf[n:]
                return status, headers, body
            assert headers.get(b"transfer-encoding") == b"chunked", headers
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    self.buf += await self._more()
                size_line, _, rest = self.buf.partition(b"\r\n")
                size = int(size_line, 16)
                while len(rest) < size + 2:
                    rest += await self._more()
                body += rest[:size]
                self.buf = rest[size + 2 :]
                if size == 0:
                    return status, headers, body

    async def _more(self) -> bytes:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError("closed")
        return data

    async def closed(self) -> bool:
        with trio.fail_after(5):
            return self.buf == b"" and await self.stream.receive_some(1024) == b""


async def connect(nursery) -> tuple[str, int]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    addresses = await nursery.start(server.serve, echo_app, listeners)
    host, port = addresses[0].removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def test_keep_alive_pipelining_and_bodies(nursery):
    host, port = await connect(nursery)
    s = Raw(await trio.open_tcp_stream(host, port))
    # two requests in one write, the second with a body: two answers, in order
    await s.stream.send_all(
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert (await s.read_answer())[2] == b"GET /a "
    status, headers, body = await s.read_answer()
    assert status == b"HTTP/1.1 200 OK" and body == b"POST /b hello" and headers[b"content-length"] == b"13"
    # a chunked request body
    await s.stream.send_all(
        b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert (await s.read_answer())[2] == b"PUT /c abcde"
    # a body the app does not read is skipped: the connection goes on
    await s.stream.send_all(b"POST /ignore-body HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz")
    await s.stream.send_all(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await s.read_answer())[2].startswith(b"POST /ignore-body")
    assert (await s.read_answer())[2] == b"GET /after "
    # HEAD: the head of the answer, no body
    await s.stream.send_all(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /z HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(5):
        while b"GET /z" not in s.buf:
            s.buf += await s._more()
    assert s.buf.startswith(b"HTTP/1.1 200 OK") and s.buf.count(b"HTTP/1.1 200") == 2
    await s.stream.aclose()


async def test_expect_continue_streamed_answers_and_http_1_0(nursery):
    host, port = await connect(nursery)
    s = Raw(await trio.open_tcp_stream(host, port))
    await s.stream.send_all(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    with trio.fail_after(5):
        while b"\r\n\r\n" not in s.buf:
            s.buf += await s._more()
    assert s.buf.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    s.buf = s.buf.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
    await s.stream.send_all(b"body")
    assert (await s.read_answer())[2] == b"POST /e body"
    await s.stream.send_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await s.read_answer()
    assert headers[b"transfer-encoding"] == b"chunked" and body == b"onetwothree"
    await s.stream.aclose()
    # HTTP/1.0: answered, then closed (a streamed answer ends with the connection)
    s = Raw(await trio.open_tcp_stream(host, port))
    await s.stream.send_all(b"GET /old HTTP/1.0\r\n\r\n")
    status, headers, body = await s.read_answer()
    assert body == b"GET /old " and headers[b"connection"] == b"close"
    assert await s.closed()


async def test_a_client_gone_before_its_100_continue_is_a_disconnect_not_an_error(nursery, monkeypatch, caplog):
    """The 100 Continue that a request with Expect: 100-continue waits for could not be
    sent (the client reset the connection): the app's receive() says http.disconnect, as
    for any client gone; the send's error used to reach the app, logged as its failure."""
    import logging

    real = server._Connection._send

    async def gone_at_continue(self, data):
        if bytes(data).startswith(b"HTTP/1.1 100 Continue"):
            raise trio.BrokenResourceError("connection reset by peer")
        await real(self, data)

    monkeypatch.setattr(server._Connection, "_send", gone_at_continue)
    host, port = await connect(nursery)
    s = Raw(await trio.open_tcp_stream(host, port))
    with caplog.at_level(logging.ERROR):
        await s.stream.send_all(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        with trio.fail_after(5):
            assert await s.closed()
        s = Raw(await trio.open_tcp_stream(host, port))  # the server goes on
        await s.stream.send_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await s.read_answer())[2] == b"GET /next "
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_bad_requests_are_answered_and_closed(nursery):
    host, port = await connect(nursery)
    for raw, status in (
        (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 3000 + b"\r\n", b"431"),
    ):
        s = Raw(await trio.open_tcp_stream(host, port))
        await s.stream.send_all(raw)
        line, headers, body = await s.read_answer()
        assert line.split()[1] == status, (raw[:40], line)
        assert headers[b"connection"] == b"close" and body.startswith(b'{"error":')
        assert await s.closed()
        await s.stream.aclose()
    # trailers of a chunked body are bounded like a head
    s = Raw(await trio.open_tcp_stream(host, port))
    await s.stream.send_all(b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n")
    await s.stream.send_all(b"X-T: b\r\n" * 3000)
    line, headers, body = await s.read_answer()
    assert line.split()[1] == b"431" and headers[b"connection"] == b"close"
    assert await s.closed()
    # an upgrade (curl --http2 asks for h2c) is answered as HTTP/1.1, then the connection ends
    s = Raw(await trio.open_tcp_stream(host, port))
    await s.stream.send_all(b"GET /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    line, headers, body = await s.read_answer()
    assert body == b"GET /up " and headers[b"connection"] == b"close"
    assert await s.closed()
    # the server goes on
    s = Raw(await trio.open_tcp_stream(host, port))
    await s.stream.send_all(b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await s.read_answer())[2] == b"GET /fine "


async def test_failures_and_early_answers_close_cleanly(nursery):
    host, port = await connect(nursery)
    # an app that fails: one 500, then the connection ends
    s = Raw(await trio.open_tcp_stream(host, port))
    await s.stream.send_all(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    line, headers, body = await s.read_answer()
    assert line.startswith(b"HTTP/1.1 500") and b"internal error" in body
    assert await s.closed()
    # answered before the body it did not read (a 100 Continue never sent): the client's
    # next bytes cannot be told from that body, so the connection ends with the answer
    s = Raw(await trio.open_tcp_stream(host, port))
    await s.stream.send_all(
        b"POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\nExpect: 100-continue\r\n\r\n"
    )
    line, headers, body = await s.read_answer()
    assert line.startswith(b"HTTP/1.1 401") and headers[b"connection"] == b"close"
    assert await s.closed()
    # HTTP/1.0 with keep-alive asked for: told so, and kept
    s = Raw(await trio.open_tcp_stream(host, port))
    await s.stream.send_all(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    line, headers, body = await s.read_answer()
    assert headers[b"connection"] == b"keep-alive" and body == b"GET /a "
    await s.stream.send_all(b"GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert (await s.read_answer())[2] == b"GET /b "
    await s.stream.aclose()


async def test_a_stream_ends_when_its_client_sends_too_much_ahead(nursery):
    host, port = await connect(nursery)
    s = Raw(await trio.open_tcp_stream(host, port))
    await s.stream.send_all(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(5):
        while b"open" not in s.buf:
            s.buf += await s._more()
        # pipelined requests past what is read ahead: the stream's app is told to stop
        await s.stream.send_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n" * 3000)
        while True:
            try:
                s.buf += await s._more()
            except (EOFError, trio.BrokenResourceError):
                break


async def test_connection_limits_answer_503_readably(nursery):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    addresses = await nursery.start(server.serve, echo_app, listeners, 10, 2)
    host, port = addresses[0].removeprefix("http://").rsplit(":", 1)
    held = [Raw(await trio.open_tcp_stream(host, int(port))) for _ in range(2)]
    for s in held:  # both served (their slots taken)
        await s.stream.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await s.read_answer())[2] == b"GET /a "
    # a third from the same address: refused with a 503 it can read, its request unread
    s = Raw(await trio.open_tcp_stream(host, int(port)))
    await s.stream.send_all(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"z" * 100_000)
    line, headers, body = await s.read_answer()
    assert line.startswith(b"HTTP/1.1 503") and b"your address" in body
    # one leaves: a new one is served
    await held[0].stream.aclose()
    with trio.fail_after(5):
        while True:
            s = Raw(await trio.open_tcp_stream(host, int(port)))
            await s.stream.send_all(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            line, headers, body = await s.read_answer()
            if line.startswith(b"HTTP/1.1 200"):
                break
            await trio.sleep(0.05)  # the server has not seen the close yet
    assert body == b"GET /b "
