"""Pydantic models of the HTTP API (the only place pydantic is used)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: StrictStr
    content: StrictStr


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, strict=True)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, strict=True)
    stop: StrictStr | list[StrictStr] | None = None
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    adapter_id: StrictStr | None = None
    mode: Literal["auto", "gathered", "merged"] | None = None

    @model_validator(mode="after")
    def _exactly_one_input(self) -> "GenerateRequest":
        if self.prompt is None and self.messages is None:
            raise ValueError("give either 'prompt' or 'messages'")
        if self.prompt is not None and self.messages is not None:
            raise ValueError("give 'prompt' or 'messages', not both")
        if self.prompt == "":
            raise ValueError("'prompt' is empty")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return tuple(stops)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    id: str
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    usage: Usage
