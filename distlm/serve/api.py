"""The HTTP layer: FastAPI routes with OpenAI request/response shapes, auth, errors, SSE.

`build_api` is called once per replica (Ray Serve's late-bound ingress), so the API key and
the limits come from that replica's config. Every refusal is an OpenAI-style error body
`{"error": {"message", "type", "param", "code"}}`; FastAPI's 422s become 400s. A request that
fails inside the engine fails alone: a 500 with that body, or in a stream an error event and
then `data: [DONE]`. The OpenAPI document (/openapi.json) lists every status a route answers
with, the request, response and stream-chunk schemas and the bearer scheme.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple, Union

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from distlm.config import ServeConfig
from distlm.export import ExportInfo
from distlm.serve import responses
from distlm.serve.engines.base import (
    Engine,
    EngineError,
    GenerationRequest,
    ModelText,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from distlm.serve.grammar import Constraint, json_constraint
from distlm.serve.protocol import (
    ApiError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    Health,
    ModelList,
    NamedToolChoice,
    describe_validation_error,
    error_body,
    error_response,
)
from distlm.tools import ToolStream, call_grammar, parse_calls

OPEN_PATHS = ("/healthz",)


class BearerAuth:
    """401 unless `Authorization: Bearer <key>` (the scheme in any case), checked before the body is
    read; /healthz and the OpenAPI document stay open."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Tuple[str, ...] = OPEN_PATHS) -> None:
        self.app, self.expected, self.open_paths = app, api_key.encode(), open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].rstrip("/").endswith(self.open_paths):
            given = Headers(scope=scope).get("authorization", "")
            scheme, _, key = given.strip().partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.expected):
                message = "invalid API key" if given else "missing API key"
                response = error_response(
                    401,
                    f"{message}: send the header 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
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


@dataclass
class _Choice:
    """One choice of a response: which prompt, and what to ask the engine (None: nothing to generate)."""

    index: int
    prompt: int  # index into the request's prompts
    request: Optional[GenerationRequest]


class _Reply:
    """Id, timestamps and usage shared by a response and its stream chunks."""

    def __init__(self, prefix: str, kind: str, model: str, prompt_tokens: int) -> None:
        self.id, self.kind, self.model = f"{prefix}-{uuid.uuid4().hex}", kind, model
        self.created, self.prompt_tokens = int(time.time()), prompt_tokens

    def usage(self, completion_tokens: int) -> Dict[str, int]:
        total = self.prompt_tokens + completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}

    def body(
        self,
        kind: str,
        choices: List[Dict[str, Any]],
        usage: Optional[Dict[str, int]] = None,
        agent: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, Any]:
        """`agent` (an extra field): how the agent routed the request, on the response or the first chunk."""
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        return out | {"usage": usage} | ({"agent": agent} if agent is not None else {})


def _first_trace(events: Dict[int, List[TokenEvent]]) -> Optional[Dict[str, Any]]:
    return next((e.trace for got in events.values() for e in got if e.trace is not None), None)


async def _merged(engine: Engine, choices: List[_Choice]) -> AsyncIterator[Tuple[_Choice, Optional[TokenEvent]]]:
    """The events of all choices as they come; (choice, None) once for a choice with nothing to
    generate. A failing choice raises here; leaving early cancels the others in the engine."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(choice: _Choice) -> None:
        try:
            if choice.request is None:
                await queue.put((choice, None))
            else:
                async for event in engine.generate(choice.request):
                    await queue.put((choice, event))
            await queue.put((choice, done))
        except Exception as e:  # noqa: BLE001 (handed to the reader, which raises it)
            await queue.put((choice, e))

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        remaining = len(choices)
        while remaining:
            choice, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield choice, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _engine_failure(e: Exception) -> ApiError:
    return ApiError(500, f"the engine failed on this request: {e}", None, "engine_error")


def _sse(chunks: AsyncIterator[Dict[str, Any]]) -> StreamingResponse:
    """Server-sent events: `data: {chunk}` each, then `data: [DONE]`; a failure mid-stream becomes
    an error event (the status is already 200) and the stream still ends with [DONE]."""

    async def stream() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as e:
            if isinstance(e, EngineError):
                error = error_body(500, f"the engine failed on this request: {e}", None, "engine_error")
            else:
                error = error_body(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error")
            yield f"data: {json.dumps(error)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------- log-probabilities in OpenAI shapes


def _completion_logprobs(
    text: ModelText, positions: List[Tuple[int, Optional[TokenLogprob]]], offset: int
) -> Dict[str, Any]:
    """The legacy completions shape for (token id, its log-probabilities or None) pairs; text
    offsets count from `offset`."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, lp in positions:
        tokens.append(text.token_string(token_id))
        offsets.append(offset)
        offset += len(text.token_piece(token_id))
        if lp is None:
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(lp.logprob)
        top = {text.token_string(t): v for t, v in lp.top}
        top.setdefault(text.token_string(lp.token_id), lp.logprob)  # the chosen token too, as vLLM does
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprob(text: ModelText, lp: TokenLogprob) -> Dict[str, Any]:
    def entry(token_id: int, logprob: float) -> Dict[str, Any]:
        return {"token": text.token_string(token_id), "logprob": logprob, "bytes": list(text.token_bytes(token_id))}

    return entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}


