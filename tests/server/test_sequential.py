"""Confidence sequences hold their error rate however often they are looked at: simulated A/A
experiments read every day call a difference no more often than 5%, where a fixed-sample
interval read as often calls one far more often; and an A/B's interval covers the true
difference at every look."""

from __future__ import annotations

import math
import random

from ghostpen.server.stats import (
    Sequential,
    sequential_difference,
    sequential_mean,
    sequential_quantile,
)

EXPERIMENTS = 400
DAYS = 20
PER_DAY = 60  # suggestions shown a day, per arm
ACCEPTANCE = 0.3


def simulated(seed: int, rate_b: float) -> tuple[list[list[float]], list[list[float]]]:
    rng = random.Random(seed)
    days_a = [[float(rng.random() < ACCEPTANCE) for _ in range(PER_DAY)] for _ in range(DAYS)]
    days_b = [[float(rng.random() < rate_b) for _ in range(PER_DAY)] for _ in range(DAYS)]
    return days_a, days_b


def fixed_sample(a: list[float], b: list[float]) -> Sequential:
    """The 95% interval of a test planned for one look, for contrast."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    se = math.sqrt(ma * (1 - ma) / len(a) + mb * (1 - mb) / len(b))
    return Sequential(mb - ma, mb - ma - 1.96 * se, mb - ma + 1.96 * se, len(a) + len(b))


def test_a_daily_look_at_an_aa_experiment_calls_a_difference_at_most_5_percent() -> None:
    called = naive_called = 0
    for seed in range(EXPERIMENTS):
        days_a, days_b = simulated(seed, ACCEPTANCE)
        a: list[float] = []
        b: list[float] = []
        sequential_once = naive_once = False
        for day_a, day_b in zip(days_a, days_b, strict=True):
            a += day_a
            b += day_b
            sequential_once |= sequential_difference(a, b).verdict() != "not yet known"
            naive_once |= fixed_sample(a, b).verdict() != "not yet known"
        called += sequential_once
        naive_called += naive_once
    assert called / EXPERIMENTS <= 0.05
    assert naive_called / EXPERIMENTS > 0.1  # peeking breaks the interval made for one look


def test_an_ab_interval_covers_the_true_difference_at_every_look() -> None:
    missed = found = 0
    for seed in range(EXPERIMENTS // 4):
        days_a, days_b = simulated(10_000 + seed, ACCEPTANCE + 0.1)
        a: list[float] = []
        b: list[float] = []
        for day_a, day_b in zip(days_a, days_b, strict=True):
            a += day_a
            b += day_b
            interval = sequential_difference(a, b)
            missed += not interval.low <= 0.1 <= interval.high
        found += interval.verdict() == "better"
    assert missed / (EXPERIMENTS // 4 * DAYS) <= 0.05
    assert found / (EXPERIMENTS // 4) > 0.8  # 1,200 a side find a 10-point lift


def test_a_mean_and_a_quantile_carry_their_intervals() -> None:
    rng = random.Random(7)
    values = [rng.gauss(100, 15) for _ in range(2_000)]
    mean = sequential_mean(values)
    assert mean.low < 100 < mean.high and mean.high - mean.low < 5
    median = sequential_quantile(values, 0.5)
    assert median.low < 100 < median.high and median.low <= median.estimate <= median.high
    few = sequential_mean(values[:5])
    assert (few.low, few.high) == (-math.inf, math.inf)  # too few to say anything
    assert few.verdict() == "not yet known" and "not yet known" in few.describe()
    worse = Sequential(-0.2, -0.3, -0.1, 100)
    assert (worse.verdict(), worse.verdict(lower_is_better=True)) == ("worse", "better")
