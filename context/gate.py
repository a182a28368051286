"""Whether a finished suggestion is worth showing.

A suggestion not shown costs nothing; one shown and rejected costs the developer attention, and
enough of them teach people to ignore ghost text. The gate withholds what is unlikely to be kept:
only blanks, only closing brackets and separators (the editor types those itself), lines the
file already has just above the cursor (the model copying instead of writing), and text the model
itself was unsure of, by the mean log-probability of its tokens.
"""

from __future__ import annotations

from ghostpen.context.postprocess import CursorSurroundings
from ghostpen.context.settings import ContextSettings

_CLOSERS = set(")]}>;,")
_REPEAT_WINDOW_LINES = 12  # lines above the cursor a copied line is looked for in


def confidence(logprobs: list[float]) -> float | None:
    """The mean log-probability of the tokens, or None if the engine gave none."""
    return sum(logprobs) / len(logprobs) if logprobs else None


def withhold_reason(
    text: str, cursor: CursorSurroundings, confidence: float | None, settings: ContextSettings
) -> str:
    """Why `text` should not be shown ("" to show it): blank, closers, repeats or unsure."""
    stripped = text.strip()
    if not stripped:
        return "blank"
    if set(stripped) <= _CLOSERS:
        return "closers"
    if _repeats(text, cursor):
        return "repeats"
    if confidence is not None and confidence < settings.show_min_confidence:
        return "unsure"
    return ""


def _repeats(text: str, cursor: CursorSurroundings) -> bool:
    """Every line of the suggestion, the cursor line's completed form first, is a line the file
    has just above the cursor."""
    lines = text.split("\n")
    lines[0] = cursor.line_prefix + lines[0]
    wanted = [line.strip() for line in lines if line.strip()]
    above = cursor.prefix_tail.split("\n")[:-1][-_REPEAT_WINDOW_LINES:]
    seen = {line.strip() for line in above}
    return bool(wanted) and all(line in seen for line in wanted)