# ---------------------------------------------------------------- the OpenAPI document


def _error_doc(description: str) -> Dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


def _sse_event_schema(chunk: str, description: str, done: bool = True) -> Dict[str, Any]:
    """One server-sent event (OpenAPI 3.1 describes a stream's events one at a time). `done`: the
    stream ends with `data: [DONE]` (completions); else each event is named (`event:`, responses)."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
    if not done:
        event = {"type": "string", "description": "the event's type, as in its data"}
        data = {"description": "the event", "type": "string", "contentMediaType": "application/json"}
        data["contentSchema"] = {"$ref": f"#/components/schemas/{chunk}"}
        properties = {"event": event, "data": data}
        return {"type": "object", "description": description, "required": ["event", "data"], "properties": properties}
    data = {
        "description": "a JSON chunk, or an error body if the request fails; the last event is [DONE]",
        "anyOf": [{"const": "[DONE]"}, json_data],
    }
    return {"type": "object", "description": description, "required": ["data"], "properties": {"data": data}}


def _post_responses(
    auth: bool, ok_model, chunk_model, chunk_doc: str, done: bool = True
) -> Dict[Union[int, str], Dict[str, Any]]:
    responses: Dict[Union[int, str], Dict[str, Any]] = {
        200: {
            "model": ok_model,
            "description": "the completion; with stream=true a text/event-stream instead",
            "content": {"text/event-stream": {"schema": _sse_event_schema(chunk_model.__name__, chunk_doc, done)}},
        },
        400: _error_doc(
            "invalid request: the error names the parameter (bad JSON or UTF-8, a wrong type, a value "
            "out of range, an unknown field, a prompt over the model's context, over the server's limits)"
        ),
        404: _error_doc("no such model (see GET /v1/models)"),
        413: _error_doc("the request body is over serve.max_body_bytes"),
        500: _error_doc("the engine failed on this request (other requests are not affected)"),
        503: {
            "model": ErrorResponse,
            "description": "overloaded: the server's queue is full (429 if serve.overload_status=429); see Retry-After",
            "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}},
        },
    }
    if auth:
        responses[401] = _error_doc("missing or wrong API key (Authorization: Bearer <key>)")
    return responses


def _patch_openapi(app: FastAPI, model_ids: List[str], auth: bool, cfg: ServeConfig) -> None:
    """FastAPI's document, made true: 400 instead of the 422 FastAPI never sends here, the model
    ids as an enum, this server's limits, the bearer scheme on /v1/*."""
    build = app.openapi

    def openapi() -> Dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = build()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        # Stream chunks are named by the routes' event-stream schemas only: add them.
        for model in (Completion, ChatCompletionChunk, responses.ResponseEvent):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in schema.pop("$defs", {}).items():
                schemas.setdefault(name, sub)
            schemas.setdefault(model.__name__, schema)
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        for name in ("CompletionRequest", "ChatCompletionRequest", "ResponsesRequest"):
            fields = schemas.get(name, {}).get("properties", {})
            if fields:
                fields["model"]["enum"] = list(model_ids)
                if "n" in fields:
                    fields["n"]["maximum"] = min(fields["n"].get("maximum", cfg.max_choices), cfg.max_choices)
                for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
                    for option in fields.get(key, {}).get("anyOf", []):
                        if option.get("type") == "integer":
                            option["maximum"] = cfg.max_tokens_limit
        if auth:
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, ops in doc.get("paths", {}).items():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
                if auth and path.startswith("/v1/"):
                    op["security"] = [{"bearer": []}]
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


