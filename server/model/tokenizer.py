"""Tokenizer (the `tokenizers` library) and the checkpoint's chat template (jinja2, sandboxed)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders

from server.errors import InvalidRequest, ModelLoadError


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE spells each byte as one printable character (GPT-2's table); the inverse."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class TextTokenizer:
    def __init__(self, model_dir: Path) -> None:
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise ModelLoadError(f"{model_dir} has no tokenizer.json")
        self._tokenizer = Tokenizer.from_file(str(path))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        template = config.get("chat_template")
        template_file = model_dir / "chat_template.jinja"
        if template is None and template_file.exists():
            template = template_file.read_text()
        if isinstance(template, list):  # named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
        self._chat_template = env.from_string(template) if template else None

        # Bytes of input one token can cover at most (a vocabulary entry's UTF-8 size over-counts it:
        # byte-level and metaspace alphabets spell one input byte with 1-3 bytes), doubled for
        # normalizers that shrink text (NFKC "ﬁ" -> "fi"). Lets a request whose text cannot fit the
        # context be refused without tokenizing megabytes of it.
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self.max_bytes_per_token = 2 * max((len(t.encode("utf-8", "replace")) for t in vocab), default=1)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (plain encode holds it: a 6 MB text froze
        # every other thread, the event loop included, for 5 s); callers run this off the loop.
        return self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of text one token stands for (special tokens: their own text). A token can be
        part of a UTF-8 character, so this is exact where decoding the token alone is not."""
        piece = self._tokenizer.id_to_token(token_id) or ""
        if isinstance(self._tokenizer.decoder, decoders.ByteLevel):
            if all(c in _BYTE_LEVEL for c in piece):
                return bytes(_BYTE_LEVEL[c] for c in piece)
            return piece.encode()  # an added token outside the byte alphabet: its own text
        if match := _BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(match[1], 16)])
        return piece.replace("\u2581", " ").encode()  # SentencePiece's word-boundary mark is a space

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        if self._chat_template is None:
            raise InvalidRequest("this model has no chat template; send a plain 'prompt' instead of 'messages'")
        try:
            return self._chat_template.render(
                messages=messages, add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token
            )
        except TemplateError as exc:
            raise InvalidRequest(f"chat template rejected the messages: {exc}") from None

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # The template already writes any BOS it wants, so no special tokens are added again.
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _token_text(token: str | dict | None) -> str:
    if isinstance(token, dict):
        return token.get("content", "")
    return token or ""
