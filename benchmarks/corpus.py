"""Real source files the benchmarks read: the Python standard library on this machine."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_files(min_lines: int, max_lines: int, count: int) -> list[Path]:
    """The first `count` stdlib modules (by name) whose length is in the range."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen = []
    for path in sorted(root.glob("*.py")):
        lines = path.read_text(encoding="utf-8", errors="replace").count("\n")
        if min_lines <= lines <= max_lines:
            chosen.append(path)
        if len(chosen) == count:
            break
    return chosen


def percentiles(values: list[float], points: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    ordered = sorted(values)
    result = {
        f"p{p}": ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] for p in points
    }
    result["max"] = ordered[-1]
    result["n"] = len(ordered)
    return result


def percentile_cells(values: dict[str, float] | None) -> str:
    """p50 / p90 / p99 for a Markdown cell; "-" when nothing was measured."""
    if not values:
        return "-"
    return " / ".join(f"{values[p]:,.0f}" for p in ("p50", "p90", "p99"))