# ---------------------------------------------------------------- the app


def _install_error_handlers(app: FastAPI, cfg: ServeConfig) -> None:
    """OpenAI-style error bodies for every refusal: ours, FastAPI's validation (400, not 422),
    Starlette's (404, 405 with Allow, 413, bad UTF-8) and any bug (500)."""

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
            allow = (e.headers or {}).get("Allow", "")
            return error_response(
                405,
                f"{request.method} is not allowed on {request.url.path}" + (f": use {allow}" if allow else ""),
                code="method_not_allowed",
                headers={"Allow": allow} if allow else None,
            )
        return error_response(e.status_code, str(e.detail), retry_after_s=cfg.retry_after_s, headers=e.headers)

    @app.exception_handler(Exception)
    async def _bug(_, e: Exception):  # not the client's fault: say so in the same format (and Serve logs it)
        return error_response(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")


class _Checks:
    """What the generation routes check before the engine sees a request: the model exists, the
    prompt and max_tokens fit the context and the server's limits, token ids are in the vocabulary,
    the number of choices is within serve.max_choices."""

    def __init__(self, export: ExportInfo, cfg: ServeConfig, text: ModelText) -> None:
        self.export, self.cfg, self.text = export, cfg, text

    def adapter_for(self, model: str) -> Optional[str]:
        try:
            return self.export.task_for(model)
        except KeyError:
            raise ApiError(
                404,
                f"the model '{model}' does not exist: available models are {', '.join(self.export.model_ids)}",
                "model",
                "model_not_found",
            ) from None

    def budget(self, n: int, max_tokens: Optional[int], scoring: bool) -> int:
        """max_tokens for a prompt of n tokens, checked against the context and the server's limit."""
        context = self.text.context_length
        if n == 0:
            raise ApiError(400, "the prompt is empty after tokenization: give some text", "prompt", "empty_prompt")
        if n > context or (n == context and not scoring):
            raise ApiError(
                400,
                f"the prompt is {n} tokens but the model's context is {context} tokens (room for at least one new "
                "token is needed): shorten the prompt",
                "prompt",
                "context_length_exceeded",
            )
        if max_tokens is None:
            return min(self.cfg.default_max_tokens, context - n)
        if max_tokens > self.cfg.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens={max_tokens} is over this server's limit of {self.cfg.max_tokens_limit}",
                "max_tokens",
                "invalid_value",
            )
        if n + max_tokens > context:
            raise ApiError(
                400,
                f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) is over the model's context of {context} "
                f"tokens: set max_tokens to at most {context - n} or shorten the prompt",
                "max_tokens",
                "context_length_exceeded",
            )
        return max_tokens

    def check_ids(self, ids: List[int], param: str) -> None:
        bad = next((i for i in ids if i >= self.text.vocab_size), None)
        if bad is not None:
            raise ApiError(
                400,
                f"token id {bad} is not in the model's vocabulary (ids 0 to {self.text.vocab_size - 1})",
                param,
                "invalid_value",
            )

    def constraint(self, body, tools: Optional[List[Dict[str, Any]]] = None) -> Optional[Constraint]:
        """The grammar a request's output must match: its response_format, or a forced tool call."""
        fmt = body.response_format
        choice = getattr(body, "tool_choice", None)
        forced = choice == "required" or isinstance(choice, NamedToolChoice)
        if choice is not None and not tools:
            raise ApiError(
                400, "tool_choice needs tools: send the tools the model may call", "tool_choice", "invalid_value"
            )
        if forced and fmt is not None and fmt.type != "text":
            raise ApiError(
                400,
                f"response_format={fmt.type} and a forced tool call cannot both constrain the output: drop one",
                "response_format",
                "invalid_value",
            )
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t["function"]["name"] for t in tools}:
            raise ApiError(
                400,
                f"tool_choice names the function '{choice.function.name}', which is not among the tools "
                f"({', '.join(t['function']['name'] for t in tools)})",
                "tool_choice",
                "invalid_value",
            )
        if forced:
            name = choice.function.name if isinstance(choice, NamedToolChoice) else None
            parallel = getattr(body, "parallel_tool_calls", None) is not False
            constraint = Constraint(call_grammar(tools, name, parallel), "tool_choice")
            param = "tools"
        elif fmt is None or fmt.type == "text":
            return None
        elif fmt.type == "json_object":
            constraint, param = json_constraint({"type": "object"}), "response_format"
        else:
            constraint, param = json_constraint(fmt.json_schema.schema_), "response_format.json_schema.schema"
        if body.ignore_eos:
            raise ApiError(
                400, f"ignore_eos cannot go with {constraint.what}: the grammar ends the output", "ignore_eos"
            )
        error = self.text.grammars.check(constraint)
        if error:
            raise ApiError(
                400, f"the JSON schema cannot be used to constrain the output: {error}", param, "invalid_schema"
            )
        return constraint

    def choices_for(
        self, body, prompts: List[List[int]], max_tokens: Optional[int], params: Dict[str, Any]
    ) -> List[_Choice]:
        if len(prompts) * body.n > self.cfg.max_choices:
            raise ApiError(
                400,
                f"{len(prompts)} prompt(s) x n={body.n} is {len(prompts) * body.n} choices, over this server's limit "
                f"of {self.cfg.max_choices}: send fewer prompts or a smaller n",
                "n",
                "invalid_value",
            )
        self.check_ids(list(body.stop_token_ids or []), "stop_token_ids")
        self.check_ids(list(body.bias), "logit_bias")
        adapter = self.adapter_for(body.model)
        scoring = max_tokens == 0
        budgets = [self.budget(len(ids), max_tokens, scoring) for ids in prompts]
        choices = []
        for p, (ids, tokens) in enumerate(zip(prompts, budgets)):
            for j in range(body.n):
                sampling = SamplingParams(
                    max_tokens=tokens,
                    temperature=body.temperature,
                    top_p=body.top_p,
                    stop=body.stops,
                    seed=None if body.seed is None else body.seed + j,  # n seeded choices differ, reproducibly
                    stop_token_ids=list(body.stop_token_ids or []),
                    ignore_eos=body.ignore_eos,
                    presence_penalty=body.presence_penalty,
                    frequency_penalty=body.frequency_penalty,
                    logit_bias=body.bias,
                    **params,
                )
                needed = tokens > 0 or sampling.prompt_logprobs is not None
                request = GenerationRequest(ids, sampling, adapter) if needed else None
                choices.append(_Choice(len(choices), p, request))
        return choices


