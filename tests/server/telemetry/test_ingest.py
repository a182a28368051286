"""Editor events over the real server: validated, joined to their completion, stored once."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest

from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.server.telemetry.store import Store
from tests.conftest import SessionStream

SOURCE = "def add(a, b):\n    return "


async def served_completion(session: SessionStream, path: str) -> pb.CompletionChunk:
    """The final chunk of a completion that showed at least one character."""
    await session.open_file(path, SOURCE)
    text, final = await session.complete(
        request_id=f"t-{path}",
        path=path,
        version=1,
        cursor_offset=len(SOURCE),
        max_tokens=6,
        mode=pb.MODE_SINGLE_LINE,
    )
    assert text, "the model completed nothing; the events below accept a character"
    return final.chunk


def event(completion_id: str, **kind: object) -> pb.TelemetryEvent:
    return pb.TelemetryEvent(
        event_id=uuid.uuid4().hex,
        completion_id=completion_id,
        client_time_unix_ms=int(time.time() * 1000),
        **kind,
    )


def stored(settings, sql: str, *parameters: object) -> list[tuple]:
    store = Store.open(settings.telemetry.database, settings.cache_dir)
    try:
        return store.query(sql, parameters)
    finally:
        store.close()


async def test_events_on_the_session_are_stored_before_they_are_acknowledged(
    stub, server, settings
) -> None:
    session = SessionStream(stub)
    chunk = await served_completion(session, "tel.py")
    events = [
        event(chunk.completion_id, shown=pb.Shown()),
        event(chunk.completion_id, accepted=pb.Accepted(ms_since_shown=900, accepted_chars=1)),
        event(
            chunk.completion_id,
            retention=pb.Retention(after_s=30, retained_fraction=0.8, present=True),
        ),
    ]
    for sent in events:
        session.send(event=sent)
        reply = await session.read()
        assert reply.event_ack.event_id == sent.event_id and not reply.event_ack.duplicate
        rows = stored(settings, "SELECT kind FROM events WHERE event_id = ?", sent.event_id)
        assert rows == [(sent.WhichOneof("kind"),)]
    session.send(event=events[1])  # sent again, as a client retrying would
    again = await session.read()
    assert again.event_ack.duplicate
    count = stored(
        settings, "SELECT COUNT(*) FROM events WHERE completion_id = ?", chunk.completion_id
    )
    assert count == [(3,)]
    joined = stored(
        settings,
        "SELECT c.model, c.template_id, c.language, c.engine FROM events e "
        "JOIN completions c ON c.completion_id = e.completion_id WHERE e.event_id = ?",
        events[1].event_id,
    )
    assert joined == [(chunk.model_id, chunk.template_id, "python", "llama.cpp")]
    registry = server.metrics.registry
    labels = {
        "model": chunk.model_id,
        "template": chunk.template_id,
        "language": "python",
        "engine": "llama.cpp",
    }
    assert (
        registry.get_sample_value(
            "ghostpen_completion_events_total", {**labels, "kind": "accepted"}
        )
        >= 1
    )
    assert (
        registry.get_sample_value("ghostpen_retention_fraction_count", {**labels, "after_s": "30"})
        >= 1
    )
    session.close()


async def test_report_rpc_refuses_bad_events_and_stores_none_of_the_batch(stub, settings) -> None:
    session = SessionStream(stub)
    chunk = await served_completion(session, "bad.py")
    session.close()
    good = event(chunk.completion_id, shown=pb.Shown())
    cases = [
        (event("never-served", shown=pb.Shown()), "NOT_FOUND", "never served"),
        (
            event(chunk.completion_id, retention=pb.Retention(after_s=30, retained_fraction=1.5)),
            "INVALID_ARGUMENT",
            "outside 0..1",
        ),
        (
            event(chunk.completion_id, retention=pb.Retention(after_s=20, retained_fraction=0.5)),
            "INVALID_ARGUMENT",
            "intervals are 15, 30, 120, 300, 600",
        ),
        (event(chunk.completion_id), "INVALID_ARGUMENT", "no known kind"),
    ]
    for bad, status, needle in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Report(pb.ReportRequest(events=[good, bad]))
        assert caught.value.code().name == status
        assert needle in caught.value.details()
    assert stored(settings, "SELECT COUNT(*) FROM events WHERE event_id = ?", good.event_id) == [
        (0,)
    ]
    too_many = [good] * (settings.telemetry.max_events_per_report + 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Report(pb.ReportRequest(events=too_many))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_events_per_report" in caught.value.details()
    reply = await stub.Report(pb.ReportRequest(events=[good, good]))
    assert [a.duplicate for a in reply.acks] == [False, True]


async def test_a_bad_event_on_the_session_gets_an_error_naming_it(stub) -> None:
    session = SessionStream(stub)
    bad = event("never-served", shown=pb.Shown())
    session.send(event=bad)
    reply = await session.read()
    assert reply.error.status == "NOT_FOUND" and reply.error.event_id == bad.event_id
    session.close()
