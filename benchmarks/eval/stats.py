"""Paired bootstrap confidence intervals: two variants scored on the same tasks differ by the
mean of their per-task differences; resampling tasks with replacement gives its 95% interval.
Pairing removes the variance between tasks, which dwarfs that between variants."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Difference:
    mean: float  # of b - a
    low: float
    high: float
    tasks: int

    @property
    def shown(self) -> bool:
        """A difference is shown only when its interval excludes zero."""
        return self.low > 0 or self.high < 0

    def describe(self, digits: int = 3) -> str:
        interval = f"{self.mean:+.{digits}f} (CI {self.low:+.{digits}f} to {self.high:+.{digits}f})"
        return interval if self.shown else f"{interval}, no difference shown"


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = 0
) -> Difference:
    """The mean of b - a over paired tasks, with its percentile bootstrap interval."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples must be the same non-zero length: {len(a)}, {len(b)}")
    differences = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(differences), size=(resamples, len(differences)), dtype=np.int32)
    means = differences[picks].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Difference(float(differences.mean()), float(low), float(high), len(differences))
