"""Confidence intervals for the evaluation and for experiments.

Offline: paired bootstrap. Two variants scored on the same tasks differ by the mean of their
per-task differences; resampling tasks with replacement gives its 95% interval. Pairing removes
the variance between tasks, which dwarfs that between variants. Tasks cut from one file are alike
(the same code, the same style), so where they are grouped so, whole files are resampled: a
cluster bootstrap, whose interval does not pretend that ten cuts of one file are ten files. A
share on its own (a precision, a recall) gets Wilson's score interval.

Online (experiments): confidence sequences, which stay valid however often they are looked at,
so that a dashboard read every day does not turn noise into a verdict. The normal mixture
boundary of Robbins, as the mixture sequential probability ratio test uses it (Johari, Koomen,
Pekelis and Walsh, "Peeking at A/B tests", KDD 2017): an estimate with variance V lies within
sqrt(V (V + tau^2) / tau^2 * (log((V + tau^2) / V) - 2 log alpha)) of the truth at every sample
size at once, with probability 1 - alpha. tau, the spread of effects the test is tuned to, is
MIXTURE_SCALE standard deviations of one observation.
"""

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
    a: Sequence[float],
    b: Sequence[float],
    resamples: int = RESAMPLES,
    seed: int = 0,
    clusters: Sequence[str] | None = None,
) -> Difference:
    """The mean of b - a over paired tasks, with its percentile bootstrap interval; with
    `clusters` (a task's group, such as its file), groups are resampled whole."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples must be the same non-zero length: {len(a)}, {len(b)}")
    differences = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rng = np.random.default_rng(seed)
    if clusters is None:
        picks = rng.integers(
            0, len(differences), size=(resamples, len(differences)), dtype=np.int32
        )
        means = differences[picks].mean(axis=1)
    else:
        if len(clusters) != len(differences):
            raise ValueError(f"one cluster a task: {len(clusters)} for {len(differences)}")
        _, group = np.unique(np.asarray(clusters), return_inverse=True)
        sums, counts = np.bincount(group, weights=differences), np.bincount(group)
        picks = rng.integers(0, len(sums), size=(resamples, len(sums)))
        means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
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


MIXTURE_SCALE = 0.1  # tau, in standard deviations of one observation: effects of this size
MIN_OBSERVATIONS = 10  # per arm, before an interval is more than (-inf, inf)


@dataclass(frozen=True)
class Sequential:
    """An estimate with its 95% confidence sequence: valid at every look."""

    estimate: float
    low: float
    high: float
    count: int

    def verdict(self, lower_is_better: bool = False) -> str:
        """Of a difference (arm minus control): better, worse, or not yet known."""
        if self.low > 0 or self.high < 0:
            return "better" if (self.low > 0) != lower_is_better else "worse"
        return "not yet known"

    def describe(self, digits: int = 3) -> str:
        if not math.isfinite(self.low):
            return f"{self.estimate:.{digits}f} (CI not yet known, n={self.count})"
        return (
            f"{self.estimate:.{digits}f} (CI {self.low:.{digits}f} to {self.high:.{digits}f}, "
            f"n={self.count})"
        )


def boundary(variance: float, tau2: float, alpha: float = 1 - CONFIDENCE) -> float:
    """The normal mixture's half-width for an estimate of this variance."""
    if variance <= 0 or tau2 <= 0:
        return 0.0 if variance <= 0 else math.inf
    ratio = (variance + tau2) / variance
    return math.sqrt(variance * (variance + tau2) / tau2 * (math.log(ratio) - 2 * math.log(alpha)))


def sequential_mean(values: Sequence[float]) -> Sequential:
    """The mean, with its confidence sequence."""
    n = len(values)
    mean = sum(values) / n if n else 0.0
    if n < MIN_OBSERVATIONS:
        return Sequential(mean, -math.inf, math.inf, n)
    sd2 = _variance(values)
    width = boundary(sd2 / n, MIXTURE_SCALE**2 * sd2)
    return Sequential(mean, mean - width, mean + width, n)


def sequential_difference(a: Sequence[float], b: Sequence[float]) -> Sequential:
    """mean(b) - mean(a) of two independent samples (two arms), with its confidence sequence."""
    difference = (sum(b) / len(b) if b else 0.0) - (sum(a) / len(a) if a else 0.0)
    if min(len(a), len(b)) < MIN_OBSERVATIONS:
        return Sequential(difference, -math.inf, math.inf, len(a) + len(b))
    va, vb = _variance(a), _variance(b)
    pooled = (va * (len(a) - 1) + vb * (len(b) - 1)) / (len(a) + len(b) - 2)
    width = boundary(va / len(a) + vb / len(b), MIXTURE_SCALE**2 * pooled)
    return Sequential(difference, difference - width, difference + width, len(a) + len(b))


def sequential_quantile(values: Sequence[float], level: float) -> Sequential:
    """The `level` quantile, its interval from the confidence sequence of the share of values
    below it (the order statistics whose ranks bound that share)."""
    ordered = sorted(values)
    n = len(ordered)
    if n < MIN_OBSERVATIONS:
        estimate = ordered[min(n - 1, int(level * n))] if n else 0.0
        return Sequential(estimate, -math.inf, math.inf, n)
    share_variance = level * (1 - level)
    width = boundary(share_variance / n, MIXTURE_SCALE**2 * share_variance)
    low_rank, high_rank = math.floor(n * (level - width)), math.ceil(n * (level + width))
    return Sequential(
        ordered[min(n - 1, int(level * n))],
        ordered[low_rank] if low_rank >= 0 else -math.inf,
        ordered[high_rank] if high_rank < n else math.inf,
        n,
    )


def _variance(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)
