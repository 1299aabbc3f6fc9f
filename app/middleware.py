"""Request-body limit enforced while streaming, with the API's JSON error shape.

Starlette/FastAPI ship a body limiter, but it answers an over-long declared Content-Length with a
plain-text body that bypasses the app's error handlers; clients of this API branch on the JSON
``code``, so this small ASGI middleware does the same job and answers in the API's format.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import APIError, error_response

__all__ = ["BodyLimitMiddleware", "PayloadTooLarge"]


class PayloadTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "malformed_body", "invalid Content-Length header")(
                    scope, receive, send
                )
                return
            if int(declared) > self.max_bytes:
                # Refuse before reading a byte of the body.
                await error_response(413, "payload_too_large", str(PayloadTooLarge(self.max_bytes).detail))(
                    scope, receive, send
                )
                return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge as exc:
            if started:
                raise
            await error_response(413, exc.code, str(exc.detail))(scope, receive, send)
