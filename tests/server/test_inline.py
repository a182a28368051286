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


def _files_cached() -> int:
    """Runs in the context process: how many files its chunk cache holds."""
    from ghostpen.server import context_process

    assert context_process._cache is not None
    return len(context_process._cache._entries)


async def test_the_child_stops_reading_context_files_once_the_deadline_passed(context) -> None:
    """A call its client gave up on does not keep the child from the next ones."""
    inline, process = context
    source = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(30_000))
    files = tuple(InlineFile(f"c{i}.py", "", f"{source}# {i}\n") for i in range(12))
    spec = RequestSpec("r", Mode.AUTO, 0, "", 0.05, time.monotonic())
    request = InlineRequest(spec, "shop", InlineFile("a.py", "", "x = "), 4, files)
    with pytest.raises(DeadlinePassed, match="while 12 context files were read"):
        await inline.job(request, LOCAL)
    assert await process._child.call(_files_cached) < len(files)  # after that call ended
