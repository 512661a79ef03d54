"""The HTTP/1.1 server (pttd.gateway.server) on a real socket, with a small ASGI app:
framing, keep-alive, pipelining, request bodies, streamed answers, bad requests."""

from __future__ import annotations

import trio

from pttd.gateway import server


async def echo_app(scope, receive, send) -> None:
    """Answers the method, path and request body; /stream streams three parts."""
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


async def test_bad_requests_are_answered_and_closed(nursery):
    host, port = await connect(nursery)
    for raw, status in (
        (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 3000 + b"\r\n", b"431"),
    ):
        s = Raw(await trio.open_tcp_stream(host, port))
        await s.stream.send_all(raw)
        line, headers, body = await s.read_answer()
        assert line.split()[1] == status, (raw[:40], line)
        assert headers[b"connection"] == b"close" and body.startswith(b'{"error":')
        assert await s.closed()
        await s.stream.aclose()
    # the server goes on
    s = Raw(await trio.open_tcp_stream(host, port))
    await s.stream.send_all(b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await s.read_answer())[2] == b"GET /fine "
