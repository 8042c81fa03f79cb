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
_NEAR_END = 10  # an error this close to the buffer's end may be a value cut by it ("-Infinity" is 9)
_NUMBERS = (int, float)
_CLOSERS = re.compile(r"[\]}]")


def _may_go_on(obj: Any, end: int, buf: str) -> bool:
    """Can the number just decoded continue past the buffer's end? "12|34", "1.|5", "1e|5" and
    "1e+|5" decode as a shorter number that ends at most two characters before the end."""
    return end + 2 >= len(buf) and obj.__class__ in _NUMBERS


# between two elements of an array: ',' and the space after it (group 1 empty), or the closing ']'
_SEP = re.compile(r"[ \t\n\r]*(?:,[ \t\n\r]*|(\]))")


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
        decoder = json.JSONDecoder()
        self._decode = decoder.raw_decode
        self._scan = decoder.scan_once  # raw_decode without its Python frame; the value must start at the index

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

    def _error(self, what: str, at_end: bool | None = None) -> InputError:
        """The error at the current place. ``at_end``: the file stops before the value does (by
        default: everything was read and nothing but space is left after this place)."""
        if at_end is None:
            at_end = self._eof and _WS.match(self._buf, self._pos).end() >= len(self._buf)
        if at_end:
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
                # A value cut by the end of the buffer fails there (a literal such as "fal|se" fails at
                # its start, a few characters before the end), or as an unterminated string.
                unterminated = exc.msg.startswith("Unterminated string")
                near_end = exc.pos >= len(self._buf) - _NEAR_END
                if self._eof or not (unterminated or near_end):
                    # All of the file is here, or the error is well inside: the file is cut if the
                    # value runs to its end, else it is malformed at the error's place.
                    cut = unterminated or (near_end and not _CLOSERS.search(self._buf, exc.pos))
                    if not cut:
                        self._pos = exc.pos
                    raise self._error(exc.msg, at_end=cut) from None
                if len(self._buf) - self._pos > self._max_value:
                    raise InputError(
                        f"{self._name}: one value near character {self.offset()} is larger than "
                        f"{self._max_value >> 20} MB or is malformed.",
                        hint="Check the file; nothing from it was stored.",
                    ) from None
                self._fill(at_least=len(self._buf) - self._pos)  # at the end of the file: decided above
                continue
            except ValueError:  # not a JSONDecodeError: Python reads no integer of more than 4,300 digits
                raise self._error("a number of over 4,300 digits", at_end=False) from None
            except RecursionError:
                raise self._error("arrays or objects nested too deeply", at_end=False) from None
            if not self._eof and _may_go_on(obj, end, self._buf):
                self._fill()  # moves the buffer (``end`` with it) even when nothing more comes
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

        The hot loop of ingest (once per message): it calls the C scanner straight on the buffer
        and steps over the separator with one regular expression; the buffer is refilled ahead,
        when less than ``chunk_chars / 8`` is left, so a value rarely straddles its end. Only
        then, or on an error, does it take the careful path (``value``/``peek``), which refills
        as needed and raises the clear errors."""
        self.expect("[")
        if self.peek() == "]":
            self._pos += 1
            return
        scan, sep, scalar_end = self._scan, _SEP.match, _NUMBERS
        low = max(1, self._chunk >> 3)
        while True:
            buf, pos = self._buf, self._pos
            if len(buf) - pos < low and not self._eof:
                self._fill()
                buf, pos = self._buf, self._pos
            try:
                obj, end = scan(buf, pos)
            except (StopIteration, ValueError, RecursionError):  # (JSONDecodeError is a ValueError)
                obj = self.value()  # the careful path: reads on, or raises the clear error
                buf, end = self._buf, self._pos
            else:
                if end + 2 >= len(buf) and not self._eof and obj.__class__ in scalar_end:
                    self._pos = pos
                    obj = self.value()  # a number at the buffer's end may go on in the next chunk
                    buf, end = self._buf, self._pos
            yield obj
            m = sep(buf, end)
            if m is not None and m.end() < len(buf):
                self._pos = m.end()
                if m.group(1):  # ']'
                    return
                continue
            self._pos = end  # the separator reaches the buffer's end, or is not there
            nxt = self.peek()
            if nxt == ",":
                self._pos += 1
                self.peek()
                continue
            if nxt == "]":
                self._pos += 1
                return
            raise self._error("expected ',' or ']'")

    def at_end(self) -> None:
        if self.peek() != "":
            raise self._error("unexpected data after the end")
