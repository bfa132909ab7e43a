"""JSON error bodies for the answers Ray Serve's HTTP proxy gives itself (the overload 503/429
with Retry-After, timeouts, an application that is not running), which it sends as plain text.

Ray builds each proxy's middlewares from the function named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH;
`distlm serve` sets it to `distlm.serve.proxy:middlewares` before it starts Ray. On a cluster
started otherwise (KubeRay, `ray start`), set that variable in the environment of every Ray
node for the same bodies.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import List

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from distlm.serve.protocol import error_body

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "distlm.serve.proxy:middlewares"
CODES = {408: "timeout", 429: "overloaded", 503: "overloaded", 404: "not_found", 500: "internal_error"}


class JsonErrors:
    """Rewrites an error response that is not JSON into the OpenAI error body, keeping its status
    and headers (Retry-After). Responses from distlm's own routes are JSON already and pass as they are."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message = {}
        body: List[bytes] = []

        async def rewrite(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                kind = Headers(raw=message.get("headers", [])).get("content-type", "")
                if message["status"] >= 400 and not kind.startswith(("application/json", "text/event-stream")):
                    start = message
                    return
            elif start and message["type"] == "http.response.body":
                body.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                status = start["status"]
                text = b"".join(body).decode("utf-8", "replace").strip() or HTTPStatus(status).phrase
                if status in (429, 503):
                    text = f"the server is overloaded, retry later: {text}"
                payload = json.dumps(error_body(status, text, None, CODES.get(status))).encode()
                headers = [
                    (k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")
                ]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": payload})
                return
            await send(message)

        await self.app(scope, receive, rewrite)


def middlewares() -> list:
    from starlette.middleware import Middleware

    return [Middleware(JsonErrors)]
