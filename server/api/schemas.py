"""Pydantic models of the HTTP API (the only place pydantic is used).

Every field is strict (a string is never read as a number) and bounded, so what reaches the engine
is always something it can serve; text fields must be encodable as UTF-8 (a lone UTF-16 surrogate
such as "\\ud800" is valid JSON but not text, and is answered with a 400).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator
from pydantic_core import PydanticCustomError

UNDECODABLE_TEXT = "undecodable_text"  # the error type the app answers with 400 instead of 422
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
MAX_LOGPROBS = 20  # most alternatives per token a request may ask for (OpenAI's top_logprobs bound)


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            UNDECODABLE_TEXT,
            "text is not valid Unicode ({reason} at index {index})",
            {"reason": exc.reason, "index": exc.start},
        ) from None
    return text


Text = Annotated[StrictStr, AfterValidator(_encodable)]
StopString = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_encodable)]
# One stop string or a list of them (the bound on the list must not apply to a single string's length).
StopStrings = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role
    content: Text


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1, strict=True)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0, strict=True)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, strict=True)
    top_k: int = Field(default=0, ge=0, le=2**31 - 1, strict=True)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, strict=True)
    stop: StopStrings | None = None
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    adapter_id: Text | None = Field(default=None, max_length=256)
    mode: Literal["auto", "gathered", "merged"] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, strict=True)

    @model_validator(mode="after")
    def _exactly_one_input(self) -> GenerateRequest:
        if self.prompt is None and self.messages is None:
            raise ValueError("give either 'prompt' or 'messages'")
        if self.prompt is not None and self.messages is not None:
            raise ValueError("give 'prompt' or 'messages', not both")
        if self.prompt == "":
            raise ValueError("'prompt' is empty")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def text_bytes(self) -> int:
        """UTF-8 size of the text to tokenize (the chat template only adds to it)."""
        if self.messages is not None:
            return sum(len(m.content.encode()) + len(m.role) for m in self.messages)
        return len(self.prompt.encode())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class TopLogprob(BaseModel):
    token_id: int
    logprob: float


class TokenLogprobs(BaseModel):
    """A generated token's log-probability and its `logprobs` most likely alternatives (best first)."""

    token_id: int
    logprob: float
    top_logprobs: list[TopLogprob]


class GenerateResponse(BaseModel):
    id: str
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    usage: Usage
    logprobs: list[TokenLogprobs] | None = None  # present when the request asked (one per token_ids entry)


class ErrorBody(BaseModel):
    message: str
    type: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: `{"error": {"message", "type"}}`."""

    error: ErrorBody


class OpenAIErrorBody(BaseModel):
    message: str
    type: str  # OpenAI's class of error: invalid_request_error, authentication_error, ...
    param: str | None  # the offending body field, when known
    code: str  # our specific kind


class OpenAIErrorResponse(BaseModel):
    """Every 4xx/5xx answer of the /v1 routes: OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

    error: OpenAIErrorBody
