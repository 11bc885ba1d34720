"""Request bodies of the OpenAI-compatible routes (`/v1/completions`, `/v1/chat/completions`).

Fields are typed as OpenAI documents them and nullable as there (null = the default), strict and
bounded like /generate's. A field OpenAI defines that this server does not implement is accepted
only at the value that makes it a no-op here (`frequency_penalty` 0, `logit_bias` {}, `tools` null,
...); any other value of it, and any field OpenAI does not define, is refused with a 400 naming it:
never silently ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic_core import PydanticCustomError

from server.api.schemas import MAX_LOGPROBS, MAX_MESSAGES, Role, StopStrings, Text

UNSUPPORTED = "unsupported_parameter"
INVALID = "invalid_value"
MAX_CONTENT_PARTS = 1024
MAX_NAME_CHARS = 512  # a model name: the base model's, an adapter's `id` or `owner/id`

_ZERO = (0, 0.0)
_COMMON_NOOPS: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": _ZERO,
    "presence_penalty": _ZERO,
    "logit_bias": ({},),
}
_COMPLETION_NOOPS = {**_COMMON_NOOPS, "best_of": (1,), "echo": (False,), "suffix": ("",)}
_CHAT_NOOPS = {
    **_COMMON_NOOPS,
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (True,),
    "functions": ([],),
    "function_call": ("none",),
    "store": (False,),
    "metadata": ({},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "service_tier": ("auto", "default"),
    "prompt_cache_key": (),
}


def field_error(message: str, kind: str = INVALID, param: str | None = None) -> PydanticCustomError:
    """A validation error; the OpenAI envelope reports `kind` as its code, and `param` when given (a
    model-level check; a field's own validator is located by pydantic)."""
    return PydanticCustomError(
        kind, "{message}", {"message": message} if param is None else {"message": message, "param": param}
    )


def _is_noop(value: Any, noops: tuple[Any, ...]) -> bool:
    """null, or one of the no-op values with the same JSON type (so `echo: 0` is not `false`)."""
    return value is None or any(type(value) is type(noop) and value == noop for noop in noops)


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool | None = None
    include_obfuscation: Literal[False] | None = None  # no padding is ever added here


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    _noops: ClassVar[dict[str, tuple[Any, ...]]] = {}

    model: Text = Field(max_length=MAX_NAME_CHARS)
    max_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1, strict=True)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, strict=True)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0, strict=True)
    n: int | None = Field(default=None, ge=1, le=2**31 - 1, strict=True)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, strict=True)
    stop: StopStrings | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: Text | None = Field(default=None, max_length=256)  # names the end user to OpenAI; no effect here

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        """Drop the no-op fields; refuse, naming them all, every other field this model lacks."""
        if not isinstance(data, dict):
            return data
        refused: dict[str, str] = {}  # field -> why
        for name, value in data.items():
            if name in cls.model_fields:
                continue
            if name not in cls._noops:
                refused[name] = f"{name} (not a field of this request)"
            elif not _is_noop(value, cls._noops[name]):
                allowed = ", ".join(_show(v) for v in (None, *cls._noops[name]))
                refused[name] = f"{name}={_show(value)} (supported only as {allowed})"
        if refused:
            message = "unsupported: " + "; ".join(refused.values())
            raise field_error(message, UNSUPPORTED, param=", ".join(refused))
        return {name: value for name, value in data.items() if name in cls.model_fields}

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> OpenAIRequest:
        if self.stream_options is not None and not self.stream:
            raise field_error("stream_options is only allowed when stream is true", param="stream_options")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)


TokenId = Annotated[int, Field(ge=0, strict=True)]


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions: one prompt, as text or token ids (a list of one of them is that one)."""

    _noops: ClassVar[dict[str, tuple[Any, ...]]] = _COMPLETION_NOOPS

    prompt: Text | list[TokenId]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, strict=True)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
            if len(value) > 1:
                raise field_error(f"one prompt per request: a batch of {len(value)} is not supported", UNSUPPORTED)
            return value[0]
        return value

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str | list[int]) -> str | list[int]:
        if len(value) == 0:
            raise field_error("the prompt is empty")
        return value


class ChatMessage(BaseModel):
    """A chat message; `content` as a string or a list of text parts (joined with newlines)."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: Text

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        if len(value) > MAX_CONTENT_PARTS:
            raise field_error(f"at most {MAX_CONTENT_PARTS} content parts")
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.keys() == {"type", "text"} and part["type"] == "text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise field_error(f"only text content parts are supported, not {_show(kind)}", UNSUPPORTED)
            if not isinstance(part["text"], str):
                raise field_error("a text part's text must be a string")
            texts.append(part["text"])
        return "\n".join(texts)


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions."""

    _noops: ClassVar[dict[str, tuple[Any, ...]]] = _CHAT_NOOPS

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1, strict=True)
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, strict=True)

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise field_error("top_logprobs needs logprobs: true", param="top_logprobs")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise field_error("max_tokens and max_completion_tokens differ: give one", param="max_completion_tokens")
        return self

    def text_bytes(self) -> int:
        """UTF-8 size of the text to tokenize (the chat template only adds to it)."""
        return sum(len(m.content.encode()) + len(m.role) for m in self.messages)
