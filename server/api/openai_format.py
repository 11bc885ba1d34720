"""OpenAI response bodies for one request: a completion or a chat completion, whole or as stream
chunks, with logprobs in each API's own shape.

A token's text in logprobs is its exact bytes decoded as UTF-8; a token that is only part of a
character (byte-level BPE splits some) is written `bytes:\\xe2\\x80` as OpenAI does, and chat logprobs
carry the bytes themselves too.
"""

from __future__ import annotations

import time

from server.api.outputs import Output
from server.engine.request import TokenEvent, TokenLogprob
from server.model.tokenizer import TextTokenizer


def token_text(tokenizer: TextTokenizer, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode(), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


class AnswerFormat:
    """What both APIs share: the response's id, model and creation time, and the usage counts."""

    object_whole: str
    object_chunk: str

    def __init__(self, response_id: str, model: str, tokenizer: TextTokenizer, n: int, include_usage: bool) -> None:
        self.response_id = response_id
        self.model = model
        self.tokenizer = tokenizer
        self.include_usage = include_usage
        self.created = int(time.time())
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._text_offsets = [0] * n  # per choice: characters of token text so far (completions logprobs)

    def _head(self, obj: str) -> dict:
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model}

    def _usage(self) -> dict:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}

    def _count(self, prompt_tokens: int, completion_tokens: int) -> None:
        """One finished choice (the prompt is counted once, as OpenAI does, however many choices)."""
        self.prompt_tokens = prompt_tokens
        self.completion_tokens += completion_tokens

    def whole(self, outputs: list[Output]) -> dict:
        for output in outputs:
            self._count(output.prompt_tokens, output.completion_tokens)
        choices = [self._whole_choice(i, output) for i, output in enumerate(outputs)]
        return {**self._head(self.object_whole), "choices": choices, "usage": self._usage()}

    def opening(self) -> list[dict]:
        """Chunks sent before any token."""
        return []

    def chunk(self, index: int, event: TokenEvent) -> dict | None:
        """The chunk for one event of choice `index`; None when it has nothing to say."""
        if event.finish_reason is not None:
            self._count(event.prompt_tokens, event.completion_tokens)
        elif not event.text and not event.logprobs:
            return None  # text held back (a possible stop string, a partial character)
        return self._chunk([self._chunk_choice(index, event)])

    def usage_chunk(self) -> dict:
        """The last chunk when the client asked for `stream_options.include_usage`."""
        return {**self._chunk([]), "usage": self._usage()}

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {**self._head(self.object_chunk), "choices": choices}
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: every chunk has the key, only the last one a value
        return chunk

    def _whole_choice(self, index: int, output: Output) -> dict:
        raise NotImplementedError

    def _chunk_choice(self, index: int, event: TokenEvent) -> dict:
        raise NotImplementedError


class CompletionFormat(AnswerFormat):
    object_whole = object_chunk = "text_completion"

    def _whole_choice(self, index: int, output: Output) -> dict:
        return {
            "index": index,
            "text": output.text,
            "logprobs": self._logprobs(index, output.logprobs),
            "finish_reason": output.finish_reason,
        }

    def _chunk_choice(self, index: int, event: TokenEvent) -> dict:
        return {
            "index": index,
            "text": event.text,
            "logprobs": self._logprobs(index, event.logprobs),
            "finish_reason": event.finish_reason,
        }

    def _logprobs(self, index: int, logprobs: list[TokenLogprob] | None) -> dict | None:
        """The legacy shape: parallel lists, alternatives as {token text: logprob}."""
        if logprobs is None:
            return None
        tokens, offsets = [], []
        for lp in logprobs:
            text, _ = token_text(self.tokenizer, lp.token_id)
            tokens.append(text)
            offsets.append(self._text_offsets[index])
            self._text_offsets[index] += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [
                {token_text(self.tokenizer, token_id)[0]: logprob for token_id, logprob in lp.top} for lp in logprobs
            ],
            "text_offset": offsets,
        }


class ChatFormat(AnswerFormat):
    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def opening(self) -> list[dict]:
        """OpenAI opens each choice's stream with the assistant role."""
        n = len(self._text_offsets)
        delta = {"role": "assistant", "content": ""}
        return [self._chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]) for i in range(n)]

    def _whole_choice(self, index: int, output: Output) -> dict:
        return {
            "index": index,
            "message": {"role": "assistant", "content": output.text},
            "logprobs": self._logprobs(output.logprobs),
            "finish_reason": output.finish_reason,
        }

    def _chunk_choice(self, index: int, event: TokenEvent) -> dict:
        return {
            "index": index,
            "delta": {"content": event.text} if event.text else {},
            "logprobs": self._logprobs(event.logprobs),
            "finish_reason": event.finish_reason,
        }

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> dict | None:
        if logprobs is None:
            return None
        return {"content": [self._entry(lp) for lp in logprobs], "refusal": None}

    def _entry(self, lp: TokenLogprob) -> dict:
        text, raw = token_text(self.tokenizer, lp.token_id)
        top = []
        for token_id, logprob in lp.top:
            alt_text, alt_raw = token_text(self.tokenizer, token_id)
            top.append({"token": alt_text, "logprob": logprob, "bytes": alt_raw})
        return {"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top}
