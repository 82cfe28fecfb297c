"""The web console's files: static HTML/CSS/JS from the package, no build step.

At start ``ConsoleAssets`` reads ``web/static/`` once, names every asset by its
content (``/static/app.3f9c0e1a2b4d.js``: the first 12 hex digits of its SHA-256)
and writes those URLs into ``index.html``. An asset's URL changes whenever its bytes
do, so assets are served ``Cache-Control: public, max-age=31536000, immutable`` and
a browser never asks again; the page itself is ``no-cache`` (revalidated by ETag),
so a new release is picked up on the next load. Assets are gzipped once, at start,
for clients that accept it (uPlot: 51 KB -> 22 KB).

Every console response, the API's included, carries ``SECURITY_HEADERS``: a strict
Content-Security-Policy (this origin only, no inline script or style, no framing),
``nosniff``, ``no-referrer`` and ``X-Frame-Options: DENY``.
"""

from __future__ import annotations

import gzip
import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from flintproxy.errors import NotFound

__all__ = ["CSP", "SECURITY_HEADERS", "STATIC_DIR", "ConsoleAssets", "security_headers"]

STATIC_DIR = Path(__file__).parent / "static"
INDEX = "index.html"
SERVED_SUFFIXES = frozenset({".js", ".css", ".svg", ".png", ".ico"})
IMMUTABLE = "public, max-age=31536000, immutable"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; "
       "object-src 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the headers of the module docstring on every response."""
    response.headers.update(SECURITY_HEADERS)


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    gzipped: bytes
    content_type: str
    etag: str


def _asset(body: bytes, content_type: str) -> Asset:
    digest = hashlib.sha256(body).hexdigest()
    return Asset(body, gzip.compress(body, 9, mtime=0), content_type, f'"{digest[:32]}"')


class ConsoleAssets:
    """The console's files in memory, by hashed URL; see the module docstring."""

    def __init__(self, root: Path = STATIC_DIR) -> None:
        self.urls: dict[str, str] = {}  # "app.js" -> "/static/app.<hash>.js"
        self._assets: dict[str, Asset] = {}  # "app.<hash>.js" -> Asset
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.suffix not in SERVED_SUFFIXES:
                continue
            rel = path.relative_to(root).as_posix()
            body = path.read_bytes()
            digest = hashlib.sha256(body).hexdigest()[:12]
            stem, dot, ext = rel.rpartition(".")
            hashed = f"{stem}.{digest}{dot}{ext}"
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype == "application/javascript":
                ctype = "text/javascript" if ext == "js" else ctype
                ctype += "; charset=utf-8"
            self._assets[hashed] = _asset(body, ctype)
            self.urls[rel] = f"/static/{hashed}"
        html = (root / INDEX).read_text("utf-8")
        for rel, url in self.urls.items():
            html = html.replace("{{" + rel + "}}", url)
        if "{{" in html:
            raise ValueError(f"{INDEX} names an asset that does not exist: "
                             f"{html[html.index('{{'):][:60]!r}")
        self.index_page = _asset(html.encode(), "text/html; charset=utf-8")

    def _send(self, request: web.Request, asset: Asset, cache: str) -> web.Response:
        headers = {"Cache-Control": cache, "ETag": asset.etag, "Vary": "Accept-Encoding"}
        if request.headers.get("If-None-Match") == asset.etag:
            return web.Response(status=304, headers=headers)
        body = asset.body
        if "gzip" in request.headers.get("Accept-Encoding", "") and len(asset.gzipped) < len(
                body):
            body = asset.gzipped
            headers["Content-Encoding"] = "gzip"
        headers["Content-Type"] = asset.content_type
        return web.Response(body=body, headers=headers)

    async def index(self, request: web.Request) -> web.Response:
        """The single page (every console view is a fragment of it: ``/#/keys``)."""
        return self._send(request, self.index_page, "no-cache")

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        found = self._assets.get(name)
        if found is None:
            raise NotFound("No such console file.")
        return self._send(request, found, IMMUTABLE)
