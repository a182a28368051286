"""The stateless Complete call's domain side: context chunked through a cache, deadline first."""

from __future__ import annotations

import time

import pytest

from ghostpen.context.postprocess import Mode
from ghostpen.server.completion import Completer, Discard, RequestSpec
from ghostpen.server.errors import DeadlinePassed
from ghostpen.server.identity import LOCAL
from ghostpen.server.inline import InlineCompletions, InlineFile, InlineRequest
from ghostpen.server.settings import Settings
from tests.scripted_engine import ScriptedEngine

CONTEXT = (InlineFile("shop.py", "", "def total(items):\n    return sum(items)\n"),)


def inline_request(deadline_s: float, received: float) -> InlineRequest:
    spec = RequestSpec("r", Mode.AUTO, 0, "", deadline_s, received)
    return InlineRequest(spec, "shop", InlineFile("a.py", "", "x = total("), 10, CONTEXT)


def completions() -> InlineCompletions:
    settings = Settings.load(environ={})
    return InlineCompletions(Completer.from_settings(ScriptedEngine("1"), settings, Discard()))


def test_context_is_chunked_and_the_language_guessed() -> None:
    job = completions().job(inline_request(5.0, time.monotonic()), LOCAL)
    assert job.document.language == "python" and job.document.prefix == "x = total("
    assert [r.chunk.path for r in job.prompt.context] == ["shop.py"]


def test_a_spent_deadline_is_refused_before_any_chunking(monkeypatch) -> None:
    inline = completions()
    chunked: list[str] = []
    monkeypatch.setattr(
        "ghostpen.server.inline.chunk_file",
        lambda path, *args: chunked.append(path),
    )
    with pytest.raises(DeadlinePassed, match="before the context was read"):
        inline.job(inline_request(0.001, time.monotonic() - 1.0), LOCAL)
    assert chunked == []
