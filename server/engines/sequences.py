"""Which KV-cache sequence serves a request, and how much of it the request can reuse.

The llama.cpp engine keeps one sequence per session resident, so that a session's next keystroke
finds its prompt cached however many others typed in between. A session without a sequence of its
own takes a free one, or else the least recently used idle one, whose KV is evicted. Requests
without a session (stateless `Complete` calls) take the idle sequence that shares the longest
prefix with their prompt. Pure bookkeeping: the engine applies the KV operations it returns.
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
class Assignment:
    sequence: KvSequence
    reused: int  # leading prompt tokens already in the KV: keep [0, reused), read the rest
    evicted: bool  # another session's KV was dropped to make room


class SequenceTable:
    def __init__(self, count: int) -> None:
        self.sequences = [KvSequence(seq_id) for seq_id in range(count)]
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
        reused = _reusable(chosen, adapter, prompt)
        reused = min(reused, len(prompt) - 1)  # the last prompt token is read for its logits
        del chosen.tokens[reused:]
        chosen.adapter = adapter
        chosen.busy = True
        chosen.last_used = now
        return Assignment(chosen, reused, evicted)

    def release(self, sequence: KvSequence, now: float) -> None:
        sequence.busy = False
        sequence.last_used = now

    @property
    def tokens_used(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)

    @property
    def resident(self) -> int:
        return sum(1 for s in self.sequences if s.tokens)


def _reusable(sequence: KvSequence, adapter: str, prompt: Tokens[int]) -> int:
    if sequence.adapter != adapter:
        return 0
    common = 0
    for old, new in zip(sequence.tokens, prompt, strict=False):
        if old != new:
            break
        common += 1
    return common
