"""How much of an accepted completion is still in the file 15 s, 30 s, 2 min, 5 min and 10 min on.

Measured where the truth is, in the editor. The accepted text is looked for near where it was
inserted (its offset kept up to date through edits above it), then in the whole file; the
retained fraction is 1 - normalized Levenshtein distance to the best-matching span, and the
completion counts as present while at least half of it survives. That span is also the
developer's correction of the completion: what the accepted text became.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rapidfuzz import fuzz
from rapidfuzz.distance import Levenshtein

INTERVALS_S = (15, 30, 120, 300, 600)
PRESENT_AT = 0.5


@dataclass(frozen=True)
class RetentionCheck:
    completion_id: str
    after_s: int
    retained_fraction: float
    present: bool
    file_closed: bool
    final_text: str  # the best-matching span: the accepted text as it is now


@dataclass
class _Accepted:
    completion_id: str
    path: str
    text: str
    offset: int
    accepted_at: float
    due: list[int] = field(default_factory=lambda: list(INTERVALS_S))
    closed_text: str | None = None


class RetentionTracker:
    """Feed it acceptances and edits; call `check_due` now and then (a timer, each edit)."""

    def __init__(
        self,
        clock: Callable[[], float],
        report: Callable[[RetentionCheck], None],
        search_margin: int = 256,
    ) -> None:
        self._clock = clock
        self._report = report
        self._margin = search_margin
        self._tracked: list[_Accepted] = []

    def accepted(self, completion_id: str, path: str, offset: int, text: str) -> None:
        if text:
            self._tracked.append(_Accepted(completion_id, path, text, offset, self._clock()))

    def edited(self, path: str, start: int, end: int, new_text: str) -> None:
        """text[start:end] of `path` became new_text: edits wholly before a completion move it."""
        shift = len(new_text) - (end - start)
        for item in self._tracked:
            if item.path == path and item.closed_text is None and end <= item.offset:
                item.offset = max(0, item.offset + shift)

    def closed(self, path: str, last_text: str) -> None:
        """The file is closed: its remaining checks are made on the text it had then."""
        for item in self._tracked:
            if item.path == path and item.closed_text is None:
                item.closed_text = last_text

    def check_due(self, text_of: Callable[[str], str | None]) -> None:
        """Report every check whose time has come. `text_of(path)`: the open file's text."""
        now = self._clock()
        for item in self._tracked:
            while item.due and now - item.accepted_at >= item.due[0]:
                after_s = item.due.pop(0)
                text = item.closed_text if item.closed_text is not None else text_of(item.path)
                closed = item.closed_text is not None or text is None
                fraction, span = best_match(item.text, text or "", item.offset, self._margin)
                self._report(
                    RetentionCheck(
                        item.completion_id, after_s, fraction, fraction >= PRESENT_AT, closed, span
                    )
                )
        self._tracked = [item for item in self._tracked if item.due]

    def abandon(self) -> list[tuple[str, int]]:
        """Drop every pending check (the client is stopping; nothing survives a restart).
        Returns (completion_id, after_s) of each, so the caller can say what was lost."""
        dropped = [(item.completion_id, after) for item in self._tracked for after in item.due]
        self._tracked = []
        return dropped

    @property
    def pending(self) -> int:
        return sum(len(item.due) for item in self._tracked)


def best_match(accepted: str, text: str, offset: int, margin: int) -> tuple[float, str]:
    """The span of `text` most like the accepted text, near offset first, and its similarity."""
    best, best_span = 0.0, ""
    for width in (margin, len(text)):
        low, high = max(0, offset - width), min(len(text), offset + len(accepted) + width)
        window = text[low:high]
        if not window:
            continue
        alignment = fuzz.partial_ratio_alignment(accepted, window)
        start, end = alignment.dest_start, alignment.dest_end
        # The aligned span has the accepted text's length; an edit that lengthened or shortened
        # it shows better against the span to the end of its line, or the whole lines it touches.
        line_start = window.rfind("\n", 0, start) + 1
        line_end = window.find("\n", max(start, end - 1))
        line_end = len(window) if line_end < 0 else line_end + accepted.endswith("\n")
        # The tracked offset, where it falls on the span's first line, is where the text began.
        anchor = offset - low if line_start <= offset - low < end else start
        for span in (window[start:end], window[anchor:line_end], window[line_start:line_end]):
            similarity = Levenshtein.normalized_similarity(accepted, span)
            if similarity > best:
                best, best_span = similarity, span
        if best >= PRESENT_AT:
            break
    return best, best_span
