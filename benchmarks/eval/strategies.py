"""Cross-file context strategies to compare at the same token budget, all with one signature
(context.ranker.Ranker): ours (edit distance over tokens), Jaccard over sliding windows (what
Copilot and Cody ship), BM25 (what Tabby ships), a hybrid of edit distance and BM25 by
reciprocal rank fusion, and none."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from ghostpen.context.chunker import Chunk
from ghostpen.context.ranker import Exclusion, RankedChunk, Ranker, rank_chunks

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def identifiers(text: str) -> list[str]:
    return _IDENTIFIER.findall(text)


def no_context(query: str, chunks: Sequence[Chunk], exclude: Exclusion, top_k: int) -> list:
    return []


def jaccard(query: str, chunks: Sequence[Chunk], exclude: Exclusion, top_k: int) -> list:
    wanted = set(identifiers(query))
    if not wanted:
        return []
    scored = []
    for chunk in chunks:
        if exclude.covers(chunk):
            continue
        words = set(identifiers(chunk.text))
        union = len(wanted | words)
        scored.append(RankedChunk(chunk, len(wanted & words) / union if union else 0.0))
    return sorted(scored, key=lambda r: r.score, reverse=True)[:top_k]


def bm25(
    query: str,
    chunks: Sequence[Chunk],
    exclude: Exclusion,
    top_k: int,
    k1: float = 1.2,
    b: float = 0.75,
) -> list:
    candidates = [c for c in chunks if not exclude.covers(c)]
    terms = identifiers(query)
    if not terms or not candidates:
        return []
    documents = [Counter(identifiers(c.text)) for c in candidates]
    average = sum(sum(d.values()) for d in documents) / len(documents) or 1.0
    frequency = Counter(term for d in documents for term in d)
    scored = []
    for chunk, counts in zip(candidates, documents, strict=True):
        length = sum(counts.values())
        score = 0.0
        for term in set(terms):
            if term in counts:
                idf = math.log(
                    1 + (len(documents) - frequency[term] + 0.5) / (frequency[term] + 0.5)
                )
                tf = counts[term]
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / average))
        scored.append(RankedChunk(chunk, score))
    return sorted(scored, key=lambda r: r.score, reverse=True)[:top_k]


RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al., 2009)
FUSION_DEPTH = 4  # each ranker's list is fused this many times top_k deep


def hybrid(query: str, chunks: Sequence[Chunk], exclude: Exclusion, top_k: int) -> list:
    """Edit distance and BM25 fused by reciprocal rank: a chunk either ranks high wins."""
    fused: dict[Chunk, float] = {}
    for ranker in (rank_chunks, bm25):
        for rank, ranked in enumerate(ranker(query, chunks, exclude, top_k * FUSION_DEPTH)):
            fused[ranked.chunk] = fused.get(ranked.chunk, 0.0) + 1 / (RRF_K + rank + 1)
    best = sorted(fused.items(), key=lambda item: item[1], reverse=True)[:top_k]
    return [RankedChunk(chunk, score) for chunk, score in best]


STRATEGIES: dict[str, Ranker] = {
    "none": no_context,
    "edit-distance": rank_chunks,
    "jaccard": jaccard,
    "bm25": bm25,
    "hybrid": hybrid,
}
