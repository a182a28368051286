"""The show gate on the completion path: a withheld completion ends WITHHELD with nothing shown,
and in shadow mode its verdict is recorded while the text goes out."""

from __future__ import annotations

import dataclasses
import time

from ghostpen.context.postprocess import Finish, Mode
from ghostpen.context.prompt import Document
from ghostpen.server.completion import Completer, CompletionEvent, Discard, RequestSpec
from ghostpen.server.settings import Settings
from tests.scripted_engine import ScriptedEngine


async def complete(engine: ScriptedEngine, gate: bool = True) -> list[CompletionEvent]:
    settings = Settings.load(environ={})
    context = dataclasses.replace(settings.context, show_gate=gate, show_min_confidence=-1.0)
    completer = Completer.from_settings(engine, settings, Discard()).varied(context=context)
    document = Document("a.py", "python", "total = \n", 8)
    spec = RequestSpec("r", Mode.SINGLE_LINE, 0, "", 10.0, time.monotonic())
    job = completer.job(spec, document, completer.prompt("repo", document, []))
    return [event async for event in completer.run(job)]


async def test_a_confident_completion_is_shown_with_its_confidence() -> None:
    *_, final = await complete(ScriptedEngine("sum(prices)\n", logprob=-0.25))
    assert (final.finish, final.outcome.withheld, final.outcome.chars) == (Finish.LINE_END, "", 11)
    assert final.outcome.confidence == -0.25


async def test_an_unsure_completion_is_withheld_and_counted_as_not_shown() -> None:
    *_, final = await complete(ScriptedEngine("sum(prices)\n", logprob=-2.0))
    assert (final.final, final.finish, final.text) == (True, Finish.WITHHELD, "")
    assert (final.outcome.withheld, final.outcome.chars) == ("unsure", 0)


async def test_closers_alone_are_withheld_whatever_the_engine_says_of_them() -> None:
    *_, final = await complete(ScriptedEngine(")\n"))  # no log-probabilities
    assert (final.finish, final.outcome.withheld, final.outcome.confidence) == (
        Finish.WITHHELD,
        "closers",
        None,
    )


async def test_in_shadow_mode_the_verdict_is_recorded_and_the_text_shown() -> None:
    events = await complete(ScriptedEngine("sum(prices)\n", logprob=-2.0), gate=False)
    assert "".join(e.text for e in events) == "sum(prices)"
    final = events[-1]
    assert (final.finish, final.outcome.withheld, final.outcome.chars) == (
        Finish.LINE_END,
        "unsure",
        11,
    )
