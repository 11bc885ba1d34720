"""A request's prompt as token ids that fit the context, and its new-token budget: the checks every
generation route (/generate, /v1/completions, /v1/chat/completions) makes the same way.

`param` names the body field a refusal is about (`prompt`, `messages`, `max_tokens`, ...), so the
OpenAI routes can say which one it was.
"""

from __future__ import annotations

from server.errors import InvalidField
from server.runtime import Runtime


def check_text_fits(text_bytes: int, runtime: Runtime, param: str) -> None:
    """Refuse text that cannot fit the context before spending CPU on tokenizing it."""
    limit = runtime.max_model_len * runtime.tokenizer.max_bytes_per_token
    if text_bytes > limit:
        raise InvalidField(
            param,
            f"the prompt is {text_bytes} bytes of text; the context holds {runtime.max_model_len} "
            f"tokens and no token covers more than {runtime.tokenizer.max_bytes_per_token} "
            "bytes, so it cannot fit",
        )


def tokenize(runtime: Runtime, prompt: str | None, messages: list[dict[str, str]] | None) -> list[int]:
    """Token ids of a raw prompt or of chat messages rendered with the model's chat template, checked
    against the context. CPU-heavy: call it in a worker thread, never on the event loop."""
    tokenizer = runtime.tokenizer
    if messages is not None:
        return check_prompt_ids(tokenizer.encode_chat(messages), runtime, "messages")
    return check_prompt_ids(tokenizer.encode(prompt), runtime, "prompt")


def check_prompt_ids(ids: list[int], runtime: Runtime, param: str) -> list[int]:
    """`ids` if they are a prompt the model can take: not empty, known tokens, room for one more."""
    if not ids:
        raise InvalidField(param, "the prompt encodes to zero tokens")
    vocab = runtime.model.config.vocab_size
    if max(ids) >= vocab:
        raise InvalidField(param, f"token id {max(ids)} is not in the model's vocabulary of {vocab} tokens")
    if len(ids) >= runtime.max_model_len:
        raise InvalidField(
            param,
            f"the prompt has {len(ids)} tokens; the context holds {runtime.max_model_len} "
            "including at least one generated token",
        )
    return ids


def token_budget(requested: int | None, prompt_len: int, max_model_len: int, param: str = "max_tokens") -> int:
    """New tokens a request may generate: `requested`, which must fit beside the prompt, or (None)
    the rest of the context."""
    room = max_model_len - prompt_len
    if requested is not None and requested > room:
        raise InvalidField(
            param,
            f"{param}={requested} plus the {prompt_len}-token prompt exceeds the "
            f"context of {max_model_len} tokens (at most {room} new tokens fit)",
        )
    return room if requested is None else requested
