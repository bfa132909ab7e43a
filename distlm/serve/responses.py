"""POST /v1/responses: OpenAI's Responses API (what current agent SDKs call by default) for text,
function tools and structured output, streamed or whole.

A request becomes a chat completion (instructions -> a system message; input messages,
`function_call` and `function_call_output` items -> assistant tool calls and tool messages;
`text.format` -> response_format; max_output_tokens -> max_tokens), so it is checked,
rendered, constrained and parsed exactly as /v1/chat/completions does it. The answer comes
back as Response output items (a message with output_text, one function_call per call) or,
streamed, as Response events (`event: <type>` + `data: {...}` each, sequence-numbered).
Nothing is stored: previous_response_id is refused with the fix (send the whole conversation).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import StreamingResponse
from typing_extensions import Annotated

from distlm.serve.engines import EngineError
from distlm.serve.protocol import (
    AgentTrace,
    ApiError,
    ChatCompletionRequest,
    FunctionDef,
    JsonSchemaFormat,
    NamedFunction,
    NonEmpty,
    ResponseFormatJsonObject,
    ResponseFormatText,
    _Request,
    describe_validation_error,
    error_body,
)

# ---------------------------------------------------------------- the request


class InputText(_Request):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: Optional[List[Any]] = None  # on output_text sent back by a client


class InputMessage(_Request):
    type: Optional[Literal["message"]] = None
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, List[InputText]]
    id: Optional[str] = None
    status: Optional[str] = None


class FunctionCallItem(_Request):
    type: Literal["function_call"]
    call_id: NonEmpty
    name: NonEmpty
    arguments: str = Field(description="the arguments as a JSON object's text")
    id: Optional[str] = None
    status: Optional[str] = None


class FunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    call_id: NonEmpty
    output: str
    id: Optional[str] = None
    status: Optional[str] = None


InputItem = Union[InputMessage, FunctionCallItem, FunctionCallOutputItem]


# The flat shapes of the Responses API: the chat's function, name and schema with a `type` beside them.
class FunctionTool(FunctionDef):
    type: Literal["function"]


class NamedFunctionChoice(NamedFunction):
    type: Literal["function"]


class TextFormatJsonSchema(JsonSchemaFormat):
    type: Literal["json_schema"]


class TextConfig(_Request):
    format: Optional[
        Annotated[
            Union[ResponseFormatText, ResponseFormatJsonObject, TextFormatJsonSchema], Field(discriminator="type")
        ]
    ] = None


class ResponsesRequest(_Request):
    model: str = Field(description="the run's name (the agent, or its base model), or '<run>:<task>'")
    input: Union[NonEmpty, Annotated[List[InputItem], Field(min_length=1)]] = Field(
        description="the user's text, or the conversation: messages, function_call and function_call_output items"
    )
    instructions: Optional[str] = Field(None, description="a system message before the input")
    tools: Optional[Annotated[List[FunctionTool], Field(max_length=128)]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedFunctionChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    stream: bool = False
    text: Optional[TextConfig] = None
    store: Optional[bool] = Field(None, description="accepted; nothing is stored")
    previous_response_id: Optional[str] = Field(None, description="refused: nothing is stored")
    metadata: Optional[Dict[str, str]] = None
    user: Optional[str] = None


# ---------------------------------------------------------------- the response (for the OpenAPI document)


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: List[Any]


class OutputMessage(BaseModel):
    type: Literal["message"]
    id: str
    status: Literal["completed", "incomplete"]
    role: Literal["assistant"]
    content: List[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["completed"]


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress"]
    model: str
    output: List[Union[OutputMessage, OutputFunctionCall]]
    usage: Optional[ResponseUsage] = Field(description="null until the response is complete")
    incomplete_details: Optional[IncompleteDetails]
    error: None
    instructions: Optional[str]
    tools: List[Dict[str, Any]]
    tool_choice: Union[str, Dict[str, Any]]
    parallel_tool_calls: bool
    temperature: Optional[float]
    top_p: Optional[float]
    max_output_tokens: Optional[int]
    text: Dict[str, Any]
    metadata: Dict[str, str]
    previous_response_id: None
    store: bool
    agent: Optional[AgentTrace] = Field(None, description="how the agent routed the request (model '<run>' only)")


class ResponseEvent(BaseModel):
    """One streamed event: response.created, response.output_item.added, response.output_text.delta,
    response.function_call_arguments.done, ..., response.completed (or error)."""

    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int


# ---------------------------------------------------------------- the handler


def to_chat(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion this request is (its checks, rendering and constraints are the chat's)."""
    if body.previous_response_id is not None:
        raise ApiError(
            400,
            "this server stores no responses: send the whole conversation in input (previous_response_id is not "
            "supported)",
            "previous_response_id",
            "unsupported_parameter",
        )
    messages: List[Dict[str, Any]] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    items = [InputMessage(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    for item in items:
        if isinstance(item, InputMessage):
            content = item.content if isinstance(item.content, str) else "".join(p.text for p in item.content)
            messages.append({"role": item.role, "content": content})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and last["content"] is None:
                last["tool_calls"].append(call)  # consecutive calls are one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    chat: Dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream}
    if body.stream:
        chat["stream_options"] = {"include_usage": True}
    if body.tools:
        chat["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)} for t in body.tools
        ]
    if isinstance(body.tool_choice, NamedFunctionChoice):
        chat["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    elif body.tool_choice is not None:
        chat["tool_choice"] = body.tool_choice
    fmt = body.text.format if body.text is not None else None
    if isinstance(fmt, TextFormatJsonSchema):
        schema = fmt.model_dump(by_alias=True, exclude={"type"}, exclude_none=True)
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt is not None:
        chat["response_format"] = {"type": fmt.type}
    fields = {"parallel_tool_calls": body.parallel_tool_calls, "max_tokens": body.max_output_tokens}
    fields |= {"temperature": body.temperature, "top_p": body.top_p, "user": body.user}
    chat |= {k: v for k, v in fields.items() if v is not None}
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as e:
        message, param = describe_validation_error(list(e.errors()))
        raise ApiError(400, message, "input" if param and param.startswith("messages") else param) from None


class _Response:
    """The Response object of one request, built up as its output comes."""

    def __init__(self, body: ResponsesRequest) -> None:
        self.body, self.id, self.created = body, f"resp_{uuid.uuid4().hex}", int(time.time())
        self.output: List[Dict[str, Any]] = []
        self.usage: Optional[Dict[str, int]] = None
        self.agent: Optional[Dict[str, Any]] = None
        self.status, self.incomplete = "in_progress", None

    def finish(self, finish_reason: Optional[str], usage: Optional[Dict[str, int]]) -> None:
        self.status = "incomplete" if finish_reason == "length" else "completed"
        self.incomplete = {"reason": "max_output_tokens"} if finish_reason == "length" else None
        if usage is not None:
            prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
            self.usage = {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion}
        for item in self.output:
            if item["type"] == "message":
                item["status"] = self.status

    def json(self) -> Dict[str, Any]:
        b = self.body
        fmt = b.text.format.model_dump(by_alias=True) if b.text is not None and b.text.format else {"type": "text"}
        choice = b.tool_choice.model_dump() if isinstance(b.tool_choice, BaseModel) else (b.tool_choice or "auto")
        out = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": self.status,
            "model": b.model,
            "output": self.output,
            "usage": self.usage,
            "incomplete_details": self.incomplete,
            "error": None,
            "instructions": b.instructions,
            "tools": [t.model_dump(exclude_none=True) for t in b.tools or []],
            "tool_choice": choice,
            "parallel_tool_calls": b.parallel_tool_calls if b.parallel_tool_calls is not None else True,
            "temperature": b.temperature,
            "top_p": b.top_p,
            "max_output_tokens": b.max_output_tokens,
            "text": {"format": fmt},
            "metadata": b.metadata or {},
            "previous_response_id": None,
            "store": False,
        }
        return out | ({"agent": self.agent} if self.agent is not None else {})


def _message(text: str) -> Dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}]
    return {
        "type": "message",
        "id": f"msg_{uuid.uuid4().hex}",
        "status": "completed",
        "role": "assistant",
        "content": content,
    }


