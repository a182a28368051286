"""Latency percentiles against concurrency as a standalone SVG, written beside a sweep's JSON
(no plotting library: the numbers are few and the file must open anywhere)."""

from __future__ import annotations

import math
from collections.abc import Sequence

COLORS = {"p50": "#3660d9", "p90": "#e8a33d", "p99": "#c4314b"}
WIDTH, HEIGHT = 560, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 110, 30, 44


def latency_chart(title: str, xs: Sequence[int], series: dict[str, Sequence[float | None]]) -> str:
    """One line per percentile; x on a log-2 scale (1, 2, 4 ... sessions), y in ms on a log scale
    so that both the fast and the queued points read."""
    values = [v for line in series.values() for v in line if v]
    if not xs or not values:
        return _svg(title, "")
    low, high = math.log10(min(values)), math.log10(max(values))
    high = high if high > low else low + 1
    x_low, x_high = math.log2(min(xs)), math.log2(max(xs))
    x_span = x_high - x_low or 1

    def point(x: int, y: float) -> tuple[float, float]:
        px = LEFT + (math.log2(x) - x_low) / x_span * (WIDTH - LEFT - RIGHT)
        py = HEIGHT - BOTTOM - (math.log10(y) - low) / (high - low) * (HEIGHT - TOP - BOTTOM)
        return px, py

    parts = []
    for decade in range(math.floor(low), math.ceil(high) + 1):
        y = 10.0**decade
        if not low - 1e-9 <= decade <= high + 1e-9:
            continue
        _, py = point(xs[0], y)
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py:.1f}" y2="{py:.1f}" stroke="#e3e6ec"/>'
            f'<text x="{LEFT - 6}" y="{py + 4:.1f}" font-size="11" text-anchor="end">'
            f"{y:,.0f} ms</text>"
        )
    for x in xs:
        px, _ = point(x, 10**low)
        parts.append(
            f'<text x="{px:.1f}" y="{HEIGHT - BOTTOM + 16}" font-size="11" '
            f'text-anchor="middle">{x}</text>'
        )
    parts.append(
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 8}" font-size="12" '
        'text-anchor="middle">concurrent sessions</text>'
    )
    for row, (name, line) in enumerate(series.items()):
        color = COLORS.get(name, "#555")
        known = [point(x, y) for x, y in zip(xs, line, strict=True) if y]
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in known)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        parts.extend(
            f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{color}"/>' for px, py in known
        )
        parts.append(
            f'<text x="{WIDTH - RIGHT + 12}" y="{TOP + 16 + row * 18}" font-size="12" '
            f'fill="{color}">{name}</text>'
        )
    return _svg(title, "".join(parts))


def _svg(title: str, body: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>'
        f'<text x="{LEFT}" y="18" font-size="13">{title}</text>{body}</svg>\n'
    )
