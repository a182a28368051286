"""Split a file into chunks of whole lines that follow its syntax, once per file version.

Where tree-sitter has a grammar, chunks are built from syntactic units (functions, classes,
statements), descending into units longer than the window; leading comments and blank lines stay
with the unit that follows them. Elsewhere, and inside units with no smaller parts, fixed windows
of lines.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import tree_sitter

from context.languages import parser_for


@dataclass(frozen=True)
class Chunk:
    path: str
    start_line: int  # 0-based, inclusive
    end_line: int  # exclusive
    text: str


def chunk_file(path: str, language: str, text: str, max_lines: int) -> tuple[Chunk, ...]:
    lines = text.split("\n")
    parser = parser_for(language)
    if parser is None:
        spans = list(_windows(0, len(lines), max_lines))
    else:
        tree = parser.parse(text.encode("utf-8"))
        starts = sorted({start for start, _ in _units(tree.root_node, max_lines)} | {0})
        spans = _pack(starts, len(lines), max_lines)
    return tuple(
        Chunk(path, start, end, "\n".join(lines[start:end]))
        for start, end in spans
        if any(line.strip() for line in lines[start:end])
    )


def _units(node: tree_sitter.Node, max_lines: int) -> Iterator[tuple[int, int]]:
    """Line spans of the syntactic units under node, each at most max_lines long where possible."""
    for child in node.named_children:
        start, end = child.start_point.row, child.end_point.row + 1
        if end - start <= max_lines:
            yield start, end
        elif child.named_child_count:
            yield start, start + 1
            yield from _units(child, max_lines)
        else:
            yield from _windows(start, end, max_lines)


def _windows(start: int, end: int, size: int) -> Iterator[tuple[int, int]]:
    for first in range(start, end, size):
        yield first, min(first + size, end)


def _pack(starts: list[int], line_count: int, max_lines: int) -> list[tuple[int, int]]:
    """Join consecutive units into chunks of at most max_lines lines (a longer unit stays whole)."""
    bounds = [*starts, line_count]
    spans: list[tuple[int, int]] = []
    chunk_start = bounds[0]
    for unit_start, unit_end in itertools.pairwise(bounds):
        if unit_end - chunk_start > max_lines and unit_start > chunk_start:
            spans.append((chunk_start, unit_start))
            chunk_start = unit_start
        if unit_end - chunk_start > max_lines:
            spans.extend(_windows(chunk_start, unit_end, max_lines))
            chunk_start = unit_end
    if chunk_start < line_count:
        spans.append((chunk_start, line_count))
    return spans
