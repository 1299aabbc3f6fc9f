"""Request-body limit and body-read deadline, enforced while streaming, with the API's JSON error shape.

Starlette/FastAPI ship a body limiter, but it answers an over-long declared Content-Length with a
plain-text body that bypasses the app's error handlers; clients of this API branch on the JSON
``code``, so this small ASGI middleware does the same job and answers in the API's format.

uvicorn has no timeout for reading a request (only ``timeout_keep_alive`` between requests), so a client
that trickles its body would hold its connection and a partly read upload forever. The whole body must
arrive within ``body_timeout_s`` of the first read; otherwise the answer is 408 ``request_timeout`` and
the connection is closed (the rest of the body is never read). Headers are the server's business: a
client trickling *headers* never reaches the app, so that deadline belongs to the proxy in front.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepfeat.app.errors import APIError, error_response

__all__ = ["BodyLimitMiddleware", "PayloadTooLarge", "BodyTimeout"]


class PayloadTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "payload_too_large", f"request body exceeds the limit of {limit} bytes")


class BodyTimeout(APIError):
    def __init__(self, seconds: float) -> None:
        super().__init__(
            408,
            "request_timeout",
            f"the request body did not arrive within {seconds:g} s",
            headers={"Connection": "close"},
        )


class BodyLimitMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        body_timeout_s: float | None = 60.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s
        # Its refusals never reach the app's error handlers, which count every other error code.
        self._on_error = on_error or (lambda code: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.isdigit():
                self._on_error("malformed_body")
                await error_response(400, "malformed_body", "invalid Content-Length header")(
                    scope, receive, send
                )
                return
            if int(declared) > self.max_bytes:
                # Refuse before reading a byte of the body.
                self._on_error("payload_too_large")
                await error_response(413, "payload_too_large", str(PayloadTooLarge(self.max_bytes).detail))(
                    scope, receive, send
                )
                return

        received = 0
        started = False
        deadline: float | None = None
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, deadline, body_done
            if self.body_timeout_s is None or body_done:
                # After the body, receive() only waits for a disconnect: no deadline applies to that.
                message = await receive()
            else:
                if deadline is None:
                    deadline = time.monotonic() + self.body_timeout_s
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    raise BodyTimeout(self.body_timeout_s) from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
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
        except (PayloadTooLarge, BodyTimeout) as exc:
            if started:
                raise
            headers = dict(exc.headers) if exc.headers else None
            self._on_error(exc.code)
            await error_response(exc.status_code, exc.code, str(exc.detail), headers=headers)(
                scope, receive, send
            )
