"""The stateless Complete call's domain side: context read in the context process (a real child
process), the deadline checked first."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from ghostpen.context.postprocess import Mode
from ghostpen.server.completion import Completer, Discard, RequestSpec
from ghostpen.server.context_process import ContextProcess, InlineFile
from ghostpen.server.errors import DeadlinePassed, InternalError
from ghostpen.server.identity import LOCAL
from ghostpen.server.inline import InlineCompletions, InlineRequest
from ghostpen.server.settings import Settings
from tests.scripted_engine import ScriptedEngine

CONTEXT = (InlineFile("shop.py", "", "def total(items):\n    return sum(items)\n"),)


def inline_request(deadline_s: float, received: float) -> InlineRequest:
    spec = RequestSpec("r", Mode.AUTO, 0, "", deadline_s, received)
    return InlineRequest(spec, "shop", InlineFile("a.py", "", "x = total("), 10, CONTEXT)


@pytest_asyncio.fixture
async def context() -> AsyncIterator[tuple[InlineCompletions, ContextProcess]]:
    settings = Settings.load(environ={})
    completer = Completer.from_settings(ScriptedEngine("1"), settings, Discard())
    process = ContextProcess(settings.context, completer.template)
    yield InlineCompletions(completer, process), process
    await process.close()


async def test_context_is_chunked_in_the_child_and_the_language_guessed(context) -> None:
    inline, process = context
    job = await inline.job(inline_request(5.0, time.monotonic()), LOCAL)
    assert job.document.language == "python" and job.document.prefix == "x = total("
    assert [r.chunk.path for r in job.prompt.context] == ["shop.py"]
    assert process.pid() not in (None, os.getpid())  # read in a process of its own


async def test_a_spent_deadline_is_refused_before_any_context_is_read(context) -> None:
    inline, process = context
    with pytest.raises(DeadlinePassed, match="before the context was read"):
        await inline.job(inline_request(0.001, time.monotonic() - 1.0), LOCAL)
    assert process.pid() is None  # the context process was never asked


async def test_a_context_process_that_dies_costs_at_most_one_request(context) -> None:
    inline, process = context
    await inline.job(inline_request(30.0, time.monotonic()), LOCAL)
    killed = process.pid()
    os.kill(killed, signal.SIGKILL)  # as a parser crash on hostile input would
    outcomes = []
    for _ in range(2):  # the death is seen at once (a request's error) or before (a retry)
        try:
            job = await inline.job(inline_request(30.0, time.monotonic()), LOCAL)
            outcomes.append([r.chunk.path for r in job.prompt.context])
        except InternalError as error:
            assert "context process died" in str(error)
            outcomes.append("died")
    assert outcomes[-1] == ["shop.py"] and outcomes.count("died") <= 1
    assert process.pid() not in (None, killed)  # a new child
