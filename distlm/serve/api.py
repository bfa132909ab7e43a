"""The HTTP layer: FastAPI routes with OpenAI request/response shapes, auth, errors, SSE.

`build_api` is called once per replica (Ray Serve's late-bound ingress), so the API key and
the body limit come from that replica's config. Every refusal is an OpenAI-style error
body `{"error": {"message", "type", "param", "code"}}` with a 4xx status; FastAPI's 422s
become 400s.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from distlm.config import ServeConfig
from distlm.serve.model import GenerationRequest, SamplingParams, ServedModel, TokenEvent
from distlm.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    describe_validation_error,
    error_response,
)

# (request) -> async iterator of that request's TokenEvents; the deployment batches behind it.
Generate = Callable[[GenerationRequest], AsyncIterator[TokenEvent]]
OPEN_PATHS = ("/healthz",)


class BearerAuth:
    """401 unless `Authorization: Bearer <key>`, checked before the body is read; /healthz stays open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].rstrip("/").endswith(OPEN_PATHS):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(given, self.expected):
                message = "invalid API key" if given else "missing API key"
                response = error_response(
                    401, f"{message}: send the header 'Authorization: Bearer <key>'", code="invalid_api_key"
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over max_bytes: at once by Content-Length, else counted as it streams in.
    (FastAPI's own max_body_size answers in plain text; this keeps the OpenAI error body.)"""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        total = 0

        async def counted() -> Message:
            nonlocal total
            message = await receive()
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                raise HTTPException(413)  # raised inside FastAPI's body read: handled like any HTTP error
            return message

        await self.app(scope, counted, send)


def _too_large(max_bytes: int):
    return error_response(
        413, f"the request body is over this server's limit of {max_bytes} bytes", code="request_too_large"
    )


def build_api(
    model: ServedModel, generate: Generate, cfg: ServeConfig, api_key: Optional[str], replica: str
) -> FastAPI:
    export = model.export
    app = FastAPI(title="distlm")
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    if api_key:  # added last = runs first: no key, no body read
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return error_response(e.status, e.message, e.param, e.code, cfg.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        message, param = describe_validation_error(list(e.errors()))
        return error_response(400, message, param, "invalid_value" if param else "invalid_request")

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        if e.status_code == 413:
            return _too_large(cfg.max_body_bytes)
        if e.status_code == 400 and isinstance(e.__cause__, UnicodeDecodeError):
            bad = e.__cause__
            message = f"the request body is not valid UTF-8 (byte {bad.object[bad.start]:#04x} at position {bad.start})"
            return error_response(400, message, code="invalid_encoding")
        if e.status_code == 404:
            return error_response(404, f"no route {request.method} {request.url.path}", code="not_found")
        if e.status_code == 405:
            return error_response(
                405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"
            )
        return error_response(e.status_code, str(e.detail), retry_after_s=cfg.retry_after_s)

    @app.exception_handler(Exception)
    async def _bug(_, e: Exception):  # not the client's fault: say so in the same format (and Serve logs it)
        return error_response(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")

    def sampling(body, max_tokens: Optional[int], prompt_ids: List[int]) -> GenerationRequest:
        """The model/adapter and the token budget, checked against the context and the limits."""
        try:
            task = export.task_for(body.model)
        except KeyError:
            raise ApiError(
                404,
                f"the model '{body.model}' does not exist: available models are {', '.join(export.model_ids)}",
                "model",
                "model_not_found",
            ) from None
        n, context = len(prompt_ids), model.context_length
        if n == 0:
            raise ApiError(400, "the prompt is empty after tokenization: give some text", "prompt", "empty_prompt")
        if n >= context:
            raise ApiError(
                400,
                f"the prompt is {n} tokens but the model's context is {context} tokens (room for at least one new "
                "token is needed): shorten the prompt",
                "prompt",
                "context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(cfg.default_max_tokens, context - n)
        elif max_tokens > cfg.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens={max_tokens} is over this server's limit of {cfg.max_tokens_limit}",
                "max_tokens",
                "invalid_value",
            )
        elif n + max_tokens > context:
            raise ApiError(
                400,
                f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) is over the model's context of {context} "
                f"tokens: set max_tokens to at most {context - n} or shorten the prompt",
                "max_tokens",
                "context_length_exceeded",
            )
        params = SamplingParams(max_tokens, body.temperature, body.top_p, body.stop, body.seed)
        return GenerationRequest(prompt_ids, params, task)

    @app.get("/healthz")
    async def healthz() -> Dict[str, Any]:
        return {"status": "ok", "models": export.model_ids, "replica": replica}

    @app.get("/v1/models")
    async def models() -> Dict[str, Any]:
        created = int(time.time())
        data = [
            {"id": model_id, "object": "model", "created": created, "owned_by": "distlm", "root": export.name}
            | {"parent": None if model_id == export.name else export.name, "description": export.describe(model_id)}
            for model_id in export.model_ids
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        request = sampling(body, body.max_tokens, model.encode(body.prompt[0]))
        reply = _Reply("cmpl", "text_completion", body.model, len(request.prompt_ids))

        def choice(text: str, finish: Optional[str]) -> Dict[str, Any]:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if body.stream:
            return _sse(reply, generate(request), lambda e: choice(e.text, e.finish_reason), body.stream_options)
        events = [e async for e in generate(request)]
        return reply.final(choice("".join(e.text for e in events), events[-1].finish_reason), events)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        try:
            prompt_ids = model.encode_chat(messages)
        except ValueError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
        request = sampling(body, body.max_completion_tokens or body.max_tokens, prompt_ids)
        reply = _Reply("chatcmpl", "chat.completion", body.model, len(prompt_ids))
        first = True

        def delta(e: TokenEvent) -> Dict[str, Any]:
            nonlocal first
            content = {"role": "assistant", "content": e.text} if first else {"content": e.text}
            first = False
            return {"index": 0, "delta": content, "logprobs": None, "finish_reason": e.finish_reason}

        if body.stream:
            return _sse(reply, generate(request), delta, body.stream_options, "chat.completion.chunk")
        events = [e async for e in generate(request)]
        message = {"role": "assistant", "content": "".join(e.text for e in events)}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": events[-1].finish_reason}
        return reply.final(choice, events)

    return app


class _Reply:
    """Id, timestamps and usage shared by a response and its stream chunks."""

    def __init__(self, prefix: str, kind: str, model: str, prompt_tokens: int) -> None:
        self.id, self.kind, self.model = f"{prefix}-{uuid.uuid4().hex}", kind, model
        self.created, self.prompt_tokens = int(time.time()), prompt_tokens

    def usage(self, completion_tokens: int) -> Dict[str, int]:
        total = self.prompt_tokens + completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}

    def body(self, kind: str, choices: List[Dict[str, Any]], **extra: Any) -> Dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices} | extra

    def final(self, choice: Dict[str, Any], events: List[TokenEvent]) -> Dict[str, Any]:
        """The whole response; a routed request's carries the agent's trace in the extra field `agent`."""
        extra = {"agent": events[0].trace} if events[0].trace is not None else {}
        return self.body(self.kind, [choice], usage=self.usage(_completion_tokens(events)), **extra)


def _completion_tokens(events: List[TokenEvent]) -> int:
    return sum(e.token_id >= 0 for e in events)


def _sse(reply: _Reply, events: AsyncIterator[TokenEvent], choice, options, kind: Optional[str] = None):
    """Server-sent events: one `data: {chunk}` per new token, optionally a usage chunk, then `data: [DONE]`."""
    kind = kind or reply.kind

    async def stream() -> AsyncIterator[str]:
        count = 0
        async for event in events:
            count += event.token_id >= 0
            extra = {"agent": event.trace} if event.trace is not None else {}
            yield f"data: {json.dumps(reply.body(kind, [choice(event)], **extra))}\n\n"
        if options is not None and options.include_usage:
            yield f"data: {json.dumps(reply.body(kind, [], usage=reply.usage(count)))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
