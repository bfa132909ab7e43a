"""Request bodies (pydantic, OpenAI field names) and OpenAI-style error bodies.

Models are strict (no "5" for 5, no "yes" for true) and forbid unknown fields, as the
OpenAI API does; text fields must be valid Unicode (a lone surrogate from a JSON escape
such as "\\ud800" is rejected here rather than failing in the tokenizer).
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import JSONResponse

MAX_STOP_SEQUENCES = 4


class ApiError(Exception):
    """A request the server refuses: becomes an OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(
    status: int,
    message: str,
    param: Optional[str] = None,
    code: Optional[str] = None,
    retry_after_s: Optional[int] = None,
) -> JSONResponse:
    kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(status)
    if kind is None:
        kind = "invalid_request_error" if status < 500 else "server_error"
    headers = {"Retry-After": str(retry_after_s or 1)} if status in (429, 503) else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _valid_unicode(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode (character {e.start} is a lone surrogate)") from None
    return text


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    stop: List[str] = Field(default_factory=list)
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    user: Optional[str] = None
    # Accepted so that clients which send these at their neutral values work unchanged;
    # any other value is refused rather than silently ignored.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Any = None
    logprobs: Any = None

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias", "logprobs")
    @classmethod
    def _neutral_only(cls, value: Any) -> Any:
        if value:
            raise ValueError("is not supported by this server (only 0, false, null or {} are accepted)")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> List[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        if len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(value)}")
        return [_valid_unicode(s, "stop sequence") for s in value]


class CompletionRequest(_Sampling):
    prompt: List[str]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> List[str]:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise ValueError("must be a string (or a list of exactly one string)")
        if not value:
            raise ValueError("is empty: give some text to complete")
        return [_valid_unicode(value, "prompt")]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, value: Any) -> str:
        # OpenAI also sends content as parts: [{"type": "text", "text": "..."}].
        if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
            value = "".join(str(p.get("text", "")) for p in value)
        if not isinstance(value, str):
            raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts')
        return _valid_unicode(value, "content")


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


def describe_validation_error(errors: List[Dict[str, Any]]) -> tuple[str, Optional[str]]:
    """(message, param) for the first of pydantic's/FastAPI's validation errors."""
    err = errors[0]
    loc = [part for part in err.get("loc", ()) if part != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "JSON decode error")
        return f"the request body is not valid JSON: {detail} (at character {loc[0] if loc else '?'})", None
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    if param is None:
        if kind == "missing":
            return "the request body is empty: send a JSON object (Content-Type: application/json)", None
        return "the request body must be a JSON object sent with Content-Type: application/json", None
    if kind == "missing":
        return f"missing required parameter: '{param}'", param
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: '{param}'", param
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"invalid value for '{param}': {message}", param
