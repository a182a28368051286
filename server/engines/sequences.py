"""Which KV-cache sequence serves a request, and how much of it the request can reuse.

The llama.cpp engine keeps one sequence per session resident, so that a session's next keystroke
finds its prompt cached however many others typed in between. A session without a sequence of its
own takes a free one, or else the least recently used idle one, whose KV is evicted. Requests
without a session (stateless `Complete` calls) take the idle sequence that shares the longest
prefix with their prompt. Pure bookkeeping: the engine applies the KV operations it returns.

Past the shared prefix, a prompt whose early part moved (the prefix window's first lines dropped,
a context chunk gone) still holds runs of the old tokens further on. Runs of at least
`shift_min_tokens` are kept and shifted to their new positions instead of being read again, as
llama-server's `--cache-reuse` does: removal only, so the rest of the prompt stays one read. A
shifted run's KV was computed beside the text that is gone, so it is close to, not exactly, what
a fresh read gives; 0 turns shifting off.
"""

from __future__ import annotations

from collections.abc import Sequence as Tokens
from dataclasses import dataclass, field


@dataclass
class KvSequence:
    seq_id: int
    key: str = ""  # the session whose prompt the KV holds; "" for none
    adapter: str = ""  # KV computed under another adapter cannot be reused
    tokens: list[int] = field(default_factory=list)  # what the KV holds, in position order
    last_used: float = 0.0
    busy: bool = False


@dataclass(frozen=True)
class Shift:
    """Positions [start, end) of the KV move by `by` (< 0); what lay before them is dropped."""

    start: int
    end: int
    by: int


@dataclass(frozen=True)
class Assignment:
    sequence: KvSequence
    reused: int  # prompt tokens in the KV once `shifts` are applied: read the rest after them
    evicted: bool  # another session's KV was dropped to make room
    shifts: tuple[Shift, ...] = ()  # applied in order, after the shared prefix


class SequenceTable:
    def __init__(self, count: int, shift_min_tokens: int = 0) -> None:
        self.sequences = [KvSequence(seq_id) for seq_id in range(count)]
        self.shift_min_tokens = shift_min_tokens
        self._by_key: dict[str, KvSequence] = {}

    def assign(self, key: str, adapter: str, prompt: Tokens[int], now: float) -> Assignment | None:
        """The sequence for this request, marked busy; None while none is free for it (its
        session's sequence is still busy, or every sequence is)."""
        own = self._by_key.get(key) if key else None
        if own is not None:
            if own.busy:
                return None
            chosen, evicted = own, False
        else:
            idle = [s for s in self.sequences if not s.busy]
            if not idle:
                return None
            if key:  # an empty sequence first, then the least recently used
                chosen = min(idle, key=lambda s: (bool(s.tokens), s.last_used))
            else:  # the longest shared prefix, then the least recently used
                chosen = max(
                    idle, key=lambda s: (_reusable(s, adapter, prompt), not s.key, -s.last_used)
                )
            evicted = bool(chosen.tokens) and bool(chosen.key)
            if chosen.key:
                del self._by_key[chosen.key]
            chosen.key = key
            if key:
                self._by_key[key] = chosen
        limit = len(prompt) - 1  # the last prompt token is read for its logits
        reused = min(_reusable(chosen, adapter, prompt), limit)
        shifts: list[Shift] = []
        if self.shift_min_tokens and chosen.adapter == adapter:
            shifts, reused = _shifts(chosen.tokens, prompt[:limit], reused, self.shift_min_tokens)
        chosen.tokens[:] = prompt[:reused]
        chosen.adapter = adapter
        chosen.busy = True
        chosen.last_used = now
        return Assignment(chosen, reused, evicted, tuple(shifts))

    def release(self, sequence: KvSequence, now: float) -> None:
        sequence.busy = False
        sequence.last_used = now

    @property
    def tokens_used(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)

    @property
    def resident(self) -> int:
        return sum(1 for s in self.sequences if s.tokens)


def _shifts(
    cached: Tokens[int], prompt: Tokens[int], prefix: int, min_run: int
) -> tuple[list[Shift], int]:
    """Runs of `cached` after `prefix` that `prompt` continues with, in order; and the prompt
    tokens in the KV once they are shifted there."""
    shifts: list[Shift] = []
    head_c = head_p = prefix
    while head_c < len(cached) and head_p < len(prompt):
        run = 0
        while (
            head_c + run < len(cached)
            and head_p + run < len(prompt)
            and cached[head_c + run] == prompt[head_p + run]
        ):
            run += 1
        if run >= min_run:
            shifts.append(Shift(head_c, head_c + run, head_p - head_c))
            head_c += run
            head_p += run
        else:
            head_c += 1
    return shifts, head_p


def _reusable(sequence: KvSequence, adapter: str, prompt: Tokens[int]) -> int:
    if sequence.adapter != adapter:
        return 0
    common = 0
    for old, new in zip(sequence.tokens, prompt, strict=False):
        if old != new:
            break
        common += 1
    return common