def _function_call(call: Dict[str, Any]) -> Dict[str, Any]:
    fn, item = call["function"], {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"]}
    return item | {"name": fn["name"], "arguments": fn["arguments"], "status": "completed"}


def from_chat(body: ResponsesRequest, completion: Dict[str, Any]) -> Dict[str, Any]:
    """A whole chat completion as the Response object."""
    response = _Response(body)
    (choice,) = completion["choices"]
    message = choice["message"]
    if message["content"] is not None or not message.get("tool_calls"):
        response.output.append(_message(message["content"] or ""))
    response.output += [_function_call(c) for c in message.get("tool_calls") or []]
    response.agent = completion.get("agent")
    response.finish(choice["finish_reason"], completion["usage"])
    return response.json()


async def events(body: ResponsesRequest, chunks: AsyncIterator[Dict[str, Any]]) -> AsyncIterator[Dict[str, Any]]:
    """Chat completion chunks as Response stream events."""
    response = _Response(body)
    number = 0

    def event(kind: str, **fields: Any) -> Dict[str, Any]:
        nonlocal number
        number += 1
        return {"type": kind, "sequence_number": number - 1, **fields}

    yield event("response.created", response=response.json())
    yield event("response.in_progress", response=response.json())
    message: Optional[Dict[str, Any]] = None  # the message item being streamed

    def close_message():
        text = message["content"][0]["text"]
        where = {"item_id": message["id"], "output_index": len(response.output) - 1}
        yield event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
        yield event("response.content_part.done", **where, content_index=0, part=message["content"][0])
        yield event("response.output_item.done", output_index=where["output_index"], item=message)

    finish = None
    async for chunk in chunks:
        if chunk.get("agent") is not None and response.agent is None:
            response.agent = chunk["agent"]
        if not chunk["choices"]:  # the last chunk: usage only
            response.finish(finish, chunk["usage"])
            continue
        (choice,) = chunk["choices"]
        delta = choice["delta"]
        if delta.get("content"):
            if message is None:
                message = _message("") | {"status": "in_progress"}
                response.output.append(message)
                index = len(response.output) - 1
                yield event("response.output_item.added", output_index=index, item=json.loads(json.dumps(message)))
                part = {"type": "output_text", "text": "", "annotations": []}
                yield event(
                    "response.content_part.added", item_id=message["id"], output_index=index, content_index=0, part=part
                )
            message["content"][0]["text"] += delta["content"]
            where = {"item_id": message["id"], "output_index": len(response.output) - 1, "content_index": 0}
            yield event("response.output_text.delta", **where, delta=delta["content"], logprobs=[])
        for call in delta.get("tool_calls") or []:
            if message is not None:
                message["status"] = "completed"
                for e in close_message():
                    yield e
                message = None
            item = _function_call(call)
            response.output.append(item)
            index = len(response.output) - 1
            yield event(
                "response.output_item.added", output_index=index, item=item | {"arguments": "", "status": "in_progress"}
            )
            where = {"item_id": item["id"], "output_index": index}
            yield event("response.function_call_arguments.delta", **where, delta=item["arguments"])
            yield event(
                "response.function_call_arguments.done", **where, name=item["name"], arguments=item["arguments"]
            )
            yield event("response.output_item.done", output_index=index, item=item)
        finish = choice["finish_reason"] or finish
    if message is not None:
        message["status"] = "incomplete" if finish == "length" else "completed"
        for e in close_message():
            yield e
    done = "response.incomplete" if response.status == "incomplete" else "response.completed"
    yield event(done, response=response.json())


def sse(stream: AsyncIterator[Dict[str, Any]]) -> StreamingResponse:
    """`event: <type>` and `data: <event>` per event; a failure mid-stream is an `error` event, last."""

    async def lines() -> AsyncIterator[str]:
        number = 0
        try:
            async for e in stream:
                number = e["sequence_number"] + 1
                yield f"event: {e['type']}\ndata: {json.dumps(e)}\n\n"
        except Exception as e:  # noqa: BLE001 - the status is already 200: say it in the stream
            code = "engine_error" if isinstance(e, EngineError) else "internal_error"
            what = f"the engine failed on this request: {e}" if code == "engine_error" else f"internal error: {e}"
            error = error_body(500, what, None, code)["error"]
            yield f"event: error\ndata: {json.dumps({'type': 'error', 'sequence_number': number, **error})}\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
