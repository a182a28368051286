"""A structure-aware fuzz of every RPC against a real server (real gRPC, real SQLite; the engine
scripted, as these tests are about the code around it).

Messages are built field by field from the proto, with the values that break servers: empty and
over-long ids and paths, invalid UTF-8, unknown enum values, extreme integers, edits outside the
file, corrupt frames. A case fails on a crash (the server stops answering), a hang (no answer
within `ANSWER_S`), a wrong status class (anything a client's input cannot justify: INTERNAL,
UNKNOWN, UNAVAILABLE, CANCELLED), a request or event without exactly one answer, or an
acknowledged event missing from the database.

The seed is fixed (`derandomize`): a failure reproduces. The budget is `FUZZ_EXAMPLES`
per RPC: a few in the fast tier, hundreds in the full suite (`scripts/test`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostpen.proto import ghostpen_pb2 as pb
from tests.edge_server import Edge, edge_server

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
ANSWER_S = 30.0  # past this, a call is a hang
SERVICE = "/ghostpen.v1.Completion/"
CLIENT_STATUSES = {  # what a client's input may earn
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
}
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ids = st.one_of(st.just(""), st.text(min_size=1, max_size=12), st.text(min_size=120, max_size=140))
paths = st.one_of(
    st.sampled_from(["a.py", "b.rs", "src/c.ts", "", "../../etc/passwd"]),
    st.text(max_size=40),
    st.just("p" * 1100),
)
languages = st.one_of(
    st.sampled_from(["", "python", "rust", "typescriptreact"]),
    st.text(max_size=12),
    st.just("l" * 100),
)
texts = st.one_of(
    st.text(max_size=300).map(str.encode),
    st.binary(max_size=300),
    st.sampled_from([b"def f(x):\n    ", b"\xff\xfe", b"\xed\xa0\x80", b"x" * 5000]),
)
int64s = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 1, -1, 2**63 - 1, 4_000_000_000_000])
)
uint32s = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 512, 513, 2**32 - 1]))
uint64s = st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 8))
modes = st.integers(-3, 9)

context_files = st.builds(pb.ContextFile, path=paths, language=languages, text=texts)
complete_requests = st.builds(
    pb.CompleteRequest,
    request_id=ids,
    path=paths,
    language=languages,
    prefix=texts,
    suffix=texts,
    context_files=st.lists(context_files, max_size=14),
    mode=modes,
    max_tokens=uint32s,
    deadline_unix_ms=st.one_of(st.just(0), int64s),
    workspace=st.text(max_size=50),
    adapter=st.one_of(st.just(""), st.text(max_size=10)),
)

FILES = ("a.py", "b.rs")
REQUEST_IDS = ("r1", "r2", "r3")
edits = st.builds(pb.Edit, start=uint64s, end=uint64s, text=texts)
file_updates = st.one_of(
    st.builds(
        pb.FileUpdate, path=st.sampled_from(FILES), language=languages, version=uint64s, text=texts
    ),
    st.builds(
        pb.FileUpdate,
        path=st.sampled_from(FILES),
        version=uint64s,
        base_version=uint64s,
        edits=st.builds(pb.EditList, edits=st.lists(edits, max_size=4)),
    ),
    st.builds(pb.FileUpdate, path=paths, version=uint64s),  # neither text nor edits
)
completion_requests = st.builds(
    pb.CompletionRequest,
    request_id=st.one_of(st.sampled_from(REQUEST_IDS), ids),
    path=st.one_of(st.sampled_from(FILES), paths),
    version=uint64s,
    cursor_offset=uint64s,
    mode=modes,
    max_tokens=uint32s,
    deadline_unix_ms=st.one_of(st.just(0), int64s),
    adapter=st.one_of(st.just(""), st.text(max_size=8)),
)
event_bodies = st.one_of(
    st.builds(lambda: {"shown": pb.Shown()}),
    st.builds(
        lambda n, c: {"accepted": pb.Accepted(ms_since_shown=n, accepted_chars=c)}, uint32s, uint32s
    ),
    st.builds(
        lambda c, u: {"partially_accepted": pb.PartiallyAccepted(accepted_chars=c, unit=u)},
        uint32s,
        st.integers(-1, 4),
    ),
    st.builds(lambda r: {"rejected": pb.Rejected(reason=r)}, st.integers(-1, 4)),
    st.builds(
        lambda a, f, p, t: {
            "retention": pb.Retention(after_s=a, retained_fraction=f, present=p, final_text=t)
        },
        st.one_of(st.sampled_from([15, 30, 120, 300, 600]), uint32s),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.one_of(st.just(b""), st.binary(max_size=40)),  # a correction, UTF-8 or not
    ),
    st.just({}),  # no kind
)


def events(completion_ids: st.SearchStrategy[str]) -> st.SearchStrategy[pb.TelemetryEvent]:
    return st.builds(
        lambda event_id, completion_id, at, body: pb.TelemetryEvent(
            event_id=event_id, completion_id=completion_id, client_time_unix_ms=at, **body
        ),
        st.one_of(st.uuids().map(lambda u: u.hex), ids),
        completion_ids,
        int64s,
        event_bodies,
    )


client_messages = st.one_of(
    st.builds(
        lambda h: pb.ClientMessage(hello=h),
        st.builds(pb.Hello, client=st.text(max_size=20), workspace=st.text(max_size=200)),
    ),
    file_updates.map(lambda u: pb.ClientMessage(file_update=u)),
    completion_requests.map(lambda r: pb.ClientMessage(completion_request=r)),
    st.sampled_from((*REQUEST_IDS, "")).map(
        lambda i: pb.ClientMessage(cancel=pb.Cancel(request_id=i))
    ),
    events(st.one_of(ids, st.just("c" * 32))).map(lambda e: pb.ClientMessage(event=e)),
    st.just(pb.ClientMessage()),  # no kind
)
frames = st.one_of(st.binary(max_size=64), st.just(b"\x0a\xff\xff\xff"))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def edge(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Edge]:
    async with edge_server(
        tmp_path_factory.mktemp("fuzz"), max_sessions="64", capture_text="*"
    ) as opened:
        yield opened
    # Whatever was sent, nothing was answered as a failure of ours.
    for code in ("INTERNAL", "UNKNOWN"):
        for rpc in ("Session", "Complete", "Report", "DeleteCapturedText"):
            assert not opened.errors(rpc, code), (rpc, code)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(edge: Edge) -> str:
    """A completion of the fuzz's own user, for events that can be stored."""
    request = pb.CompleteRequest(request_id="seed", path="a.py", prefix=b"x = ")
    chunks = [chunk async for chunk in edge.stub.Complete(request)]
    return chunks[-1].completion_id


