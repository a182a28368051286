"""The llama.cpp engine on its own: streaming, and stopping work wherever a request is."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

from server.engines.base import EngineRequest

COUNT_PROMPT = "<|fim_prefix|>numbers = [\n    1,\n    2,\n    3,\n<|fim_suffix|>]\n<|fim_middle|>"


async def test_generate_streams_until_max_tokens(server) -> None:
    engine = server.engine
    deltas = [d async for d in engine.generate(EngineRequest("g1", COUNT_PROMPT, max_tokens=6))]
    assert deltas[-1].finished and deltas[-1].length_limited
    assert [d.completion_tokens for d in deltas[:-1]] == list(range(1, 7))
    assert all(d.prompt_tokens == deltas[0].prompt_tokens > 10 for d in deltas)
    assert "4," in "".join(d.text for d in deltas)


async def test_abort_stops_decoding_and_ends_the_stream(server) -> None:
    engine = server.engine
    before = engine.tokens_generated
    seen = []
    async for delta in engine.generate(EngineRequest("a1", COUNT_PROMPT, max_tokens=300)):
        seen.append(delta)
        if len(seen) == 3:
            await engine.abort("a1")
    assert seen[-1].finished and seen[-1].aborted
    # The three seen, at most one queued behind them, and the one being decoded when abort came.
    assert engine.tokens_generated - before <= 5
    await engine.abort("a1")  # idempotent, quiet for finished ids
    await engine.abort("never-seen")


async def test_closing_the_stream_stops_the_engine(server) -> None:
    engine = server.engine
    before = engine.tokens_generated
    async with aclosing(engine.generate(EngineRequest("c1", COUNT_PROMPT, 300))) as deltas:
        async for _ in deltas:
            break
    await asyncio.sleep(0.3)
    assert engine.tokens_generated - before <= 3  # one seen, one queued, one being decoded


async def test_a_stale_prompt_stops_between_prefill_batches(server) -> None:
    engine = server.engine
    long_prompt = "".join(f"value_{i} = compute_{i}(data)\n" for i in range(100)) + "value_100 ="
    before = engine.tokens_prefilled
    task = asyncio.create_task(_drain(engine.generate(EngineRequest("p1", long_prompt, 5))))
    for _ in range(500):  # until the first batch is read
        if engine.tokens_prefilled > before or task.done():
            break
        await asyncio.sleep(0.01)
    await engine.abort("p1")
    last = await task
    assert last.aborted
    assert 0 < engine.tokens_prefilled - before < last.prompt_tokens / 2


async def _drain(stream):
    return [delta async for delta in stream][-1]


async def test_sessions_taking_turns_keep_their_own_prompt_cache(server) -> None:
    engine = server.engine
    first = "".join(f"alpha_{i} = load_alpha({i})\n" for i in range(40))
    second = "".join(f"beta_{i} = load_beta({i})\n" for i in range(40))

    async def last(prompt: str, key: str):
        return [d async for d in engine.generate(EngineRequest(key + "-r", prompt, 2, key))][-1]

    await last(first, "session-a")
    await last(second, "session-b")
    again = await last(first + "alpha_40 =", "session-a")
    assert again.cached_tokens >= 0.9 * again.prompt_tokens
    without_key = await last(first + "alpha_41 =", "")  # keyless: whatever the cache holds
    assert without_key.cached_tokens >= 0.9 * without_key.prompt_tokens


async def test_waiting_requests_are_taken_newest_first(server) -> None:
    """While the engine is busy, the request that came last is served before older ones."""
    engine = server.engine
    assert engine._settings.queue_order == "newest"
    started: list[str] = []

    async def run(request_id: str, max_tokens: int) -> None:
        async for delta in engine.generate(EngineRequest(request_id, COUNT_PROMPT, max_tokens)):
            if not started or started[-1] != request_id:
                started.append(request_id)
            if delta.finished:
                return

    busy = asyncio.create_task(run("busy", 40))
    while not started:
        await asyncio.sleep(0.01)
    older = asyncio.create_task(run("older", 2))
    await asyncio.sleep(0.05)
    newer = asyncio.create_task(run("newer", 2))
    await asyncio.gather(busy, older, newer)
    assert started == ["busy", "newer", "older"]
