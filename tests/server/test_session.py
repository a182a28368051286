"""The session's own logic around an engine, with a scripted fake engine standing in for it."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import pytest

from ghostpen.context.postprocess import Finish, Mode
from ghostpen.server.chunker_process import ChunkerProcess
from ghostpen.server.completion import Completer, CompletionEvent, RequestSpec
from ghostpen.server.engines.base import Engine
from ghostpen.server.identity import LOCAL
from ghostpen.server.ledger import Ledger
from ghostpen.server.metrics import Metrics
from ghostpen.server.session import Cancel, FileRequest, RequestError, Session
from ghostpen.server.settings import Settings
from ghostpen.server.telemetry.records import CaptureRecord, CompletionRecord
from ghostpen.server.workspace import FileChange
from tests.scripted_engine import ScriptedEngine

CHUNKER = ChunkerProcess(Settings.load(environ={}).context)  # one child for the module's tests


@pytest.fixture(scope="module", autouse=True)
def chunker_child() -> Iterator[None]:
    yield
    asyncio.run(CHUNKER.close())


def make_session(engine: Engine) -> tuple[Session, list[object], Metrics, list[CompletionRecord]]:
    settings = Settings.load(environ={})
    metrics = Metrics()
    recorded: list[CompletionRecord] = []

    def record(completion: CompletionRecord, capture: CaptureRecord | None) -> asyncio.Future[None]:
        recorded.append(completion)
        committed = asyncio.get_running_loop().create_future()
        committed.set_result(None)
        return committed

    completer = Completer.from_settings(engine, settings, Ledger(metrics, record, 1.0))
    sent: list[object] = []
    session = Session("s1", completer, CHUNKER, settings, sent.append, LOCAL)
    session.update(FileChange("a.py", "python", 1, text="x = "))
    return session, sent, metrics, recorded


def request(request_id: str, deadline_s: float = 5.0) -> FileRequest:
    spec = RequestSpec(request_id, Mode.SINGLE_LINE, 0, "", deadline_s, time.monotonic())
    return FileRequest(spec, "a.py", 1, 4)


def completion_of(sent: list[object], request_id: str) -> str:
    """The server-minted id the engine knows the request by."""
    return next(e.completion_id for e in sent if getattr(e, "request_id", "") == request_id)


def cancellations(metrics: Metrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value(
        "ghostpen_cancellations_total", {"engine": "scripted", "reason": reason}
    )


async def test_latest_wins_and_the_superseded_stream_is_closed() -> None:
    engine = ScriptedEngine("compute_total()\n", delay=0.01)
    session, sent, metrics, recorded = make_session(engine)
    session.start(request("first"))
    await asyncio.wait_for(engine.streaming.wait(), 10)
    session.start(request("second"))
    await session.drain()
    finals = [e for e in sent if isinstance(e, CompletionEvent) and e.final]
    assert [(e.request_id, e.finish) for e in finals] == [
        ("first", Finish.CANCELLED),
        ("second", Finish.LINE_END),
    ]
    first = next(e for e in sent if e.request_id == "first")
    assert finals[0].completion_id == first.completion_id  # the cancelled one names itself
    assert "".join(e.text for e in sent if e.request_id == "second") == "compute_total()"
    assert engine.closed == [completion_of(sent, "first"), completion_of(sent, "second")]
    [record] = recorded  # only the completion that finished is recorded for telemetry
    assert (record.completion_id, record.finish, record.chars) == (
        finals[1].completion_id,
        "line_end",
        15,
    )
    assert finals[1].outcome is not None and finals[1].outcome.chars == 15
    assert cancellations(metrics, "superseded") == 1
    wasted = metrics.registry.get_sample_value(
        "ghostpen_wasted_tokens_total", {"engine": "scripted", "model": "scripted-model"}
    )
    assert 0 < wasted < len("compute_total()\n")  # what "first" got before it was superseded
    finished = metrics.registry.get_sample_value(
        "ghostpen_completions_total",
        {
            "engine": "scripted",
            "model": "scripted-model",
            "template": record.template_id,
            "finish": "line_end",
        },
    )
    assert finished == 1  # metrics and telemetry booked from the same outcome


async def test_a_request_cancelled_before_it_ran_is_answered_and_forgotten() -> None:
    engine = ScriptedEngine("1\n")
    session, sent, _, _ = make_session(engine)
    session.start(request("early"))
    session.handle(Cancel("early"))  # in the same step: its task has not started yet
    await asyncio.wait_for(session.drain(), 10)
    [final] = sent
    assert (final.request_id, final.final, final.finish) == ("early", True, Finish.CANCELLED)
    assert engine.closed == []  # the engine never saw it
    session.handle(Cancel("early"))  # a late cancel of a finished request is moot, not an error


async def test_an_engine_failure_is_reported_on_the_request_and_the_session_goes_on() -> None:
    engine = ScriptedEngine("1\n", fail=True)
    session, sent, metrics, _ = make_session(engine)
    session.start(request("boom"))
    await session.drain()
    [error] = sent
    assert isinstance(error, RequestError)
    assert type(error.error).__name__ == "EngineFailure" and "device lost" in str(error.error)
    assert cancellations(metrics, "error") is None  # a failure is not a cancellation
    engine.fail = False
    session.start(request("fine"))
    await session.drain()
    assert sent[-1].final and sent[-1].finish is Finish.LINE_END


async def test_closing_the_session_stops_everything_without_replies() -> None:
    engine = ScriptedEngine("x" * 1000, delay=0.01)
    session, sent, metrics, _ = make_session(engine)
    session.start(request("running"))
    await asyncio.wait_for(engine.streaming.wait(), 10)
    await session.close()
    assert engine.closed == [completion_of(sent, "running")]
    assert not any(getattr(e, "final", False) for e in sent)
    assert cancellations(metrics, "disconnect") == 1


async def test_a_passed_deadline_is_an_error_and_booked_as_such() -> None:
    engine = ScriptedEngine("x" * 1000, delay=0.01)
    session, sent, metrics, recorded = make_session(engine)
    session.start(request("slow", deadline_s=0.05))
    await asyncio.wait_for(session.drain(), 10)
    error = sent[-1]
    assert isinstance(error, RequestError) and type(error.error).__name__ == "DeadlinePassed"
    assert cancellations(metrics, "deadline") == 1 and recorded == []


async def test_files_are_chunked_in_the_chunker_process_one_version_after_another() -> None:
    session, _, _, _ = make_session(ScriptedEngine("1\n"))  # opens a.py
    session.update(FileChange("b.py", "python", 1, text="def b():\n    return 2\n"))
    session.update(FileChange("b.py", "python", 2, text="def b():\n    return 3\n"))
    async with asyncio.timeout(30):
        while session.workspace.unchunked():
            await asyncio.sleep(0.01)
    assert [c.text for c in session.workspace.chunks()] == ["def b():\n    return 3\n", "x = "]
    assert CHUNKER.pid() not in (None, os.getpid())
    await session.close()
