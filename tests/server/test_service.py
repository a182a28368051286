"""The real server, the real llama.cpp engine, the default model: over gRPC as a client sees it."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ghostpen.proto import ghostpen_pb2 as pb
from tests.conftest import SessionStream, engine_idle
from tests.edge_server import until

GEOMETRY = """import math


def area_of_circle(radius):
    return math.pi * radius ** 2


def circumference_of_circle(radius):
    return """

MONEY = """def cents_to_display_string(cents):
    return f"${cents // 100}.{cents % 100:02d}"
"""

CART = """import money


def total_label(items):
    total = sum(item.price_cents for item in items)
    return money."""

COUNTING = "numbers = [\n" + "".join(f"    {i},\n" for i in range(1, 6)) + "    "


def status(message: pb.ServerMessage) -> str:
    return message.error.status if message.HasField("error") else "OK"


async def test_session_completes_a_line_with_the_real_model(stub) -> None:
    session = SessionStream(stub)
    session.send(hello=pb.Hello(client="test", workspace="geometry"))
    welcome = (await session.read()).welcome
    assert welcome.model_id == "qwen2.5-coder-0.5b-instruct-q4_k_m"
    assert welcome.engine == "llama.cpp"
    assert welcome.max_files == 12
    ack = await session.open_file("geometry.py", GEOMETRY)
    assert ack.file_ack.version == 1
    text, final = await session.complete(
        request_id="r1",
        path="geometry.py",
        version=1,
        cursor_offset=len(GEOMETRY),
        mode=pb.MODE_SINGLE_LINE,
    )
    assert text.replace(" ", "") == "2*math.pi*radius"
    chunk = final.chunk
    assert chunk.finish_reason in (pb.FINISH_REASON_LINE_END, pb.FINISH_REASON_STOP)
    assert chunk.template_id == "generic-prefix@v1"
    assert len(chunk.template_hash) == 12
    assert chunk.model_id == welcome.model_id
    assert chunk.completion_id
    timings = chunk.timings
    assert 0 < timings.context_ms < timings.first_token_ms <= timings.total_ms
    assert 0 < timings.engine_ms < timings.total_ms
    assert chunk.prompt_tokens > 20 and chunk.completion_tokens > 0
    # The next keystroke's prompt starts like this one: the engine reuses its prefix cache.
    typed = pb.EditList(edits=[pb.Edit(start=len(GEOMETRY), end=len(GEOMETRY), text=b"2")])
    session.send(
        file_update=pb.FileUpdate(path="geometry.py", version=2, base_version=1, edits=typed)
    )
    assert (await session.read()).file_ack.version == 2
    _, again = await session.complete(
        request_id="r2",
        path="geometry.py",
        version=2,
        cursor_offset=len(GEOMETRY) + 1,
        mode=pb.MODE_SINGLE_LINE,
    )
    assert again.chunk.cached_prompt_tokens >= 0.8 * again.chunk.prompt_tokens
    session.close()


async def test_a_new_session_with_the_same_affinity_finds_its_prompt_cache_warm(stub) -> None:
    """An editor that reconnects sends its affinity again: the engine keeps its cache by it."""
    metadata = (("x-ghostpen-affinity", "editor-7"),)
    asked = {"request_id": "r1", "path": "geometry.py", "version": 1}
    asked |= {"cursor_offset": len(GEOMETRY), "mode": pb.MODE_SINGLE_LINE}
    chunks = []
    for _ in range(2):
        session = SessionStream(stub, metadata)
        session.send(hello=pb.Hello(client="test", workspace="shapes"))
        assert (await session.read()).HasField("welcome")
        await session.open_file("geometry.py", GEOMETRY)
        _, final = await session.complete(**asked)
        chunks.append(final.chunk)
        session.close()
    first, second = chunks
    assert first.cached_prompt_tokens < 0.5 * first.prompt_tokens  # a key it has not seen
    assert second.cached_prompt_tokens >= 0.8 * second.prompt_tokens


async def test_context_from_another_recent_file_reaches_the_model(stub, server) -> None:
    session = SessionStream(stub)
    # Without money.py in the prompt the model writes `money.format(total)`.
    await session.open_file("money.py", MONEY)
    await session.open_file("cart.py", CART)

    async def chunked() -> bool:  # chunking runs beside the session: a request never waits on it
        sessions = list(server.service._sessions)
        return bool(sessions) and not any(s.workspace.unchunked() for s in sessions)

    await until(chunked)
    text, _final = await session.complete(
        request_id="ctx",
        path="cart.py",
        version=1,
        cursor_offset=len(CART),
        mode=pb.MODE_SINGLE_LINE,
    )
    assert text == "cents_to_display_string(total)", text
    session.close()


async def test_edits_update_the_file_and_requests_follow_the_version(stub) -> None:
    session = SessionStream(stub)
    await session.open_file("g.py", GEOMETRY.replace("radius ** 2", "r"))
    start = GEOMETRY.index("radius ** 2")
    edit = pb.Edit(start=start, end=start + 1, text=b"radius ** 2")
    session.send(
        file_update=pb.FileUpdate(
            path="g.py", version=2, base_version=1, edits=pb.EditList(edits=[edit])
        )
    )
    assert (await session.read()).file_ack.version == 2
    text, final = await session.complete(
        request_id="e",
        path="g.py",
        version=2,
        cursor_offset=len(GEOMETRY),
        mode=pb.MODE_SINGLE_LINE,
    )
    assert status(final) == "OK" and text.replace(" ", "") == "2*math.pi*radius"
    session.close()


async def test_a_new_request_supersedes_the_running_one_inside_the_engine(stub, server) -> None:
    session = SessionStream(stub)
    await session.open_file("count.py", COUNTING)
    engine = server.engine
    session.send(
        completion_request=pb.CompletionRequest(
            request_id="long",
            path="count.py",
            version=1,
            cursor_offset=len(COUNTING),
            mode=pb.MODE_MULTI_LINE,
            max_tokens=400,
        )
    )
    first = await session.read()  # the long one is generating
    assert first.chunk.request_id == "long" and not first.chunk.final
    before = (await engine.fresh_stats()).tokens_generated
    session.send(
        completion_request=pb.CompletionRequest(
            request_id="short",
            path="count.py",
            version=1,
            cursor_offset=len(COUNTING),
            mode=pb.MODE_SINGLE_LINE,
            max_tokens=4,
        )
    )
    finals = {}
    while "short" not in finals:
        message = await session.read()
        assert message.HasField("chunk"), message
        if message.chunk.final:
            finals[message.chunk.request_id] = message.chunk
    assert finals["long"].finish_reason == pb.FINISH_REASON_CANCELLED
    assert list(finals) == ["long", "short"]
    spent = (await engine_idle(engine)).tokens_generated - before  # stopped, not just dropped
    # Of 400 tokens asked for, the long request got at most the ones being decoded while the
    # short one was on its way (one finishing, one more started) before it stopped.
    assert spent <= finals["short"].completion_tokens + 2
    session.close()


async def test_stateless_complete_with_inline_context(stub) -> None:
    request = pb.CompleteRequest(
        request_id="stateless",
        path="cart.py",
        prefix=CART.encode(),
        suffix=b"\n",
        context_files=[pb.ContextFile(path="money.py", text=MONEY.encode())],
        mode=pb.MODE_SINGLE_LINE,
        workspace="shop",
    )
    chunks = [chunk async for chunk in stub.Complete(request)]
    assert "".join(c.text for c in chunks) == "cents_to_display_string(total)"
    assert chunks[-1].final and not any(c.final for c in chunks[:-1])
    assert len({c.completion_id for c in chunks}) == 1


async def test_health_and_reflection_for_grpcurl(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "ghostpen.v1.Completion"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = reflection.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    names = {service.name for service in reply.list_services_response.service}
    assert {"ghostpen.v1.Completion", "grpc.health.v1.Health"} <= names


async def test_metrics_count_completions_and_stage_latencies(stub, server) -> None:
    registry = server.metrics.registry
    labels = {
        "engine": "llama.cpp",
        "model": "qwen2.5-coder-0.5b-instruct-q4_k_m",
        "template": "generic-prefix@v1",
    }
    count = ("ghostpen_stage_seconds_count", {**labels, "stage": "total"})
    before = registry.get_sample_value(*count) or 0
    request = pb.CompleteRequest(
        request_id="m", path="g.py", prefix=GEOMETRY.encode(), max_tokens=2
    )
    [chunk async for chunk in stub.Complete(request)]
    assert registry.get_sample_value(*count) == before + 1
    for stage in ("context", "queue", "first_token"):
        assert (
            registry.get_sample_value("ghostpen_stage_seconds_count", {**labels, "stage": stage})
            == before + 1
        )
    body = await asyncio.to_thread(
        lambda: (
            urllib.request.urlopen(f"http://127.0.0.1:{server.web_port}/metrics").read().decode()
        )
    )
    assert 'ghostpen_stage_seconds_bucket{engine="llama.cpp"' in body
    assert "ghostpen_completions_total" in body


async def test_a_request_names_a_lora_adapter_on_both_rpcs(stub, settings) -> None:
    """The shared server loads one adapter, "seeded" (conftest); it changes the completion, and
    the final chunk and the telemetry name it as a model of its own."""
    texts = {}
    for adapter in ("", "seeded"):
        request = pb.CompleteRequest(
            request_id=f"lora-{adapter}",
            path="geometry.py",
            prefix=GEOMETRY.encode(),
            max_tokens=8,
            adapter=adapter,
        )
        chunks = [chunk async for chunk in stub.Complete(request)]
        texts[adapter] = "".join(c.text for c in chunks)
        model = "qwen2.5-coder-0.5b-instruct-q4_k_m" + (f"+{adapter}" if adapter else "")
        assert chunks[-1].model_id == model
    assert texts["seeded"] != texts[""]
    session = SessionStream(stub)
    await session.open_file("geometry.py", GEOMETRY)
    text, final = await session.complete(
        request_id="s-lora",
        path="geometry.py",
        version=1,
        cursor_offset=len(GEOMETRY),
        max_tokens=8,
        adapter="seeded",
    )
    assert text == texts["seeded"]
    assert final.chunk.model_id.endswith("+seeded")
    session.close()


async def test_an_unknown_adapter_is_invalid_argument_naming_the_loaded_ones(stub) -> None:
    request = pb.CompleteRequest(request_id="x", path="g.py", prefix=b"x = ", adapter="nope")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [chunk async for chunk in stub.Complete(request)]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "unknown adapter 'nope' (loaded: seeded; setting lora_adapters)" in raised.value.details()
    )
