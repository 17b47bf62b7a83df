"""Request bodies over `serve.max_request_bytes` get 413, counted on the bytes that arrive.

`Content-Length` may be absent (a chunked upload) or false, so a check of the header alone
lets any body through. This pure ASGI middleware counts the `http.request` chunks as the
app reads them and buffers nothing: the chunk that passes the limit gets the client a 413
at once (and the connection closed), and the app sees a disconnect, so it stops reading
and whatever it answers after that is dropped.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import error_response


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self.too_large()(scope, receive, send)  # no need to read a byte of it
            return
        received = 0
        answered = False  # the client has its answer: the app's is dropped
        started = False  # the app has begun its response: too late for a 413

        async def counting_receive() -> Message:
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    answered = True
                    if not started:
                        await self.too_large()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if not answered:
                started = True
                await send(message)

        await self.app(scope, counting_receive, guarded_send)

    def too_large(self) -> ASGIApp:
        message = f"the body is over {self.max_bytes} bytes (serve.max_request_bytes)"
        # The rest of the body is never read, so this connection cannot carry another request.
        return error_response(413, "request_too_large", message, {"Connection": "close"})
