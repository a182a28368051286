"""Code as a sequence of tokens, packed one token per character so rapidfuzz compares it fast.

Ranking by edit distance over tokens rather than characters ignores layout (indentation,
spacing) and makes each comparison about five times shorter: for a 12-line query against 600
chunks that is the difference between ~10 ms and well under 1 ms per request on our CPU.
"""

from __future__ import annotations

import re
import zlib

_TOKEN = re.compile(r"\w+|[^\w\s]")
_PLANE_START = 0x10000  # code points past the Basic Multilingual Plane: no surrogates to avoid
_PLANE_SPAN = 0x10FFFF - _PLANE_START


def encode_tokens(text: str) -> str:
    """Each identifier, number or symbol becomes one character, the same for equal tokens.

    crc32 keeps the mapping deterministic across processes; collisions among ~1M code points are
    rare enough not to move a ranking."""
    return "".join(
        chr(_PLANE_START + zlib.crc32(token.encode("utf-8")) % _PLANE_SPAN)
        for token in _TOKEN.findall(text)
    )
