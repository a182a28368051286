"""Split a file into chunks of whole lines that follow its syntax, once per file version.

Where tree-sitter has a grammar, chunks are built from syntactic units (functions, classes,
statements), descending into units longer than the window; leading comments and blank lines stay
with the unit that follows them. Elsewhere, and inside units with no smaller parts, fixed windows
of lines.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import tree_sitter

from ghostpen.context.languages import parser_for
from ghostpen.context.tokens import encode_tokens

READ_BYTES = 4096  # what the parser reads per callback
COMPARE_CHARS = 4096  # compared at once while looking for where two versions differ


@dataclass(frozen=True)
class Chunk:
    path: str
    start_line: int  # 0-based, inclusive
    end_line: int  # exclusive
    text: str
    tokens: str = field(repr=False)  # one character per token (see context.tokens)

    @classmethod
    def of(cls, path: str, start_line: int, end_line: int, text: str) -> Chunk:
        return cls(path, start_line, end_line, text, encode_tokens(text))


@dataclass(frozen=True)
class ChunkedFile:
    """One version's chunks, and its syntax tree so the next version parses incrementally."""

    chunks: tuple[Chunk, ...]
    tree: tree_sitter.Tree | None


def chunk_file(
    path: str, language: str, text: str, max_lines: int, previous: ChunkedFile | None = None
) -> ChunkedFile:
    """`previous`: an earlier version whose tree was brought up to date with `edit_tree`; its
    parse and its chunks' token sequences are reused where the text did not change."""
    lines = text.split("\n")
    parser = parser_for(language)
    tree = None
    if parser is None:
        spans = list(_windows(0, len(lines), max_lines))
    else:
        tree = _parse(parser, text.encode("utf-8"), previous.tree if previous else None)
        starts = sorted({start for start, _ in _units(tree.root_node, max_lines)} | {0})
        spans = _pack(starts, len(lines), max_lines)
    known = {chunk.text: chunk.tokens for chunk in previous.chunks} if previous else {}
    chunks = []
    for start, end in spans:
        chunk_text = "\n".join(lines[start:end])
        if not chunk_text.strip():
            continue
        tokens = known.get(chunk_text)
        if tokens is None:
            chunks.append(Chunk.of(path, start, end, chunk_text))
        else:
            chunks.append(Chunk(path, start, end, chunk_text, tokens))
    return ChunkedFile(tuple(chunks), tree)


def _parse(
    parser: tree_sitter.Parser, source: bytes, old_tree: tree_sitter.Tree | None
) -> tree_sitter.Tree:
    """Parse through Python callbacks, which let another thread take the GIL: a parse of a
    bytestring holds it throughout (~0.35 s a megabyte). The server parses only in its child
    processes; a caller with threads (an event loop beside) still gets turns, for the same
    parse time."""

    def read(offset: int, _point: tuple[int, int]) -> bytes:
        return source[offset : offset + READ_BYTES]

    def progress(*_state: object) -> bool:
        return False  # never cancel: the call is only a point to hand over the GIL

    if old_tree is None:
        return parser.parse(read, progress_callback=progress)
    return parser.parse(read, old_tree, progress_callback=progress)


@dataclass
class _Head:
    path: str
    language: str
    text: str
    chunked: ChunkedFile


class IncrementalChunker:
    """Chunks successive versions of files, keeping the last one chunked under each key (a
    session: its file being edited) with its tree, so that file's next version parses
    incrementally from the one edit that turns the old text into the new.

    A tree costs ~20 bytes per character of text: trees are kept for `max_chars` of text in
    all, least recently chunked out (such a file parses whole when it comes again)."""

    def __init__(self, max_lines: int, max_chars: int) -> None:
        self._max_lines = max_lines
        self._max_chars = max_chars
        self._heads: OrderedDict[str, _Head] = OrderedDict()
        self._chars = 0

    def chunk(self, key: str, path: str, language: str, text: str) -> tuple[Chunk, ...]:
        head = self._forget(key)
        previous = None
        if head is not None and (head.path, head.language) == (path, language):
            previous = head.chunked
            if previous.tree is not None:
                start, old_end, new_end = changed_span(head.text, text)
                edit_tree(previous.tree, head.text, start, old_end, text[start:new_end])
        chunked = chunk_file(path, language, text, self._max_lines, previous)
        self._heads[key] = _Head(path, language, text, chunked)
        self._chars += len(text)
        while self._chars > self._max_chars and len(self._heads) > 1:
            self._forget(next(iter(self._heads)))
        return chunked.chunks

    def forget(self, key: str) -> None:
        self._forget(key)

    def _forget(self, key: str) -> _Head | None:
        head = self._heads.pop(key, None)
        if head is not None:
            self._chars -= len(head.text)
        return head


def changed_span(old: str, new: str) -> tuple[int, int, int]:
    """(start, old_end, new_end): old[start:old_end] became new[start:new_end], the rest is
    equal. Compares COMPARE_CHARS at a time, then narrows down by halves: ~4 ms for a
    megabyte, where a loop over characters takes ~100 ms."""
    start = _common_prefix(old, new)
    room = min(len(old), len(new)) - start
    end = min(_common_prefix(old[::-1], new[::-1]), room)
    return start, len(old) - end, len(new) - end


def _common_prefix(a: str, b: str) -> int:
    limit = min(len(a), len(b))
    base = 0
    while base < limit and a[base : base + COMPARE_CHARS] == b[base : base + COMPARE_CHARS]:
        base += COMPARE_CHARS
    low, high = base, min(base + COMPARE_CHARS, limit)
    while low < high:  # a[base:low] == b[base:low]; they differ before high + 1
        middle = (low + high + 1) // 2
        if a[base:middle] == b[base:middle]:
            low = middle
        else:
            high = middle - 1
    return min(low, limit)


def edit_tree(tree: tree_sitter.Tree, text: str, start: int, end: int, new_text: str) -> None:
    """Tell the tree that text[start:end] (code points) became new_text."""
    start_byte, start_point = _position(text, start)
    old_end_byte, old_end_point = _position(text, end)
    new_end_byte, new_end_point = _position(text[:start] + new_text, start + len(new_text))
    tree.edit(
        start_byte=start_byte,
        old_end_byte=old_end_byte,
        new_end_byte=new_end_byte,
        start_point=start_point,
        old_end_point=old_end_point,
        new_end_point=new_end_point,
    )


def _position(text: str, offset: int) -> tuple[int, tuple[int, int]]:
    """Byte offset and (row, byte column) of a code-point offset, as tree-sitter counts them."""
    before = text[:offset]
    line_start = before.rfind("\n") + 1
    point = (before.count("\n"), len(before[line_start:].encode("utf-8")))
    return len(before.encode("utf-8")), point


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
