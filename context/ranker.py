"""Rank chunks by edit-distance similarity to the text just behind the cursor.

Normalized Levenshtein similarity (rapidfuzz) over token sequences: see context.tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from ghostpen.context.chunker import Chunk
from ghostpen.context.tokens import encode_tokens


@dataclass(frozen=True)
class RankedChunk:
    chunk: Chunk
    score: float  # normalized similarity, 0..1


@dataclass(frozen=True)
class Exclusion:
    """Lines of one file that the prompt already holds (the cursor's own window)."""

    path: str
    start_line: int
    end_line: int

    def covers(self, chunk: Chunk) -> bool:
        return (
            chunk.path == self.path
            and chunk.start_line < self.end_line
            and chunk.end_line > self.start_line
        )


Ranker = Callable[[str, Sequence[Chunk], Exclusion, int], list[RankedChunk]]


def query_text(prefix: str, query_lines: int) -> str:
    """The last query_lines complete lines behind the cursor: what the developer is writing now.

    The line being typed is left out so the query, and with it the chosen context and the
    engine's prefix cache, stays the same for every keystroke on a line."""
    lines = prefix.split("\n")
    complete = lines[:-1] or lines
    return "\n".join(complete[-query_lines:])


def rank_chunks(
    query: str, chunks: Sequence[Chunk], exclude: Exclusion, top_k: int
) -> list[RankedChunk]:
    """The top_k most similar chunks, best first; ties keep the order of `chunks` (recency)."""
    candidates = [chunk for chunk in chunks if not exclude.covers(chunk)]
    tokens = encode_tokens(query)
    if not tokens or not candidates:
        return []
    matches = process.extract(
        tokens,
        [chunk.tokens for chunk in candidates],
        scorer=Levenshtein.normalized_similarity,
        limit=top_k,
    )
    return [RankedChunk(candidates[index], score) for _, score, index in matches]


def score_chunks(query: str, chunks: Sequence[Chunk]) -> list[RankedChunk]:
    """The similarity of each of a few chunks, in their order."""
    tokens = encode_tokens(query)
    return [
        RankedChunk(chunk, Levenshtein.normalized_similarity(tokens, chunk.tokens))
        for chunk in chunks
    ]