async def _completions(body: CompletionRequest, engine: Engine, checks: _Checks):
    """POST /v1/completions: one choice per prompt and n; streamed, or whole with usage."""
    text = engine.text
    prompts, prompt_texts = [], []
    for p in body.prompts:
        if isinstance(p, str):
            prompts.append(text.encode(p))
            prompt_texts.append(p)
        else:
            checks.check_ids(p, "prompt")
            prompts.append(p)
            prompt_texts.append(text.decode(p) if body.echo else "")
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(
            400,
            "max_tokens=0 generates nothing: set echo=true to score the prompt, or max_tokens >= 1",
            "max_tokens",
            "invalid_value",
        )
    params = {"logprobs": body.logprobs, "prompt_logprobs": body.logprobs if body.echo else None}
    params["constraint"] = checks.constraint(body)
    choices = checks.choices_for(body, prompts, body.max_tokens, params)
    reply = _Reply("cmpl", "text_completion", body.model, sum(len(p) for p in prompts))
    want_logprobs = body.logprobs is not None

    def prompt_part(choice: _Choice, event: Optional[TokenEvent]) -> Tuple[str, List[Tuple[int, Any]]]:
        """The echoed prompt's text and (token, logprob) positions."""
        if not body.echo:
            return "", []
        ids = prompts[choice.prompt]
        lps = (event.prompt_logprobs if event is not None else None) or [None] * len(ids)
        return prompt_texts[choice.prompt], list(zip(ids, lps))

    if body.stream:

        async def chunks() -> AsyncIterator[Dict[str, Any]]:
            offsets = {c.index: 0 for c in choices}  # characters of each choice's text so far
            started: set = set()
            count = 0
            async for choice, event in _merged(engine, choices):
                delta, parts = "", []
                if choice.index not in started:
                    started.add(choice.index)
                    prompt_text, positions = prompt_part(choice, event)
                    parts.append(_completion_logprobs(text, positions, offsets[choice.index]))
                    delta, offsets[choice.index] = prompt_text, offsets[choice.index] + len(prompt_text)
                if event is not None and event.token_id is not None:
                    count += 1
                    parts.append(_completion_logprobs(text, [(event.token_id, event.logprob)], offsets[choice.index]))
                if event is not None:  # a token's text, or a classification task's label (no token)
                    delta, offsets[choice.index] = delta + event.text, offsets[choice.index] + len(event.text)
                finish = "length" if event is None else event.finish_reason
                logprobs = None
                if want_logprobs:
                    logprobs = {k: [x for part in parts for x in part[k]] for k in parts[0]}
                out = {"index": choice.index, "text": delta, "logprobs": logprobs, "finish_reason": finish}
                yield reply.body("text_completion", [out], agent=event.trace if event is not None else None)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield reply.body("text_completion", [], reply.usage(count))

        return _sse(chunks())

    events: Dict[int, List[TokenEvent]] = {c.index: [] for c in choices}
    try:
        async for choice, event in _merged(engine, choices):
            if event is not None:
                events[choice.index].append(event)
    except EngineError as e:
        raise _engine_failure(e) from None
    out, count = [], 0
    for choice in choices:
        got = events[choice.index]
        generated = [e for e in got if e.token_id is not None]
        count += len(generated)
        prompt_text, prompt_positions = prompt_part(choice, got[0] if got else None)
        completion = "".join(e.text for e in got)  # tokens' text, or a classification task's label
        logprobs = None
        if want_logprobs:
            positions = prompt_positions + [(e.token_id, e.logprob) for e in generated]
            logprobs = _completion_logprobs(text, positions, 0)
            # Generated tokens count from the end of the echoed prompt's text.
            shift = len(prompt_text) - sum(len(text.token_piece(t)) for t, _ in prompt_positions)
            logprobs["text_offset"] = [
                o + (shift if i >= len(prompt_positions) else 0) for i, o in enumerate(logprobs["text_offset"])
            ]
        finish = got[-1].finish_reason if got else "length"
        out.append(
            {"index": choice.index, "text": prompt_text + completion, "logprobs": logprobs, "finish_reason": finish}
        )
    return reply.body("text_completion", out, reply.usage(count), agent=_first_trace(events))