async def answered(call) -> tuple[list, grpc.StatusCode, str]:
    """Everything a call sends, its status and details; a hang fails the test."""
    replies = []
    async with asyncio.timeout(ANSWER_S):
        try:
            if hasattr(call, "read"):
                while (reply := await call.read()) is not grpc.aio.EOF:
                    replies.append(reply)
            else:
                replies.append(await call)
        except grpc.aio.AioRpcError as error:
            return replies, error.code(), error.details() or ""
    return replies, await call.code(), ""


def check_status(code: grpc.StatusCode, details: str, edge: Edge) -> None:
    assert code in CLIENT_STATUSES, (code, details)
    assert len(details) <= edge.settings.limits.max_error_chars + 100, details[:200]


async def still_serving(edge: Edge) -> None:
    request = pb.CompleteRequest(request_id="alive", path="a.py", prefix=b"x = ")
    replies, code, details = await answered(edge.stub.Complete(request))
    assert code is grpc.StatusCode.OK and replies[-1].final, details


def stored(edge: Edge, event_ids: set[str]) -> set[str]:
    with contextlib.closing(sqlite3.connect(edge.database)) as db:
        marks = ",".join("?" * len(event_ids))
        rows = db.execute(
            f"SELECT event_id FROM events WHERE event_id IN ({marks})", list(event_ids)
        )
        return {row[0] for row in rows}


