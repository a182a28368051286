"""Completions kept by where they were asked for, so that typing through one needs no request.

An entry is anchored by the file and its text before and after the cursor when it was asked
for. A later position matches when the text after is unchanged and the text before is the
anchor's plus characters the completion itself starts with: the rest of the completion is
shown as it is, without asking the server again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Anchor:
    path: str
    before: str  # the document's text before the cursor
    after: str  # ...and after it

    def typed_since(self, later: Anchor) -> str | None:
        """What was typed at this anchor to reach `later`, or None if `later` is elsewhere."""
        if later.path != self.path or later.after != self.after:
            return None
        if len(later.before) < len(self.before) or not later.before.startswith(self.before):
            return None
        return later.before[len(self.before) :]


@dataclass(frozen=True)
class Suggestion:
    completion_id: str
    text: str  # what is left to insert at the cursor
    source: str = "cache"  # or "server", or "in-flight" (a request sent before this keystroke)


class CompletionCache:
    def __init__(self, entries: int) -> None:
        self._entries: OrderedDict[Anchor, tuple[str, str]] = OrderedDict()
        self._max = entries

    def put(self, anchor: Anchor, completion_id: str, text: str) -> None:
        if not text or self._max <= 0:
            return
        self._entries[anchor] = (completion_id, text)
        self._entries.move_to_end(anchor)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def get(self, position: Anchor) -> Suggestion | None:
        """The newest entry this position types through, with what is left of it."""
        for anchor in reversed(self._entries):
            completion_id, text = self._entries[anchor]
            typed = anchor.typed_since(position)
            if typed is not None and len(typed) < len(text) and text.startswith(typed):
                return Suggestion(completion_id, text[len(typed) :])
        return None