async def _chat_completions(body: ChatCompletionRequest, engine: Engine, checks: _Checks, chunked: bool = False):
    """POST /v1/chat/completions: the chat template's prompt (with the tools), n choices; streamed,
    or whole with usage. With tools (and tool_choice other than none) the model's call blocks
    become `tool_calls` (distlm/tools.py) and the choice finishes with "tool_calls". `chunked`: a
    stream's chunks as an iterator, not yet server-sent events (for /v1/responses)."""
    text = engine.text
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    try:
        prompt_ids = text.encode_chat([m.template_dict() for m in body.messages], tools)
    except ValueError as e:
        raise ApiError(400, str(e), "messages", "invalid_value") from None
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs", "invalid_value")
    params = {"logprobs": (body.top_logprobs or 0) if body.logprobs else None}
    params["constraint"] = checks.constraint(body, tools)
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        checks.budget(len(prompt_ids), body.max_tokens, False)  # both are checked; max_completion_tokens counts
    choices = checks.choices_for(body, [prompt_ids], body.max_completion_tokens or body.max_tokens, params)
    reply = _Reply("chatcmpl", "chat.completion", body.model, len(prompt_ids))
    names = [t["function"]["name"] for t in tools] if tools and body.tool_choice != "none" else []

    def finish_reason(finish: Optional[str], called: bool) -> Optional[str]:
        return "tool_calls" if called and finish == "stop" else finish

    if body.stream:

        async def chunks() -> AsyncIterator[Dict[str, Any]]:
            started: set = set()
            streams = {c.index: ToolStream(names) for c in choices}
            called = {c.index: 0 for c in choices}
            count = 0
            async for choice, event in _merged(engine, choices):
                count += event.token_id is not None
                content, calls = streams[choice.index].feed(event.text) if names else (event.text, [])
                if event.finish_reason is not None and names:
                    content += streams[choice.index].finish()
                delta: Dict[str, Any] = {"content": content}
                if calls:
                    first = called[choice.index]
                    delta["tool_calls"] = [c.openai(first + i) for i, c in enumerate(calls)]
                    called[choice.index] += len(calls)
                if choice.index not in started:
                    started.add(choice.index)
                    delta = {"role": "assistant"} | delta
                logprobs = None
                if body.logprobs:
                    token = [event] if event.token_id is not None else []  # a label has no token
                    logprobs = {"content": [_chat_logprob(text, e.logprob) for e in token]}
                out = {"index": choice.index, "delta": delta, "logprobs": logprobs}
                finish = {"finish_reason": finish_reason(event.finish_reason, called[choice.index] > 0)}
                yield reply.body("chat.completion.chunk", [out | finish], agent=event.trace)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield reply.body("chat.completion.chunk", [], reply.usage(count))

        return chunks() if chunked else _sse(chunks())

    events: Dict[int, List[TokenEvent]] = {c.index: [] for c in choices}
    try:
        async for choice, event in _merged(engine, choices):
            events[choice.index].append(event)
    except EngineError as e:
        raise _engine_failure(e) from None
    out = []
    for choice in choices:
        got = events[choice.index]
        content: Optional[str] = "".join(e.text for e in got)
        message: Dict[str, Any] = {"role": "assistant", "content": content}
        calls = []
        if names:
            message["content"], calls = parse_calls(content, names)
            if calls:
                message["tool_calls"] = [c.openai() for c in calls]
        tokens = [e for e in got if e.token_id is not None]  # a classification task's label has none
        logprobs = {"content": [_chat_logprob(text, e.logprob) for e in tokens]} if body.logprobs else None
        out.append(
            {
                "index": choice.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish_reason(got[-1].finish_reason, bool(calls)),
            }
        )
    count = sum(e.token_id is not None for v in events.values() for e in v)
    return reply.body("chat.completion", out, reply.usage(count), agent=_first_trace(events))