@FUZZ
@given(request=complete_requests)
async def test_complete(edge: Edge, request: pb.CompleteRequest) -> None:
    replies, code, details = await answered(edge.stub.Complete(request))
    check_status(code, details, edge)
    if code is grpc.StatusCode.OK:
        assert replies[-1].final and sum(r.final for r in replies) == 1
    await still_serving(edge)


@FUZZ
@given(
    method=st.sampled_from(["Complete", "Report", "DeleteCapturedText"]),
    data=st.binary(max_size=200),
)
async def test_raw_bytes_on_unary_calls(edge: Edge, method: str, data: bytes) -> None:
    kind = edge.channel.unary_stream if method == "Complete" else edge.channel.unary_unary
    _, code, details = await answered(kind(SERVICE + method)(data))
    check_status(code, details, edge)


@FUZZ
@given(data=st.data())
async def test_report(edge: Edge, served: str, data: st.DataObject) -> None:
    sent = data.draw(st.lists(events(st.one_of(st.just(served), ids)), max_size=20))
    replies, code, details = await answered(edge.stub.Report(pb.ReportRequest(events=sent)))
    check_status(code, details, edge)
    if code is grpc.StatusCode.OK:
        [response] = replies
        assert [a.event_id for a in response.acks] == [e.event_id for e in sent]
        acknowledged = {a.event_id for a in response.acks}
        assert stored(edge, acknowledged) == acknowledged  # an ack means stored


@FUZZ
@given(messages=st.lists(client_messages, max_size=12), corrupt=st.one_of(st.none(), frames))
async def test_session(edge: Edge, messages: list[pb.ClientMessage], corrupt: bytes | None) -> None:
    call = edge.channel.stream_stream(
        SERVICE + "Session", response_deserializer=pb.ServerMessage.FromString
    )()
    for message in messages:
        await call.write(message.SerializeToString())
    if corrupt is not None:
        await call.write(corrupt)
    await call.done_writing()
    replies, code, details = await answered(call)
    check_status(code, details, edge)
    if code is not grpc.StatusCode.OK:  # a corrupt frame ends the stream; nothing else may
        assert corrupt is not None and code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        return
    requests = Counter(
        m.completion_request.request_id for m in messages if m.HasField("completion_request")
    )
    cancels = Counter(m.cancel.request_id for m in messages if m.HasField("cancel"))
    finals = Counter(r.chunk.request_id for r in replies if r.HasField("chunk") and r.chunk.final)
    errors = Counter(
        r.error.request_id for r in replies if r.HasField("error") and not r.error.event_id
    )
    for request_id, count in requests.items():  # exactly one terminal message each
        terminal = finals[request_id] + errors[request_id]
        assert terminal >= count, (request_id, replies)
        if request_id:  # errors about other messages name no request
            assert terminal <= count + cancels[request_id], (request_id, replies)
    sent_events = Counter(m.event.event_id for m in messages if m.HasField("event"))
    acks = Counter(r.event_ack.event_id for r in replies if r.HasField("event_ack"))
    event_errors = Counter(
        r.error.event_id for r in replies if r.HasField("error") and r.error.event_id
    )
    for event_id, count in sent_events.items():
        if event_id:  # an Error about an event without an id cannot name it
            assert acks[event_id] + event_errors[event_id] == count, (event_id, replies)
    for r in replies:
        assert not r.HasField("error") or r.error.status in {c.name for c in CLIENT_STATUSES}, r


async def test_the_server_is_healthy_after_the_fuzz(edge: Edge) -> None:
    assert await edge.health() == health_pb2.HealthCheckResponse.SERVING
    await still_serving(edge)
