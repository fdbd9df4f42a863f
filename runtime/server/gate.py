"""The ASGI gate in front of every route: the API key, then the body size limit. Plain ASGI rather
than Starlette's BaseHTTPMiddleware, which gets in the way of streaming and of disconnect checks."""

from __future__ import annotations

import hmac

import orjson

from arborlm.runtime.server.errors import error_body


class Gate:
    """Checks the API key (all but /health), then reads the whole body up front: past `limit`
    bytes the answer is 413, before any route sees the request."""

    def __init__(self, app, limit: int, api_key: str | None):
        self.app, self.limit, self.api_key = app, limit, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return await _reply(send, 401, "invalid or missing API key (Authorization: Bearer <key>)",
                                    "invalid_api_key")
        if int(headers.get(b"content-length", b"0") or 0) > self.limit:
            return await self._reject(send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.limit:
                return await self._reject(send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send):
        await _reply(send, 413, f"request body exceeds {self.limit} bytes", "request_too_large")


async def _reply(send, status: int, message: str, code: str):
    payload = orjson.dumps(error_body(status, message, code=code))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
