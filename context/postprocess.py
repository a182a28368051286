"""Decide how much of the model's text to keep, while it streams.

A chain of small filters, each `(text, cursor) -> Cut | None`, looks at everything generated so
far; the first that wants the completion to end says where. `Truncator` runs the chain on each
delta and releases only text no later filter can take back, so streaming never shows text that
the final completion drops.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

from ghostpen.context.languages import parser_for

_BLOCK_OPENERS = (":", "{", "(", "[", "=>", "->", " do", " then")
_BLOCK_CLOSERS = ("}", ")", "]", "end")
# Statements after which nothing more at their own level runs: a line there is unreachable.
_BLOCK_LEAVERS = re.compile(r"(return|raise|throw|break|continue)\b")
_SYNTAX_CONTEXT_LINES = 80
# A line repeated within one completion is a loop (a small model's greedy decoding falls into
# them: `shutil.rmtree(name)` twenty times). Shorter lines repeat in real code (`pass`, `}`).
_REPEAT_MIN_CHARS = 10


class Mode(Enum):
    AUTO = "auto"
    SINGLE_LINE = "single_line"
    MULTI_LINE = "multi_line"


class Finish(Enum):
    STOP = "stop"
    LENGTH = "length"
    LINE_END = "line_end"
    BLOCK_END = "block_end"
    SUFFIX_OVERLAP = "suffix_overlap"
    REPETITION = "repetition"  # the model wrote a line of its own again
    CANCELLED = "cancelled"
    WITHHELD = "withheld"  # the show gate's verdict (gate.py), not the model's


@dataclass(frozen=True)
class CursorSurroundings:
    """What post-processing needs to know about the text around the cursor."""

    mode: Mode  # SINGLE_LINE or MULTI_LINE, never AUTO
    line_prefix: str  # the cursor line up to the cursor
    line_suffix: str  # the cursor line after the cursor
    next_line: str  # the first non-blank line after the cursor line, stripped
    stop: tuple[str, ...]
    language: str = ""
    prefix_tail: str = ""  # the last lines before the cursor, for a syntax check

    @classmethod
    def around(
        cls, prefix: str, suffix: str, mode: Mode, stop: tuple[str, ...], language: str = ""
    ) -> CursorSurroundings:
        line_prefix = prefix[prefix.rfind("\n") + 1 :]
        line_suffix, _, rest = suffix.partition("\n")
        next_line = next((line.strip() for line in rest.split("\n") if line.strip()), "")
        resolved = resolve_mode(mode, line_prefix, line_suffix)
        tail = "\n".join(prefix.split("\n")[-_SYNTAX_CONTEXT_LINES:])
        return cls(resolved, line_prefix, line_suffix, next_line, stop, language, tail)


@dataclass(frozen=True)
class Cut:
    length: int  # keep text[:length]
    finish: Finish


def resolve_mode(mode: Mode, line_prefix: str, line_suffix: str) -> Mode:
    """Auto: several lines on an empty line or right after a block opener, else one."""
    if mode is not Mode.AUTO:
        return mode
    if line_suffix.strip():
        return Mode.SINGLE_LINE
    stripped = line_prefix.rstrip()
    if not stripped or stripped.endswith(_BLOCK_OPENERS):
        return Mode.MULTI_LINE
    return Mode.SINGLE_LINE


def _indent(line: str) -> int:
    expanded = line.expandtabs(4)
    return len(expanded) - len(expanded.lstrip())


def cut_at_stop_string(text: str, cursor: CursorSurroundings) -> Cut | None:
    found = [index for stop in cursor.stop if (index := text.find(stop)) >= 0]
    return Cut(min(found), Finish.STOP) if found else None


def cut_at_line_end(text: str, cursor: CursorSurroundings) -> Cut | None:
    if cursor.mode is Mode.SINGLE_LINE and "\n" in text:
        return Cut(text.index("\n"), Finish.LINE_END)
    return None


def cut_at_block_end(text: str, cursor: CursorSurroundings) -> Cut | None:
    """Indentation rules: a line that dedents below the cursor line ends the block. After code on
    the cursor line (`if ready:`), one that comes back to its level after going deeper ends it
    too, the opened block being done (a closing bracket is kept as its last line). On a line of
    only indentation the block being written is the enclosing one, nested blocks and all."""
    if cursor.mode is not Mode.MULTI_LINE:
        return None
    base = _indent(cursor.line_prefix)
    opened = bool(cursor.line_prefix.strip())
    went_deeper = False
    offset = text.find("\n") + 1
    if offset == 0:
        return None
    for line in text[offset:].split("\n")[:-1]:  # complete lines only
        end = offset + len(line)
        if line.strip():
            indent = _indent(line)
            if indent < base:
                return Cut(offset - 1, Finish.BLOCK_END)
            if indent == base and went_deeper and opened:
                if line.strip().startswith(_BLOCK_CLOSERS):
                    return Cut(end, Finish.BLOCK_END)
                return Cut(offset - 1, Finish.BLOCK_END)
            went_deeper = went_deeper or indent > base
        offset = end + 1
    return None


def cut_at_unreachable(text: str, cursor: CursorSurroundings) -> Cut | None:
    """A line at the level of a `return` (`raise`, `throw`, `break`, `continue`) before it would
    never run: the block ended there and the model went on (`return input.upper()` and then a
    comment and another `return`). Deeper lines (the rest of the statement) and closing brackets
    are kept."""
    if cursor.mode is not Mode.MULTI_LINE:
        return None
    level = None
    for offset, _, whole in _complete_lines(text, cursor):
        code = whole.strip()
        if code:
            indent = _indent(whole)
            if indent == level and not code.startswith(_BLOCK_CLOSERS):
                return Cut(max(offset - 1, 0), Finish.BLOCK_END)
            if level is not None and indent < level:
                level = None  # the block it left has ended: `elif`, `}`
            if level is None and _BLOCK_LEAVERS.match(code):
                level = indent
    return None


def cut_at_syntax_block_end(text: str, cursor: CursorSurroundings) -> Cut | None:
    """Where tree-sitter knows the language: the innermost construct that began before the cursor
    and ends, at the end of a line, inside the completion is the block being completed; text
    after it is the model going on to something else."""
    if cursor.mode is not Mode.MULTI_LINE:
        return None
    length = _syntax_block_end(cursor.language, cursor.prefix_tail, text[: text.rfind("\n") + 1])
    return None if length is None else Cut(length, Finish.BLOCK_END)


@lru_cache(maxsize=32)
def _syntax_block_end(language: str, prefix_tail: str, complete: str) -> int | None:
    """Cached: deltas that complete no new line ask the same question again."""
    parser = parser_for(language)
    if parser is None or not complete[:-1].strip():
        return None
    head = prefix_tail.encode("utf-8")
    source = head + complete.encode("utf-8")
    start = len(head)
    node = parser.parse(source).root_node.named_descendant_for_byte_range(start, start)
    while node is not None and node.parent is not None:
        ends_inside = node.start_byte < start < node.end_byte < len(source)
        if ends_inside and not node.has_error:
            line_end = source.find(b"\n", node.end_byte)
            if not source[node.end_byte : line_end].strip() and source[line_end:].strip():
                return len(source[start:line_end].decode("utf-8"))
        node = node.parent
    return None


def cut_at_suffix_repeat(text: str, cursor: CursorSurroundings) -> Cut | None:
    """A completed line that is the first line after the cursor: the model is repeating the file."""
    if len(cursor.next_line) < 3:
        return None
    offset = text.find("\n") + 1
    if offset == 0:
        return None
    for line in text[offset:].split("\n")[:-1]:
        if line.strip() == cursor.next_line:
            return Cut(offset - 1, Finish.SUFFIX_OVERLAP)
        offset += len(line) + 1
    return None


def cut_at_repeated_line(text: str, cursor: CursorSurroundings) -> Cut | None:
    """A completed line that the completion already wrote, indentation and all: the model is
    looping. The completion ends before it (a line not yet shown: each is cut as it completes)."""
    seen: set[str] = set()
    for offset, line, whole in _complete_lines(text, cursor):
        if len(line.strip()) >= _REPEAT_MIN_CHARS:
            if whole in seen:
                return Cut(max(offset - 1, 0), Finish.REPETITION)
            seen.add(whole)
    return None


def _complete_lines(text: str, cursor: CursorSurroundings) -> Iterator[tuple[int, str, str]]:
    """Each complete line of the completion: where it starts, the line, and the line whole (the
    first with the cursor line's text before it)."""
    offset = 0
    for number, line in enumerate(text.split("\n")[:-1]):
        yield offset, line, cursor.line_prefix + line if number == 0 else line
        offset += len(line) + 1


Filter = Callable[[str, CursorSurroundings], Cut | None]
FILTERS: tuple[Filter, ...] = (
    cut_at_stop_string,
    cut_at_line_end,
    cut_at_suffix_repeat,
    cut_at_repeated_line,
    cut_at_block_end,
    cut_at_unreachable,
    cut_at_syntax_block_end,
)


def first_cut(text: str, cursor: CursorSurroundings) -> Cut | None:
    """The earliest cut any filter asks for."""
    cuts = [cut for check in FILTERS if (cut := check(text, cursor)) is not None]
    return min(cuts, key=lambda cut: cut.length) if cuts else None


def finalize(text: str, cursor: CursorSurroundings) -> tuple[str, bool]:
    """Trim the finished text: trailing blank space, and the end of the cursor line that the
    model wrote again (`foo(` + `x)` with `)` after the cursor). True if the suffix was trimmed."""
    text = text.rstrip() if "\n" in text else text.rstrip("\n")
    tail = cursor.line_suffix.strip()
    if tail and "\n" not in text and text.rstrip().endswith(tail):
        return text.rstrip()[: -len(tail)], True
    return text, False


def _partial_stop(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of text that may be the start of a stop string."""
    return max(
        (k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
        default=0,
    )


class Truncator:
    """Feeds streamed deltas through the filters; says what may be shown now and when to stop."""

    def __init__(self, cursor: CursorSurroundings, healed: str = "") -> None:
        self._cursor = cursor
        self._suffix_holdback = len(cursor.line_suffix.strip())
        self._raw = ""
        self._released = 0
        self._healing = healed  # blanks the prompt left out, which the model writes first
        self._held = ""
        self.finish: Finish | None = None

    def feed(self, delta: str) -> str:
        """Text that is safe to show now. After a cut, `finish` is set and the rest is ignored."""
        if self.finish is not None:
            return ""
        self._raw += self._heal(delta)
        cut = first_cut(self._raw, self._cursor)
        if cut is not None:
            self._raw = self._raw[: cut.length]
            self.finish = cut.finish
            return ""
        holdback = max(self._suffix_holdback, _partial_stop(self._raw, self._cursor.stop))
        stable = len(self._raw.rstrip()) - holdback
        last_newline = self._raw.rfind("\n")
        if self._cursor.mode is Mode.MULTI_LINE and last_newline >= 0:
            stable = min(stable, last_newline)  # the unfinished line may still be cut
        stable = len(self._raw[: max(stable, 0)].rstrip())  # trailing blanks may yet be trimmed
        return self._release(stable)

    def close(self, finish: Finish) -> tuple[str, Finish]:
        """The rest of the completion once generation ended, and why it ended."""
        text, trimmed = finalize(self._raw, self._cursor)
        reason = self.finish or (Finish.SUFFIX_OVERLAP if trimmed else finish)
        self.finish = reason
        return self._release(len(text), text), reason

    @property
    def text(self) -> str:
        return self._raw[: self._released]

    def _heal(self, delta: str) -> str:
        """The stream without the indentation the cursor already has: the model's first blanks,
        up to the prompt's left-out indentation (all of them if it wrote fewer)."""
        if not self._healing:
            return delta
        held = self._held + delta
        blanks = len(held) - len(held.lstrip(" \t"))
        if blanks == len(held) and blanks < len(self._healing):
            self._held = held  # only blanks so far: the indentation may go on
            return ""
        cut = min(blanks, len(self._healing))
        self._healing = self._held = ""
        return held[cut:]

    def _release(self, upto: int, source: str | None = None) -> str:
        source = self._raw if source is None else source
        if upto <= self._released:
            return ""
        out = source[self._released : upto]
        self._released = upto
        return out
