"""The web client's files (``pttd/gateway/webclient/``), served by the gateway at ``/``.

The files ship inside the Python package, so ``pip install`` is the whole install: no
build step, no request to any other host. They are read once when the app is built and
served from memory with an ETag (a reload asks "still the same?" and gets a 304).
"""

from __future__ import annotations

import hashlib
from importlib import resources
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from ..web import error

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}


def _load() -> dict[str, tuple[bytes, str, str]]:
    files: dict[str, tuple[bytes, str, str]] = {}
    root = resources.files("pttd.gateway") / "webclient"

    def walk(d, prefix: str) -> None:
        for entry in d.iterdir():
            name = prefix + entry.name
            if entry.is_dir():
                walk(entry, name + "/")
                continue
            ext = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
            if ext not in TYPES:
                continue
            body = entry.read_bytes()
            files[name] = (body, TYPES[ext], '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"')

    if root.is_dir():
        walk(root, "")
    return files


def content_security_policy(hub_url: str) -> str:
    """What the page may load and reach: only this gateway, and the hub it is told of.
    A message that slips past the escaping still cannot run a script or send data away."""
    connect = ["'self'"]
    if hub_url:
        parts = urlsplit(hub_url)
        if parts.scheme in ("http", "https") and parts.netloc:
            connect.append(f"{parts.scheme}://{parts.netloc}")
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        f"connect-src {' '.join(connect)}; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


class WebClient:
    def __init__(self, hub_url: str):
        self.files = _load()
        self.csp = content_security_policy(hub_url)

    async def serve(self, request: Request) -> Response:
        name = request.path_params.get("path") or "index.html"
        found = self.files.get(name)
        if found is None:
            return error(404, f"no such file: /{name}")
        body, ctype, etag = found
        headers = {
            "ETag": etag,
            "Cache-Control": "no-cache",  # always revalidated: an upgrade shows at the next load
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }
        if ctype.startswith("text/html"):
            headers["Content-Security-Policy"] = self.csp
            headers["X-Frame-Options"] = "DENY"
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=ctype, headers=headers)
