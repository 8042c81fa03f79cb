"""A streaming reader for large JSON exports.

The outer structure (a few objects and arrays) is walked token by token; each message is decoded
with the C scanner of the standard library (``raw_decode``) from a bounded buffer. Memory stays
bounded by the largest single message, not the file; a truncated or malformed file raises
``InputError`` with the character offset.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import IO, Any

from common.errors import InputError

_WS = re.compile(r"[ \t\n\r]*")


class JsonStream:
    def __init__(self, fh: IO[str], *, name: str = "input", chunk_chars: int = 1 << 20,
                 max_value_chars: int = 256 << 20) -> None:
        self._fh = fh
        self._name = name
        self._chunk = chunk_chars
        self._max_value = max_value_chars
        self._buf = ""
        self._pos = 0
        self._base = 0  # absolute offset of _buf[0]
        self._eof = False
        self._decode = json.JSONDecoder().raw_decode

    # --- buffer ---
    def _fill(self, at_least: int = 0) -> bool:
        if self._eof:
            return False
        if self._pos:
            self._base += self._pos
            self._buf = self._buf[self._pos:]
            self._pos = 0
        want = max(self._chunk, at_least)
        try:
            data = self._fh.read(want)
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{self._name} is not valid UTF-8 (bad byte near byte {exc.start}).",
                hint="Exports are UTF-8; re-export the chat, or convert the file to UTF-8.",
            ) from None
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def offset(self) -> int:
        return self._base + self._pos

    def _error(self, what: str) -> InputError:
        if self._eof:
            return InputError(
                f"{self._name} ends unexpectedly at character {self.offset()} ({what}); the file looks truncated.",
                hint="Re-export the chat or copy the file again; nothing from this file was stored.",
            )
        return InputError(
            f"{self._name} is not valid JSON near character {self.offset()} ({what}).",
            hint="Re-export the chat; nothing from this file was stored.",
        )

    def peek(self) -> str:
        """The next non-space character ('' at the end of the file)."""
        while True:
            self._pos = _WS.match(self._buf, self._pos).end()
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if not self._fill():
                return ""

    def expect(self, ch: str) -> None:
        got = self.peek()
        if got != ch:
            raise self._error(f"expected {ch!r}, found {got!r}" if got else f"expected {ch!r}")
        self._pos += 1

    # --- values ---
    def value(self) -> Any:
        """Decode the next complete JSON value."""
        self.peek()
        while True:
            try:
                obj, end = self._decode(self._buf, self._pos)
            except json.JSONDecodeError as exc:
                incomplete = exc.pos >= len(self._buf) - 1 or exc.msg.startswith("Unterminated string")
                if not incomplete:
                    self._pos = exc.pos
                    raise self._error(exc.msg) from None
                if len(self._buf) - self._pos > self._max_value:
                    raise InputError(
                        f"{self._name}: one value near character {self.offset()} is larger than "
                        f"{self._max_value >> 20} MB or is malformed.",
                        hint="Check the file; nothing from it was stored.",
                    ) from None
                if not self._fill(at_least=len(self._buf) - self._pos):
                    raise self._error(exc.msg) from None
                continue
            # A number that ends exactly at the buffer end may continue in the next chunk.
            if end == len(self._buf) and not self._eof and not isinstance(obj, (dict, list, str)):
                if self._fill():
                    continue
            self._pos = end
            return obj

    def skip_value(self) -> None:
        self.value()

    def iter_object(self) -> Iterator[str]:
        """Yield each key of the object that starts here; the caller consumes each value."""
        self.expect("{")
        if self.peek() == "}":
            self._pos += 1
            return
        while True:
            if self.peek() != '"':
                raise self._error("expected a key")
            key = self.value()
            self.expect(":")
            yield key
            nxt = self.peek()
            if nxt == ",":
                self._pos += 1
                continue
            if nxt == "}":
                self._pos += 1
                return
            raise self._error("expected ',' or '}'")

    def iter_array(self) -> Iterator[None]:
        """Yield once per element of the array that starts here; the caller consumes each element."""
        self.expect("[")
        if self.peek() == "]":
            self._pos += 1
            return
        while True:
            yield None
            nxt = self.peek()
            if nxt == ",":
                self._pos += 1
                continue
            if nxt == "]":
                self._pos += 1
                return
            raise self._error("expected ',' or ']'")

    def iter_values(self) -> Iterator[Any]:
        """Decode the elements of the array that starts here, one at a time.

        The hot loop of ingest: it decodes straight from the buffer and falls back to the careful
        path (``value``/``peek``, which refill the buffer) only at a chunk boundary."""
        self.expect("[")
        if self.peek() == "]":
            self._pos += 1
            return
        decode, ws, containers = self._decode, _WS.match, (dict, list)
        while True:
            buf = self._buf
            pos = ws(buf, self._pos).end()
            try:
                obj, end = decode(buf, pos)
            except json.JSONDecodeError:
                obj = self.value()
            else:
                if end == len(buf) and not isinstance(obj, containers):
                    self._pos = pos
                    obj = self.value()
                else:
                    self._pos = end
            yield obj
            buf = self._buf
            pos = ws(buf, self._pos).end()
            nxt = buf[pos] if pos < len(buf) else self.peek()
            if nxt == ",":
                self._pos = (pos if pos < len(buf) else self._pos) + 1
                continue
            if nxt == "]":
                self._pos = (pos if pos < len(buf) else self._pos) + 1
                return
            self._pos = pos if pos < len(buf) else self._pos
            raise self._error("expected ',' or ']'")

    def at_end(self) -> None:
        if self.peek() != "":
            raise self._error("unexpected data after the end")
