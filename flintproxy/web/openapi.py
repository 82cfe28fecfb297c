"""``GET /openapi.json``: the OpenAPI 3.1 description of /v1 and /api.

Shipped as package data (``openapi.json`` beside this module) so clients, docs and
the adversarial suite's fuzzers (tests/web/test_fuzz_api.py) read the same contract.
The bytes are read once, at import, and served as they are: no per-request work.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

__all__ = ["SPEC", "openapi"]

SPEC: bytes = resources.files(__package__).joinpath("openapi.json").read_bytes()


async def openapi(request: web.Request) -> web.Response:
    """The description, cacheable: it changes only with the installed version."""
    return web.Response(body=SPEC, content_type="application/json",
                        headers={"Cache-Control": "public, max-age=3600"})
