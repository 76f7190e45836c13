"""The checks every request passes before any route runs, for a server on the user's own machine.

A local server is reachable from any web page the user visits, so `Guard` turns away requests whose
Host is not loopback (DNS rebinding) or whose Origin is a foreign site, POSTs that are not JSON (a
page's "simple" requests need no preflight), bodies over `max_body`, and, with an API key, /v1
requests without `Authorization: Bearer <key>` (compared in constant time).
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from fastapi import HTTPException
from starlette.datastructures import Headers

from .schema import BadRequest, clip, error_response

MAX_BODY_BYTES = 4 << 20  # a full 8K-token prompt is well under 1 MB of JSON
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def hostname(netloc: str) -> str:
    """"127.0.0.1:8000" -> "127.0.0.1", "[::1]:8000" -> "::1"."""
    return (urlsplit("//" + netloc).hostname or "") if netloc else ""


class Guard:
    """ASGI middleware: the checks every request passes before any route runs (see the module doc)."""

    def __init__(self, app, api_key: str | None = None, max_body: int = MAX_BODY_BYTES,
                 hosts: frozenset = frozenset(LOOPBACK)):
        self.app, self.api_key, self.max_body, self.hosts = app, api_key, max_body, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self.check(scope["method"], scope["path"], Headers(scope=scope))
        if problem:
            return await error_response(problem)(scope, receive, send)
        await self.app(scope, self.limited(receive), send)

    def check(self, method: str, path: str, h: Headers) -> BadRequest | None:
        if "host" in h and hostname(h["host"]) not in self.hosts:
            return BadRequest(f"Host {clip(h['host'])} is not this local server's: only loopback names "
                              "are served (this blocks DNS rebinding).", status=403, code="forbidden_host")
        origin = h.get("origin")
        if origin is not None and (urlsplit(origin).scheme not in ("http", "https")
                                   or hostname(urlsplit(origin).netloc) not in self.hosts):
            return BadRequest(f"Requests from the web page {clip(origin)} are refused: only local "
                              "clients may drive this engine.", status=403, code="forbidden_origin")
        if self.api_key and path.startswith("/v1/"):
            given = h.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return BadRequest("Missing or wrong API key: send 'Authorization: Bearer <key>' with the "
                                  "key the engine was started with (KVBLEND_API_KEY).", status=401,
                                  code="invalid_api_key")
        if method == "POST" and h.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return BadRequest("POST bodies must be JSON: send 'Content-Type: application/json'.",
                              status=415, code="unsupported_media_type")
        if int(h.get("content-length") or 0) > self.max_body:
            return too_large(self.max_body)
        return None

    def limited(self, receive):
        """`receive`, counting the body: a chunked body over the limit stops being read there."""
        seen = 0

        async def wrapped():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise HTTPException(413, too_large(self.max_body).message)
            return message
        return wrapped


def too_large(limit: int) -> BadRequest:
    return BadRequest(f"The request body is over {limit} bytes; send less text per request.", status=413,
                      code="request_too_large")

