"""Incremental detokenization and stop-string matching for one sequence (pure Python)."""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back what may still change.

    Decoding a window (prefix_offset..end) instead of all tokens keeps each step O(window); text that
    ends in an incomplete UTF-8 sequence (U+FFFD) is held back until the next token completes it.
    Text that could be the start of a stop string is held back too, so a stop never leaks out.
    """

    def __init__(self, decoder: Decoder, stop: tuple[str, ...]) -> None:
        self._decoder = decoder
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # all text decoded so far (stop strings cut off once found)
        self._emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def add(self, token_id: int) -> None:
        self._ids.append(token_id)
        prefix = self._decoder.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decoder.decode(self._ids[self._prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return
        search_from = max(0, len(self.text) - self._hold)
        self.text += full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._cut_at_stop(search_from)

    def _cut_at_stop(self, search_from: int) -> None:
        positions = [p for p in (self.text.find(s, search_from) for s in self._stop) if p >= 0]
        if positions:
            self.text = self.text[: min(positions)]
            self.stopped = True

    def take_delta(self, final: bool) -> str:
        """New text that is safe to show; `final` flushes what was held back for stop matching."""
        end = len(self.text) if (final or self.stopped) else max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
