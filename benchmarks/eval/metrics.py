"""Identifier scores for one completion against what the file really held (exact match and edit
similarity are server/training/heldout.py's, shared with the flywheel's held-out evaluation)."""

from __future__ import annotations

from collections import Counter

from ghostpen.benchmarks.eval.strategies import identifiers


def identifier_match(predicted: str, expected: str) -> tuple[float, float]:
    """Identifier exact match, and F1 over the identifiers as multisets."""
    got, want = identifiers(predicted), identifiers(expected)
    exact = float(got == want)
    if not got or not want:
        return exact, float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if not common:
        return exact, 0.0
    precision, recall = common / len(got), common / len(want)
    return exact, 2 * precision * recall / (precision + recall)
