"""When an automatic request is worth sending: after the developer pauses, at a place a completion
can go.

The wait adapts to the developer's own rhythm, as Tabby's agent does: a pause is a gap longer
than their usual keystroke interval, scaled down where a completion is likely wanted (line end,
after an opener) and up where it is not.
"""

from __future__ import annotations

from collections import deque
from statistics import fmean

from ghostpen.editor_client.settings import ClientSettings

TYPICAL_INTERVAL_MS = 100.0  # assumed until enough keystrokes are seen
MIN_SAMPLES = 5
WINDOW = 50
PAUSE_MS = 1000.0  # gaps longer than this are thinking, not typing rhythm
TRIGGER_CHARACTERS = frozenset("([{.,:=> \n")
CLOSERS = frozenset(")]}\"'`;:, \t")


class AdaptiveDebounce:
    def __init__(self, settings: ClientSettings) -> None:
        self._settings = settings
        self._intervals: deque[float] = deque(maxlen=WINDOW)
        self._last_ms: float | None = None

    def keystroke(self, now_ms: float) -> None:
        if self._last_ms is not None and 0 < now_ms - self._last_ms <= PAUSE_MS:
            self._intervals.append(now_ms - self._last_ms)
        self._last_ms = now_ms

    @property
    def typical_interval_ms(self) -> float:
        if len(self._intervals) < MIN_SAMPLES:
            return TYPICAL_INTERVAL_MS
        return fmean(self._intervals)

    def delay_ms(self, line_before: str, line_after: str) -> float:
        """How long to wait for the next keystroke before sending a request here."""
        score = 0.0
        if line_before[-1:] in TRIGGER_CHARACTERS or not line_before.strip():
            score += 0.5
        if not line_after.strip():
            score += 0.5
        settings = self._settings
        rate = (
            settings.debounce_rate_max
            - (settings.debounce_rate_max - settings.debounce_rate_min) * score
        )
        wait = rate * self.typical_interval_ms
        return min(max(wait, settings.debounce_min_ms), settings.debounce_max_ms)


def automatic_request_allowed(line_before: str, line_after: str, max_chars_after: int) -> bool:
    """No automatic request in the middle of a word, nor with real text after the cursor."""
    if line_after[:1].isalnum() or line_after[:1] == "_":
        return False
    rest = line_after.rstrip("\r\n")
    return len(rest.strip()) <= max_chars_after or all(char in CLOSERS for char in rest)
