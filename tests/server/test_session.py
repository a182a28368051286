"""The session's own logic around an engine, with a scripted fake engine standing in for it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from ghostpen.context.postprocess import Finish, Mode
from ghostpen.context.template import load_template
from ghostpen.server.completion import Completer, CompletionEvent
from ghostpen.server.engines.base import Engine, EngineDelta, EngineRequest
from ghostpen.server.metrics import Metrics
from ghostpen.server.session import RequestError, RequestSpec, Session
from ghostpen.server.settings import Settings
from ghostpen.server.workspace import FileChange


class ScriptedEngine(Engine):
    """Yields `text` a character at a time, `delay` apart; or fails when told to."""

    name = "scripted"
    model_id = "scripted-model"

    def __init__(self, text: str, delay: float = 0.0, fail: bool = False) -> None:
        self.text, self.delay, self.fail = text, delay, fail
        self.closed: list[str] = []
        self.streaming = asyncio.Event()  # set once a consumer has taken a delta

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        try:
            if self.fail:
                raise RuntimeError("device lost")
            for count, char in enumerate(self.text, 1):
                await asyncio.sleep(self.delay)
                yield EngineDelta(char, count, 10, 0.0)
                self.streaming.set()
            yield EngineDelta("", len(self.text), 10, 0.0, finished=True)
        finally:
            self.closed.append(request.request_id)

    async def abort(self, request_id: str) -> None:
        pass

    async def close(self) -> None:
        pass


def make_session(engine: Engine) -> tuple[Session, list[object], Metrics, list[object]]:
    settings = Settings.load(environ={})
    metrics = Metrics()
    recorded: list[object] = []
    completer = Completer(
        engine,
        load_template(settings.context.template),
        settings.context,
        settings.limits,
        metrics,
        recorded.append,
    )
    sent: list[object] = []
    session = Session(completer, settings, metrics, sent.append)
    session.update(FileChange("a.py", "python", 1, text="x = "))
    return session, sent, metrics, recorded


def spec(request_id: str, deadline_s: float = 5.0) -> RequestSpec:
    return RequestSpec(
        request_id, "a.py", 1, 4, Mode.SINGLE_LINE, 0, "", deadline_s, time.monotonic()
    )


async def test_latest_wins_and_the_superseded_stream_is_closed() -> None:
    engine = ScriptedEngine("compute_total()\n", delay=0.01)
    session, sent, metrics, recorded = make_session(engine)
    session.start(spec("first"))
    await asyncio.wait_for(engine.streaming.wait(), 10)
    session.start(spec("second"))
    await session.drain()
    finals = [e for e in sent if isinstance(e, CompletionEvent) and e.final]
    assert [(e.request_id, e.finish) for e in finals] == [
        ("first", Finish.CANCELLED),
        ("second", Finish.LINE_END),
    ]
    assert "".join(e.text for e in sent if e.request_id == "second") == "compute_total()"
    assert engine.closed == ["first", "second"]
    [record] = recorded  # only the completion that finished is recorded for telemetry
    assert (record.completion_id, record.finish, record.chars) == (
        finals[1].completion_id,
        "line_end",
        15,
    )
    assert (
        metrics.registry.get_sample_value(
            "ghostpen_cancellations_total", {"engine": "scripted", "reason": "superseded"}
        )
        == 1
    )
    wasted = metrics.registry.get_sample_value(
        "ghostpen_wasted_tokens_total", {"engine": "scripted", "model": "scripted-model"}
    )
    assert 0 < wasted < len("compute_total()\n")  # what "first" got before it was superseded


async def test_an_engine_failure_is_reported_on_the_request_and_the_session_goes_on() -> None:
    engine = ScriptedEngine("1\n", fail=True)
    session, sent, _, _ = make_session(engine)
    session.start(spec("boom"))
    await session.drain()
    [error] = sent
    assert isinstance(error, RequestError)
    assert error.error.status.name == "INTERNAL" and "device lost" in str(error.error)
    engine.fail = False
    session.start(spec("fine"))
    await session.drain()
    assert sent[-1].final and sent[-1].finish is Finish.LINE_END


async def test_closing_the_session_stops_everything_without_replies() -> None:
    engine = ScriptedEngine("x" * 1000, delay=0.01)
    session, sent, metrics, _ = make_session(engine)
    session.start(spec("running"))
    await asyncio.sleep(0.05)
    await session.close()
    assert engine.closed == ["running"]
    assert not any(getattr(e, "final", False) for e in sent)
    assert (
        metrics.registry.get_sample_value(
            "ghostpen_cancellations_total", {"engine": "scripted", "reason": "disconnect"}
        )
        == 1
    )
