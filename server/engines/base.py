"""The one interface every engine implements, and the messages that cross it.

    engine = await LlamaCppEngine.start(settings, model_path)
    async for delta in engine.generate(EngineRequest("req-1", prompt, max_tokens=32)):
        print(delta.text, end="")

Cancelling the consuming task (or `await engine.abort(id)`) stops the work inside the engine,
not only the stream; abort is idempotent and quiet for finished or unknown ids.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass

from ghostpen.server.errors import InvalidInput


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt: str
    max_tokens: int  # stop strings and truncation are post-processing's: one place decides
    cache_key: str = ""  # whose prompts these are (a session): engines may keep a cache per key
    adapter: str = ""  # a LoRA adapter the engine has loaded, by name; "" for the base model
    deadline: float = 0.0  # time.monotonic() (system-wide) past which work is dropped; 0: none


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
    logprobs: tuple[float, ...] = ()  # natural log-probability of each token in `text`, if known
    upstream: str = ""  # the server that answered, for engines that forward (remote)
    moved_from: str = ""  # the session's own upstream, when it was down and `upstream` stood in


def check_adapter(adapter: str, loaded: Collection[str]) -> None:
    """InvalidInput unless `adapter` is "" (the base model) or one the engine loaded."""
    if adapter and adapter not in loaded:
        names = ", ".join(sorted(loaded)) or "none"
        raise InvalidInput(f"unknown adapter {adapter!r} (loaded: {names}; setting lora_adapters)")


STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class EngineStats:
    """What the engine's scheduler is doing, for metrics; counters are cumulative."""

    waiting: int = 0
    running: int = 0
    kv_tokens_used: int = 0
    kv_tokens_capacity: int = 0
    sequences_resident: int = 0
    evictions: int = 0
    tokens_prefilled: int = 0
    tokens_generated: int = 0
    steps: int = 0
    step_tokens: int = 0
    step_buckets: tuple[int, ...] = ()  # steps by tokens per step, counted in STEP_BUCKETS (+inf)
    restarts: int = 0  # of the engine process


class Engine(abc.ABC):
    name: str
    model_id: str

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        """Stream the completion; the last delta has finished=True."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop the request inside the engine, wherever it is (queued, prefilling, decoding)."""

    def watch(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(serving)` when the engine goes down or comes back; in-process engines
        never do (their crash is the server's)."""
        return None

    def stats(self) -> EngineStats:
        """The scheduler's state; engines that do not know it say nothing."""
        return EngineStats()

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the model; pending requests end."""
