"""One completion, from a checked request to streamed events: context, engine, post-processing.

Both RPCs end here, so a Session request and a stateless Complete call are served the same way:
`Completer.job` makes the job of a prompt (`Completer.prompt` builds one; a Complete call's comes
from the context process), `Completer.run` streams it and hands its `Outcome` to one sink.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Protocol

from ghostpen.context.chunker import Chunk
from ghostpen.context.gate import confidence, withhold_reason
from ghostpen.context.postprocess import CursorSurroundings, Finish, Mode, Truncator
from ghostpen.context.prompt import Document, Prompt, build_prompt, fitted
from ghostpen.context.ranker import Ranker, rank_chunks
from ghostpen.context.settings import ContextSettings
from ghostpen.context.template import Template, load_template
from ghostpen.server.engines.base import Engine, EngineDelta, EngineRequest
from ghostpen.server.errors import DeadlinePassed, PromptTooLong
from ghostpen.server.identity import LOCAL, Identity
from ghostpen.server.metrics import Timings
from ghostpen.server.settings import LimitSettings, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestSpec:
    """What either RPC asks of one completion, checked at the wire."""

    request_id: str
    mode: Mode
    max_tokens: int  # 0: the default for the mode
    adapter: str  # "": the base model
    deadline_s: float  # seconds left, as the edge computed it on arrival
    received: float  # time.monotonic() at arrival


@dataclass(frozen=True)
class Assignment:
    """The experiment and arm a completion is served in; empty outside any."""

    experiment: str = ""
    arm: str = ""


OUTSIDE = Assignment()


@dataclass(frozen=True)
class CompletionJob:
    request_id: str
    completion_id: str
    document: Document
    prompt: Prompt
    mode: Mode
    max_tokens: int  # 0: the default for the mode
    received: float  # time.monotonic() at arrival
    prompted: float  # time.monotonic() once the prompt was built
    deadline: float  # time.monotonic() past which the request is dropped
    cache_key: str = ""  # the session, so the engine can keep its prompt cache apart
    adapter: str = ""  # the LoRA adapter the request names; "": the base model
    owner: Identity = LOCAL  # whom it was served to: only they may report on it
    assignment: Assignment = OUTSIDE  # the experiment's arm it was served in


@dataclass(frozen=True)
class Outcome:
    """How one completion ended, handed once to the sink: finished, or stopped and why."""

    job: CompletionJob
    engine: str
    model_id: str  # the base model; job.adapter names the adapter, if any
    template: Template
    mode: Mode  # as resolved at the cursor (AUTO becomes single or multi line)
    finish: Finish
    stopped: str  # "": finished; else client | superseded | disconnect | deadline | error
    timings: Timings
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    chars: int  # characters shown
    text: str = ""  # the text shown
    confidence: float | None = None  # mean log-probability of the tokens kept; None: not known
    withheld: str = ""  # why the show gate held the text back (gate.py); "": it passed
    upstream: str = ""  # engine = remote: the server that answered
    moved_from: str = ""  # engine = remote: the session's own upstream, down, that it stood in for

    @property
    def model(self) -> str:
        return model_name(self.model_id, self.job.adapter)


@dataclass(frozen=True)
class CompletionEvent:
    request_id: str
    completion_id: str
    text: str
    final: bool = False
    finish: Finish | None = None
    outcome: Outcome | None = None  # on the final event of a completion that finished


class Sink(Protocol):
    """Where each outcome goes, once."""

    def stopped(self, outcome: Outcome) -> None:
        """A completion that did not finish; called while its task may be being cancelled, so
        it must not wait."""

    async def finished(self, outcome: Outcome) -> None:
        """A completion that finished, awaited before its final chunk goes out."""


class Discard:
    """The sink of an evaluation, which serves nobody: nothing is counted or stored."""

    def stopped(self, outcome: Outcome) -> None:
        pass

    async def finished(self, outcome: Outcome) -> None:
        pass


def remaining_s(deadline_unix_ms: int, default_timeout_ms: int, now_unix: float) -> float:
    """Seconds left before the client's deadline; DeadlinePassed if none are."""
    if deadline_unix_ms == 0:
        return default_timeout_ms / 1000
    left = deadline_unix_ms / 1000 - now_unix
    if left <= 0:
        raise DeadlinePassed(
            f"the deadline passed {-left * 1000:.0f} ms before the request arrived"
        )
    return left


