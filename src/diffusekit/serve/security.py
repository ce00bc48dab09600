"""The server's gate, as plain ASGI middleware in front of every route (the page, the API, /docs):

- a token, when one is set, on every request: ``Authorization: Bearer TOKEN``, or HTTP Basic with the token
  as the password (browsers ask for it themselves and send it with every request of the page, images and
  the event stream included; the community API's clients send Basic auth);
- another site's page may not call the server: a request whose ``Origin`` is not the server's own (or one
  allowed with --allow-origin) is refused, and without a token the ``Host`` must be a loopback name, so a
  DNS-rebinding page cannot reach a server bound to localhost;
- request bodies are read up to a size limit (413 beyond it, chunked bodies included) and must be JSON.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1), with or without brackets."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostname(host_header: str) -> str:
    """The host of a Host header ``name:port`` / ``[v6]:port``."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class Guard:
    """Wraps an ASGI app with the checks above. ``token`` None: no token (loopback binds only, which the
    command line enforces); ``allowed_origins``: other origins whose pages may call the API (CORS stays off
    unless the caller also adds it)."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int, allowed_origins: Iterable[str] = ()):
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # the server has no websocket routes: nothing else gets past the gate
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.token is None and not is_loopback(_hostname(host)):
            await _reject(send, 421, "WrongHost", f"this server answers to loopback names only (localhost, 127.0.0.1), "
                          f"not {host[:80]!r}; to serve other names, start it with --token")  # fmt: skip
            return
        origin = headers.get("origin")
        if origin is not None and not self._same_or_allowed(origin, host):
            await _reject(send, 403, "CrossOrigin", f"requests from pages of {origin[:80]!r} are refused (CORS is off; "
                          "diffusekit serve --allow-origin allows an origin)")  # fmt: skip
            return
        if self.token is not None and not self._authorized(headers.get("authorization", "")):
            await _reject(send, 401, "Unauthorized", "this server needs its token: send 'Authorization: Bearer "
                          "TOKEN', or HTTP Basic auth with the token as the password",
                          [(b"www-authenticate", b'Basic realm="diffusekit", charset="UTF-8"')])  # fmt: skip
            return
        if scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await _reject(send, 413, "PayloadTooLarge", self._too_large())
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _reject(send, 413, "PayloadTooLarge", self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if body and kind != "application/json":
            await _reject(send, 415, "UnsupportedMediaType", f"send the body as JSON with 'Content-Type: "
                          f"application/json' (got {kind[:60] or 'no content type'!r})")  # fmt: skip
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return (f"the request body is larger than {self.max_body_bytes} bytes (diffusekit serve --max-body-mib sets "
                "the limit)")  # fmt: skip

    def _same_or_allowed(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        if origin in self.allowed_origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == host.lower()

    def _authorized(self, header: str) -> bool:
        assert self.token is not None
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return False
        else:
            return False
        return hmac.compare_digest(given.encode("utf-8"), self.token.encode("utf-8"))


async def _reject(send: Send, status: int, error: str, detail: str, extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": error, "detail": detail}).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


__all__ = ["Guard", "is_loopback"]
