"""Tokenizers: text to token ids and back, for engines and the ingress.

`ByteTokenizer` needs no files (UTF-8 bytes are the ids); the simulated engine and
the tests use it. `HfTokenizer` loads a Hugging Face tokenizer from a local
directory, never from the hub. `load_tokenizer("byte" | "<dir>")` picks one.
`TextStream` turns a stream of output ids into text deltas and honours stop strings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@runtime_checkable
class Tokenizer(Protocol):
    """What the platform needs of a tokenizer."""

    name: str
    eos_token_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as a raw prompt, with whatever special prefix the model expects."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens left out."""

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Ids of a chat (`[{"role": ..., "content": ...}]`) ready for the assistant's turn."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, plus BOS (256) and EOS (257).

    Its chat format is plain text: one `role: content` line per message, then
    `assistant:` on the last line, all after a BOS.
    """

    BOS = 256
    EOS = 257

    name = "byte"
    eos_token_id: int | None = EOS
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the byte vocabulary "
                                 f"[0, {self.vocab_size})")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        lines = [f"{_field(m, 'role')}: {_field(m, 'content')}\n" for m in messages]
        return [self.BOS] + self.encode("".join(lines) + "assistant:")


class HfTokenizer:
    """A Hugging Face tokenizer read from a local directory, offline.

    Chats use the directory's own chat template (`tokenizer_config.json` or
    `chat_template.jinja`); `apply_chat_template` refuses when there is none.
    """

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer  # heavy import, only when a model dir is used

        self.path = Path(path)
        _require_tokenizer_dir(self.path)
        self._tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.name = str(self.path)
        self.eos_token_id: int | None = self._tok.eos_token_id
        self.vocab_size: int = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not self._tok.chat_template:
            raise ValueError(f"tokenizer in {self.path} has no chat template")
        for m in messages:
            _field(m, "role")
            _field(m, "content")
        ids = self._tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)


def load_tokenizer(spec: str) -> Tokenizer:
    """`"byte"` for the byte tokenizer, otherwise a local directory holding a tokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"tokenizer spec {spec!r} is neither 'byte' nor an existing directory")
    return HfTokenizer(path)


def _require_tokenizer_dir(path: Path) -> None:
    if not path.is_dir():
        raise ValueError(f"tokenizer directory {path} does not exist")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(f"no tokenizer in {path}: expected one of {', '.join(_TOKENIZER_FILES)}")


def _field(message: dict, key: str) -> str:
    value = message.get(key) if isinstance(message, dict) else None
    if not isinstance(value, str):
        raise TypeError(f"chat message needs a string {key!r}, got {message!r}")
    return value


class TextStream:
    """Text deltas of one request's output ids, with stop strings.

    Decodes incrementally (a window of recent ids, so multi-token characters and
    tokenizers that merge spaces come out right) and, while stop strings are set,
    holds back the last `len(longest stop) - 1` characters so that a stop string is
    never partly sent. A matched stop string and everything after it is dropped.
    `prior_ids` are outputs the client already has (a resumed request): they give
    context and can complete a stop string, but their text is not sent again.
    """

    _WINDOW = 6  # ids decoded before the new ones, to get merges and spaces right

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (),
                 prior_ids: Sequence[int] = ()):
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._tok = tokenizer
        self._stop = tuple(stop)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._ids = list(prior_ids)
        self._read = len(self._ids)
        self._prefix = max(0, self._read - self._WINDOW)
        self._text = tokenizer.decode(self._ids)
        self._sent = len(self._text)
        self._searched = max(0, self._sent - self._holdback)
        self.stopped = False

    def push(self, ids: Sequence[int]) -> str:
        """Add output ids; return the text now safe to send. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        self._ids.extend(ids)
        self._text += self._decode_new()
        cut = self._find_stop()
        if cut is not None:
            self._text = self._text[:cut]
            self.stopped = True
            return self._send(len(self._text))
        return self._send(len(self._text) - self._holdback if self._stop else len(self._text))

    def flush(self) -> str:
        """The held-back text, at the end of a stream that did not stop on a string."""
        return self._send(len(self._text))

    def _decode_new(self) -> str:
        before = self._tok.decode(self._ids[self._prefix : self._read])
        after = self._tok.decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the ids that complete it
        self._prefix = max(self._prefix, len(self._ids) - self._WINDOW)
        self._read = len(self._ids)
        return after[len(before) :]

    def _find_stop(self) -> int | None:
        hits = [i for i in (self._text.find(s, self._searched) for s in self._stop) if i >= 0]
        self._searched = max(self._searched, len(self._text) - self._holdback)
        return min(hits) if hits else None

    def _send(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        out = self._text[self._sent : upto]
        self._sent = upto
        return out
