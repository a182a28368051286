"""A scripted engine for tests about the code around an engine: the session, the servicer's
edge, the telemetry path. Tests about engines use the real ones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ghostpen.server.engines.base import Engine, EngineDelta, EngineRequest


class ScriptedEngine(Engine):
    """Yields `text` a character at a time, `delay` apart, each with log-probability `logprob`
    if one is given; or fails when told to."""

    name = "scripted"
    model_id = "scripted-model"

    def __init__(
        self, text: str, delay: float = 0.0, fail: bool = False, logprob: float | None = None
    ) -> None:
        self.text, self.delay, self.fail = text, delay, fail
        self.logprobs = () if logprob is None else (logprob,)
        self.closed: list[str] = []
        self.streaming = asyncio.Event()  # set once a consumer has taken a delta

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        try:
            if self.fail:
                raise RuntimeError("device lost")
            for count, char in enumerate(self.text, 1):
                await asyncio.sleep(self.delay)
                yield EngineDelta(char, count, 10, 0.0, logprobs=self.logprobs)
                self.streaming.set()
            yield EngineDelta("", len(self.text), 10, 0.0, finished=True)
        finally:
            self.closed.append(request.request_id)

    async def abort(self, request_id: str) -> None:
        pass

    async def close(self) -> None:
        pass
