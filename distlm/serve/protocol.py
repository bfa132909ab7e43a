"""Request and response bodies (pydantic, OpenAI field names) and OpenAI-style error bodies.

Request models are strict (no "5" for 5, no "yes" for true) and forbid unknown fields, as the
OpenAI API does; text fields must be valid Unicode (a lone surrogate from a JSON escape such as
"\\ud800" is rejected here rather than failing in the tokenizer). Their JSON schemas are what
the OpenAPI document shows, so every type and bound a request is checked against is written
into the field itself; the limits that depend on the server (context, max_tokens_limit,
max_choices) are 400s. The response models describe exactly what the routes send.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.responses import JSONResponse
from typing_extensions import Annotated

from distlm.serve.engines.base import MAX_LOGPROBS

MAX_STOP_SEQUENCES = 4
MAX_STOP_TOKEN_IDS = 64


class ApiError(Exception):
    """A request the server refuses: becomes an OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_type(status: int) -> str:
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(status)
    return kind or ("invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: Optional[str] = None,
    code: Optional[str] = None,
    retry_after_s: Optional[int] = None,
    headers: Optional[Dict[str, str]] = None,
) -> JSONResponse:
    headers = dict(headers or {})
    if status in (429, 503):
        headers["Retry-After"] = str(retry_after_s or 1)
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers or None)


def _valid_unicode(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode (character {e.start} is a lone surrogate)") from None
    return text


NonEmpty = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str = Field(description="the run's name for the base model, or '<run>:<task>' for a task adapter")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 decodes greedily (so does anything below 1e-5)")
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    stop: Union[NonEmpty, Annotated[List[NonEmpty], Field(max_length=MAX_STOP_SEQUENCES)], None] = Field(
        None, description=f"up to {MAX_STOP_SEQUENCES} sequences; the text ends before the first one"
    )
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=128, description="choices per prompt (prompts x n is limited by the server)")
    stop_token_ids: Optional[Annotated[List[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)]] = Field(
        None, description="token ids that end a choice (not part of its text)"
    )
    ignore_eos: bool = Field(False, description="keep generating past the end-of-sequence token")
    user: Optional[str] = None
    # As vLLM applies them: the penalties count this choice's generated tokens (not the prompt's).
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="subtracted from the logit of every token generated so far"
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="subtracted from a token's logit once per time it was generated"
    )
    logit_bias: Optional[
        Dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]]
    ] = Field(None, description="token id (as a string) -> a bias added to its logit before sampling")

    @field_validator("stop")
    @classmethod
    def _stop_unicode(cls, value: Any) -> Any:
        for s in [value] if isinstance(value, str) else value or []:
            _valid_unicode(s, "stop sequence")
        return value

    @property
    def bias(self) -> Dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    @property
    def stops(self) -> List[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


Prompt = Union[
    NonEmpty,
    Annotated[List[NonEmpty], Field(min_length=1)],
    Annotated[List[TokenId], Field(min_length=1)],
    Annotated[List[Annotated[List[TokenId], Field(min_length=1)]], Field(min_length=1)],
]


def _requires(field: str, value: Any, other: str, other_value: Any) -> Dict[str, Any]:
    """JSON Schema for "if `field` is `value` (or, with value None, given), `other` must be `other_value`"."""
    condition = {"not": {"type": "null"}} if value is None else {"const": value}
    return {
        "if": {"properties": {field: condition}, "required": [field]},
        "then": {"properties": {other: {"const": other_value}}, "required": [other]},
    }


Name = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class ResponseFormatText(_Request):
    type: Literal["text"]


class ResponseFormatJsonObject(_Request):
    type: Literal["json_object"]


class JsonSchemaFormat(_Request):
    model_config = ConfigDict(populate_by_name=True)

    name: Name
    description: Optional[str] = None
    schema_: Dict[str, Any] = Field(default_factory=dict, alias="schema", description="a JSON Schema")
    strict: Optional[bool] = Field(None, description="the output always matches the schema (constrained decoding)")


class ResponseFormatJsonSchema(_Request):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    Union[ResponseFormatText, ResponseFormatJsonObject, ResponseFormatJsonSchema], Field(discriminator="type")
]
_RESPONSE_FORMAT = Field(
    None, description="json_object or json_schema: the output is constrained to JSON (matching the schema)"
)


class CompletionRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra=_requires("max_tokens", 0, "echo", True))

    prompt: Prompt = Field(
        description="a string, a list of strings, a list of token ids, or a list of lists of token ids; "
        "each prompt gets n choices"
    )
    max_tokens: Optional[int] = Field(None, ge=0, description="0 only with echo: score the prompt, generate nothing")
    logprobs: Optional[int] = Field(
        None, ge=0, le=MAX_LOGPROBS, description="the log-probability of each token and of this many likeliest"
    )
    echo: bool = Field(False, description="return the prompt before the completion (with its log-probabilities)")
    response_format: Optional[ResponseFormat] = _RESPONSE_FORMAT

    @field_validator("prompt")
    @classmethod
    def _prompt_unicode(cls, value: Any) -> Any:
        for p in [value] if isinstance(value, str) else value:
            if isinstance(p, str):
                _valid_unicode(p, "prompt")
        return value

    @property
    def prompts(self) -> List[Union[str, List[int]]]:
        """One entry per prompt: its text, or its token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: NonEmpty
    arguments: str = Field(description="the arguments as a JSON object's text")


class ToolCallIn(_Request):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[TextPart], None] = Field(
        None,
        description='a string or a list of {"type": "text", "text": ...} parts; null only for an assistant\'s tool calls',
    )
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCallIn]] = Field(None, description="an assistant's calls (role assistant)")
    tool_call_id: Optional[str] = Field(None, description="the call a tool result answers (role tool)")
    refusal: Optional[str] = None  # the openai client may send it back in an assistant message

    @field_validator("content")
    @classmethod
    def _text(cls, value: Any) -> Optional[str]:
        if isinstance(value, list):
            value = "".join(p.text for p in value)
        return None if value is None else _valid_unicode(value, "content")

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only a tool message has tool_call_id")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers)")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is missing (only an assistant message with tool_calls may leave it out)")
        return self

    def template_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class FunctionDef(_Request):
    name: Name
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = Field(None, description="a JSON Schema of the arguments object")
    strict: Optional[bool] = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Request):
    name: Name


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra=_requires("top_logprobs", None, "logprobs", True))

    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = Field(False, description="the log-probability of each new token")
    top_logprobs: Optional[int] = Field(
        None, ge=0, le=MAX_LOGPROBS, description="with logprobs: also this many likeliest tokens per position"
    )
    tools: Optional[Annotated[List[Tool], Field(max_length=128)]] = Field(
        None, description="function tools the model may call"
    )
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = Field(
        None,
        description="auto (the default with tools): the model decides; required or a named function: a call is "
        "forced and its arguments match the tool's parameters schema; none: text only",
    )
    parallel_tool_calls: Optional[bool] = Field(None, description="with tool_choice=required: one or more calls")
    response_format: Optional[ResponseFormat] = _RESPONSE_FORMAT


# ---------------------------------------------------------------- responses (for the OpenAPI document)

FinishReason = Optional[Literal["stop", "length", "tool_calls"]]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: List[str]
    token_logprobs: List[Optional[float]] = Field(description="null for a prompt's first token")
    top_logprobs: List[Optional[Dict[str, float]]]
    text_offset: List[int]


class AgentTrace(BaseModel):
    """How the agent (model "<run>") routed a request: the task whose layer answered (null: the
    base model), the router's calibrated confidence, its top choice and runner-up, and whether the
    top choice was below serve.agent.min_confidence (then the fallback answered)."""

    task: Optional[str]
    confidence: float
    chosen: str
    runner_up: Optional[str]
    runner_up_confidence: float
    fallback: bool


_AGENT = Field(
    None, description="the agent's routing (model '<run>' of a run with a router); on a stream's first chunk"
)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: FinishReason = Field(description="null only in stream chunks before the last")


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Optional[Usage] = Field(description="in stream chunks: null, except the last chunk with include_usage")
    agent: Optional[AgentTrace] = _AGENT


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: List[int]


class TokenLogprobOut(TopLogprob):
    top_logprobs: List[TopLogprob]


class ChatLogprobs(BaseModel):
    content: List[TokenLogprobOut]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str = Field(description="a JSON object's text")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: Optional[str] = Field(description="null when the answer is only tool calls")
    tool_calls: Optional[List[ToolCallOut]] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: List[ChatChoice]
    usage: Usage
    agent: Optional[AgentTrace] = _AGENT


class ToolCallDelta(ToolCallOut):
    index: int


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[List[ToolCallDelta]] = Field(None, description="each call whole, once its text is complete")


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: Optional[ChatLogprobs]
    finish_reason: FinishReason


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: List[ChatChunkChoice]
    usage: Optional[Usage]
    agent: Optional[AgentTrace] = _AGENT


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: Optional[str]
    description: str = Field(description="what the id selects: the agent, the base model, or a task's layer")


class ModelList(BaseModel):
    object: Literal["list"]
    data: List[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    models: List[str]
    replica: str
    engine: str


# What a union-typed field takes, for a value that fits none of its types.
UNION_HINTS = {
    "prompt": "must be a non-empty string, a list of them, a list of token ids or a list of lists of token ids",
    "stop": f"must be a non-empty string or a list of at most {MAX_STOP_SEQUENCES} of them",
    "content": 'must be a string or a list of {"type": "text", "text": ...} parts',
    "tool_choice": 'must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
}


def _branch(part: Any) -> bool:
    """A union branch's name in an error location ("constrained-str", "list[int]"), not a field."""
    return isinstance(part, str) and (any(c in part for c in "[]-") or part in ("str", "int", "float", "bool"))