def build_api(engine: Engine, export: ExportInfo, cfg: ServeConfig, api_key: Optional[str], replica: str) -> FastAPI:
    app = FastAPI(
        title="distlm",
        description="OpenAI-style completions, chat completions and responses for a distlm run's export and its task "
        "adapters.",
        version="1",
    )
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    if api_key:  # added last = runs first: no key, no body read
        app.add_middleware(BearerAuth, api_key=api_key, open_paths=(*OPEN_PATHS, "/openapi.json", "/docs"))
    _patch_openapi(app, export.model_ids, bool(api_key), cfg)
    stream_doc = 'one `data: <{}>` event per new token, `data: {{"error": ...}}` if it fails, then `data: [DONE]`'

    _install_error_handlers(app, cfg)
    checks = _Checks(export, cfg, engine.text)

    @app.get("/healthz", response_model=Health, tags=["server"])
    async def healthz() -> Dict[str, Any]:
        return {"status": "ok", "models": export.model_ids, "replica": replica, "engine": engine.name}

    @app.get(
        "/v1/models",
        response_model=ModelList,
        tags=["openai"],
        responses={401: _error_doc("missing or wrong API key")} if api_key else {},
    )
    async def models() -> Dict[str, Any]:
        created = int(time.time())
        data = [
            {"id": model_id, "object": "model", "created": created, "owned_by": "distlm", "root": export.name}
            | {"parent": None if model_id == export.name else export.name, "description": export.describe(model_id)}
            for model_id in export.model_ids
        ]
        return {"object": "list", "data": data}

    @app.post(
        "/v1/completions",
        response_model=None,
        tags=["openai"],
        responses=_post_responses(bool(api_key), Completion, Completion, stream_doc.format("Completion")),
    )
    async def completions(body: CompletionRequest):
        return await _completions(body, engine, checks)

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        tags=["openai"],
        responses=_post_responses(
            bool(api_key), ChatCompletion, ChatCompletionChunk, stream_doc.format("ChatCompletionChunk")
        ),
    )
    async def chat_completions(body: ChatCompletionRequest):
        return await _chat_completions(body, engine, checks)

    @app.post(
        "/v1/responses",
        response_model=None,
        tags=["openai"],
        responses=_post_responses(
            bool(api_key),
            responses.ResponseObject,
            responses.ResponseEvent,
            "`event: <type>` and `data: <ResponseEvent>` per event, from response.created to response.completed "
            "(or response.incomplete); an `error` event if it fails",
            done=False,
        ),
    )
    async def create_response(body: responses.ResponsesRequest):
        """OpenAI's Responses API: text, function tools and structured output, as a chat completion."""
        chat = responses.to_chat(body)
        if body.stream:
            return responses.sse(responses.events(body, await _chat_completions(chat, engine, checks, chunked=True)))
        return responses.from_chat(body, await _chat_completions(chat, engine, checks))

    return app


__all__ = ["build_api", "BearerAuth", "BodyLimit"]
