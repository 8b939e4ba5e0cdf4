"""A cap on REST request bodies, enforced while the bytes stream in (pure ASGI, nothing buffered past the cap).

The default comes from PROCTOR_MAX_REQUEST_BYTES; a route that needs more (an upload) declares its own with
`openapi_extra=body_limit(n)`, which also shows the limit in the OpenAPI document. A body over the limit is
answered 413 with the JSON error body, whether the client announced its length (Content-Length, refused
before any byte is read) or streams it chunked (refused as soon as the count passes the limit). The limit is
looked up when the route first reads its body; routes that take no body read nothing.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LIMIT_KEY = "x-max-body-bytes"


def body_limit(max_bytes: int) -> dict[str, Any]:
    """`openapi_extra` of a route whose bodies may be larger (or must be smaller) than the default."""
    return {LIMIT_KEY: max_bytes}


class BodyTooLarge(HTTPException):
    """Raised from `receive`: an HTTPException, so FastAPI's body reading passes it on to the JSON error handler."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body too large: at most {limit} bytes allowed", {"Connection": "close"})
        self.limit = limit


class BodyLimit:
    def __init__(self, app: ASGIApp, default: int) -> None:
        self.app = app
        self.default = default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit: int | None = None
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal limit, received
            if limit is None:  # first read: routing has put the route into the scope by now
                extra = getattr(scope.get("route"), "openapi_extra", None) or {}
                limit = int(extra.get(LIMIT_KEY, self.default))
                declared = _content_length(scope)
                if declared is not None and declared > limit:
                    raise BodyTooLarge(limit)  # refused before a byte is read
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as e:  # read outside a route's error handling (a route's own read is answered there)
            if started:
                raise
            await _reject(send, e)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length before the app sees the request
    return None


async def _reject(send: Send, e: BodyTooLarge) -> None:
    body = json.dumps({"error": e.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (e.headers or {}).items()]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
