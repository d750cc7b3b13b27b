"""UTF-16 offsets: what Label Studio's browser editor counts (JavaScript strings), next to Python's code points."""

from __future__ import annotations

import bisect
import re

# Characters JavaScript holds as two UTF-16 code units (a surrogate pair). A lone surrogate (possible in
# JSON: "\udc00") is one unit there, as here.
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def utf16_len(text: str) -> int:
    """Return the length of text in UTF-16 code units (JavaScript's string length)."""
    if text.isascii():
        return len(text)
    return len(text) + len(_ASTRAL.findall(text))


def utf16_offset(text: str, index: int) -> int:
    """Return the UTF-16 offset of code point `index` of text (a DOM Range / JavaScript offset)."""
    if text.isascii():
        return index
    return index + len(_ASTRAL.findall(text, 0, max(0, index)))


def code_point_index(text: str, offset: int) -> int | None:
    """Return the code point index at UTF-16 `offset` of text; None when past the end or inside a pair."""
    if text.isascii():
        return offset if 0 <= offset <= len(text) else None
    return Utf16Map(text).index(offset)


class Utf16Map:
    """Offsets of one text in code points and in UTF-16 units, converted in O(log n) once built (O(n), in C)."""

    __slots__ = ("_cps", "_units", "length", "units")

    def __init__(self, text: str) -> None:
        """Find the text's astral characters (two UTF-16 units each)."""
        self._cps = [m.start() for m in _ASTRAL.finditer(text)]  # their code point indices
        self._units = [cp + i for i, cp in enumerate(self._cps)]  # their UTF-16 offsets
        self.length = len(text)
        self.units = len(text) + len(self._cps)  # the UTF-16 length

    def offset(self, index: int) -> int:
        """Return the UTF-16 offset of code point `index`."""
        return index + bisect.bisect_left(self._cps, index)

    def index(self, offset: int) -> int | None:
        """Return the code point index at UTF-16 `offset`; None when outside the text or inside a pair."""
        if not 0 <= offset <= self.units:
            return None
        pairs = bisect.bisect_left(self._units, offset)  # pairs that start before the offset
        if pairs and self._units[pairs - 1] + 1 == offset:
            return None
        return offset - pairs