class Completer:
    def __init__(
        self,
        engine: Engine,
        template: Template,
        context: ContextSettings,
        limits: LimitSettings,
        sink: Sink,
        adapter: str = "",
        assignment: Assignment = OUTSIDE,
    ) -> None:
        self.engine = engine
        self.template = template
        self.context_settings = context
        self.adapter = adapter  # for requests that name none
        self.assignment = assignment
        self._limits = limits
        self._sink = sink

    @classmethod
    def from_settings(cls, engine: Engine, settings: Settings, sink: Sink) -> Completer:
        """The one way the server, the evaluation and the tests build it."""
        template = load_template(settings.context.template)
        return cls(engine, template, settings.context, settings.limits, sink)

    def varied(
        self,
        template: Template | None = None,
        context: ContextSettings | None = None,
        adapter: str | None = None,
        assignment: Assignment | None = None,
        sink: Sink | None = None,
    ) -> Completer:
        """The same engine behind another template, context settings or adapter: an ablation,
        an experiment's arm, or (with the `Discard` sink) a trial that serves nobody."""
        return Completer(
            self.engine,
            template or self.template,
            context or self.context_settings,
            self._limits,
            sink or self._sink,
            self.adapter if adapter is None else adapter,
            assignment or self.assignment,
        )

    def prompt(
        self,
        repo: str,
        document: Document,
        chunks: Sequence[Chunk],
        previous: Sequence[Chunk] = (),
        rank: Ranker = rank_chunks,
    ) -> Prompt:
        return build_prompt(
            repo, document, chunks, self.template, self.context_settings, previous, rank
        )

    def job(
        self,
        spec: RequestSpec,
        document: Document,
        prompt: Prompt,
        owner: Identity = LOCAL,
        cache_key: str = "",
    ) -> CompletionJob:
        """The one constructor both RPCs use, once the prompt is built."""
        return CompletionJob(
            request_id=spec.request_id,
            completion_id=uuid.uuid4().hex,
            document=document,
            prompt=prompt,
            mode=spec.mode,
            max_tokens=spec.max_tokens,
            received=spec.received,
            prompted=time.monotonic(),
            deadline=spec.received + spec.deadline_s,
            cache_key=cache_key,
            adapter=spec.adapter or self.adapter,
            owner=owner,
            assignment=self.assignment,
        )

    def max_tokens(self, mode: Mode) -> int:
        """The token budget of a request that names none."""
        if mode is Mode.SINGLE_LINE:
            return self._limits.default_max_tokens_single_line
        return self._limits.default_max_tokens_multi_line

    async def run(self, job: CompletionJob) -> AsyncIterator[CompletionEvent]:
        """Stream the completion, truncated where it should end. A final event that finishes
        WITHHELD says the show gate held it back: the text streamed before it is not to be shown.

        Cancelling the consumer aborts the engine request (`task.cancel(reason)` names why); a
        passed deadline aborts it and raises DeadlinePassed. Either way, and on success, the sink
        gets the outcome once; a finished one before the final event."""
        document = job.document
        cursor = CursorSurroundings.around(
            document.prefix, document.suffix, job.mode, self.template.stop, document.language
        )
        truncator = Truncator(cursor, job.prompt.healed)
        sent = [job]
        max_tokens = job.max_tokens or self.max_tokens(cursor.mode)
        clock = _Clock(job)
        finish, stopped, last = Finish.STOP, "error", None
        logprobs: list[float] = []
        try:
            async with asyncio.timeout_at(_loop_time(job.deadline)):
                async with aclosing(self._deltas(sent, max_tokens)) as deltas:
                    async for delta in deltas:
                        clock.delta()
                        last = delta
                        logprobs.extend(delta.logprobs)
                        text = truncator.feed(delta.text)
                        if text:
                            yield CompletionEvent(job.request_id, job.completion_id, text)
                        if truncator.finish is not None:
                            break
                        if delta.finished:
                            finish = _engine_finish(delta)
            stopped = ""
        except TimeoutError:
            stopped = "deadline"
            raise DeadlinePassed(
                f"the deadline passed {1000 * (time.monotonic() - job.deadline):.0f} ms ago, "
                f"{1000 * (time.monotonic() - job.received):.0f} ms after the request arrived; "
                "it was dropped"
            ) from None
        except asyncio.CancelledError as cancel:
            stopped = str(cancel.args[0]) if cancel.args else "disconnect"
            raise
        except GeneratorExit:  # the consumer stopped reading: its stream is gone
            stopped = "disconnect"
            raise
        finally:
            job = sent[-1]
            if stopped:
                self._sink.stopped(
                    self._outcome(job, cursor.mode, finish, stopped, clock, last, "")
                )
        rest, finish = truncator.close(finish)
        sure = confidence(logprobs)
        withheld = withhold_reason(truncator.text, cursor, sure, self.context_settings)
        shown = truncator.text
        if withheld and self.context_settings.show_gate:  # the client drops what streamed
            rest, finish, shown = "", Finish.WITHHELD, ""
        outcome = self._outcome(job, cursor.mode, finish, "", clock, last, shown, sure, withheld)
        await self._sink.finished(outcome)
        yield CompletionEvent(job.request_id, job.completion_id, rest, True, finish, outcome)

    async def _deltas(
        self, sent: list[CompletionJob], max_tokens: int
    ) -> AsyncIterator[EngineDelta]:
        """The engine's deltas for the last job in `sent`. A prompt that the engine counts too
        long for its window is fitted to the count, leaving `max_tokens` for the completion,
        and sent once more; the job with the fitted prompt is appended to `sent`."""
        while True:
            job = sent[-1]
            request = EngineRequest(
                job.completion_id,  # minted here: a client's request ids never reach the engine
                job.prompt.text,
                max_tokens,
                job.cache_key,
                adapter=job.adapter,
                deadline=job.deadline,
            )
            try:
                async with aclosing(self.engine.generate(request)) as deltas:
                    async for delta in deltas:
                        yield delta
                return
            except PromptTooLong as error:
                room = error.window - max_tokens
                if len(sent) > 1 or room <= 0:
                    raise
                log.info("prompt of %d tokens fitted to %d", error.tokens, room)
                sent.append(
                    replace(job, prompt=fitted(job.prompt, job.document, error.tokens, room))
                )

    def _outcome(
        self,
        job: CompletionJob,
        mode: Mode,
        finish: Finish,
        stopped: str,
        clock: _Clock,
        last: EngineDelta | None,
        text: str,
        confidence: float | None = None,
        withheld: str = "",
    ) -> Outcome:
        return Outcome(
            job=job,
            engine=self.engine.name,
            model_id=self.engine.model_id,
            template=self.template,
            mode=mode,
            finish=finish,
            stopped=stopped,
            timings=clock.timings(last.queue_s if last else 0.0),
            prompt_tokens=last.prompt_tokens if last else 0,
            completion_tokens=last.completion_tokens if last else 0,
            cached_tokens=last.cached_tokens if last else 0,
            chars=len(text),
            text=text,
            confidence=confidence,
            withheld=withheld,
            upstream=last.upstream if last else "",
            moved_from=last.moved_from if last else "",
        )


class _Clock:
    """When the engine started, answered first and last, from the job's arrival."""

    def __init__(self, job: CompletionJob) -> None:
        self._job = job
        self._engine_start = self._last = time.monotonic()
        self._first = 0.0

    def delta(self) -> None:
        self._last = time.monotonic()
        self._first = self._first or self._last

    def timings(self, queue_s: float) -> Timings:
        done, job = time.monotonic(), self._job
        return Timings(
            context_s=job.prompted - job.received,
            queue_s=queue_s,
            first_token_s=(self._first or done) - job.received,
            total_s=done - job.received,
            engine_s=self._last - self._engine_start,
        )


def model_name(model_id: str, adapter: str) -> str:
    """The model as telemetry groups it: an adapter makes another model of the same base."""
    return f"{model_id}+{adapter}" if adapter else model_id


def _engine_finish(delta: EngineDelta) -> Finish:
    if delta.aborted:
        return Finish.CANCELLED
    return Finish.LENGTH if delta.length_limited else Finish.STOP


def _loop_time(deadline_monotonic: float) -> float:
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline_monotonic - time.monotonic())
