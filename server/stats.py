"""Paired bootstrap confidence intervals: two variants scored on the same tasks differ by the
mean of their per-task differences; resampling tasks with replacement gives its 95% interval.
Pairing removes the variance between tasks, which dwarfs that between variants. A share on its
own (a precision, a recall) gets Wilson's score interval."""

from __future__ import annotations

import math
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


_Z = 1.959964  # the normal quantile of a two-sided 95% interval


@dataclass(frozen=True)
class Proportion:
    hits: int
    of: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.hits / self.of if self.of else 0.0

    def describe(self, digits: int = 3) -> str:
        if not self.of:
            return "none"
        return f"{self.value:.{digits}f} (CI {self.low:.{digits}f} to {self.high:.{digits}f})"


def proportion(hits: int, of: int) -> Proportion:
    """hits / of with Wilson's 95% score interval, sound at small counts and near 0 or 1."""
    if not 0 <= hits <= of:
        raise ValueError(f"a proportion needs 0 <= hits <= of: {hits} of {of}")
    if of == 0:
        return Proportion(0, 0, 0.0, 1.0)
    share, z2 = hits / of, _Z * _Z
    centre = (share + z2 / (2 * of)) / (1 + z2 / of)
    spread = _Z * math.sqrt(share * (1 - share) / of + z2 / (4 * of * of)) / (1 + z2 / of)
    return Proportion(hits, of, max(0.0, centre - spread), min(1.0, centre + spread))