def describe_validation_error(errors: List[Dict[str, Any]]) -> tuple[str, Optional[str]]:
    """(message, param) for the first of pydantic's/FastAPI's validation errors."""
    err = errors[0]
    loc = [part for part in err.get("loc", ()) if part != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "JSON decode error")
        return f"the request body is not valid JSON: {detail} (at character {loc[0] if loc else '?'})", None
    hint = None
    branch = next((i for i, part in enumerate(loc) if _branch(part)), None)
    if branch is not None:
        # A union: report the branch that got furthest, or what the field takes if every branch
        # failed on the type alone.
        field = loc[:branch]
        same = [e for e in errors if [p for p in e.get("loc", ()) if p != "body"][:branch] == field]
        deep = [e for e in same if not e.get("type", "").endswith(("_type", "literal_error"))]
        if deep:
            err = max(deep, key=lambda e: len(e.get("loc", ())))
            loc = [p for p in err.get("loc", ()) if p != "body" and not _branch(p)]
            kind = err.get("type", "")
        else:
            loc, hint = field, UNION_HINTS.get(str(field[-1]) if field else "", "has the wrong type")
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if param is None:
        if kind == "missing":
            return "the request body is empty: send a JSON object (Content-Type: application/json)", None
        return "the request body must be a JSON object sent with Content-Type: application/json", None
    if kind == "missing":
        return f"missing required parameter: '{param}'", param
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: '{param}'", param
    if kind == "string_too_short":
        return f"invalid value for '{param}': is empty", param
    if kind == "string_unicode":
        return f"invalid value for '{param}': is not valid Unicode (a lone surrogate such as \\ud800)", param
    message = hint or str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"invalid value for '{param}': {message}", param
