"""The one interface every engine implements, and the messages that cross it.

    engine = await LlamaCppEngine.start(settings, model_path)
    async for delta in engine.generate(EngineRequest("req-1", prompt, max_tokens=32)):
        print(delta.text, end="")

Cancelling the consuming task (or `await engine.abort(id)`) stops the work inside the engine,
not only the stream; abort is idempotent and quiet for finished or unknown ids.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt: str
    max_tokens: int  # stop strings and truncation are post-processing's: one place decides
    cache_key: str = ""  # whose prompts these are (a session): engines may keep a cache per key


@dataclass(frozen=True)
class EngineDelta:
    text: str
    completion_tokens: int  # total so far
    prompt_tokens: int
    queue_s: float  # time waiting for the engine before work began (same on every delta)
    finished: bool = False
    length_limited: bool = False  # finished because max_tokens was reached
    aborted: bool = False  # finished because abort() stopped it
    cached_tokens: int = 0  # prompt tokens reused from the engine's prefix cache


class Engine(abc.ABC):
    name: str
    model_id: str

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        """Stream the completion; the last delta has finished=True."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop the request inside the engine, wherever it is (queued, prefilling, decoding)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the model; pending requests end."""
