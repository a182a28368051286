"""One completion, from a resolved request to streamed events: context, engine, post-processing.

Both RPCs end here, so a Session request and a stateless Complete call are served the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from ghostpen.context.chunker import Chunk
from ghostpen.context.postprocess import CursorSurroundings, Finish, Mode, Truncator
from ghostpen.context.prompt import Document, Prompt, build_prompt
from ghostpen.context.settings import ContextSettings
from ghostpen.context.template import Template
from ghostpen.server.engines.base import Engine, EngineDelta, EngineRequest
from ghostpen.server.errors import DeadlinePassed
from ghostpen.server.metrics import Metrics, Timings
from ghostpen.server.settings import LimitSettings
from ghostpen.server.telemetry.records import CompletionRecord


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


@dataclass(frozen=True)
class CompletionEvent:
    request_id: str
    completion_id: str
    text: str
    final: bool = False
    finish: Finish | None = None
    timings: Timings | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    model: str = ""  # on the final event: the model that served it (model_name)


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
        metrics: Metrics,
        record: Callable[[CompletionRecord], None],
    ) -> None:
        self.engine = engine
        self._record = record
        self.template = template
        self.context_settings = context
        self._limits = limits
        self._metrics = metrics

    def prompt(
        self, repo: str, document: Document, chunks: Sequence[Chunk], previous: Sequence[Chunk] = ()
    ) -> Prompt:
        return build_prompt(repo, document, chunks, self.template, self.context_settings, previous)

    def with_template(self, template: Template) -> Completer:
        """The same engine and settings behind another prompt template (for ablations)."""
        return Completer(
            self.engine, template, self.context_settings, self._limits, self._metrics, self._record
        )

    def max_tokens(self, mode: Mode) -> int:
        """The token budget of a request that names none."""
        if mode is Mode.SINGLE_LINE:
            return self._limits.default_max_tokens_single_line
        return self._limits.default_max_tokens_multi_line

    async def run(self, job: CompletionJob) -> AsyncIterator[CompletionEvent]:
        """Stream the completion. Cancelling the consumer aborts the engine request; a passed
        deadline raises DeadlinePassed after aborting it."""
        document = job.document
        cursor = CursorSurroundings.around(
            document.prefix, document.suffix, job.mode, self.template.stop, document.language
        )
        engine_start = time.monotonic()
        max_tokens = job.max_tokens or self.max_tokens(cursor.mode)
        truncator = Truncator(cursor)
        finish, first_token_at, last = Finish.STOP, 0.0, None
        request = EngineRequest(
            job.request_id,
            job.prompt.text,
            max_tokens,
            job.cache_key,
            adapter=job.adapter,
            deadline=job.deadline,
        )
        engine_done = engine_start
        try:
            try:
                async with asyncio.timeout_at(_loop_time(job.deadline)):
                    async with aclosing(self.engine.generate(request)) as deltas:
                        async for delta in deltas:
                            engine_done = time.monotonic()
                            first_token_at = first_token_at or engine_done
                            last = delta
                            text = truncator.feed(delta.text)
                            if text:
                                yield CompletionEvent(job.request_id, job.completion_id, text)
                            if truncator.finish is not None:
                                break
                            if delta.finished:
                                finish = _engine_finish(delta)
            except BaseException:  # cancelled, superseded or dropped: its tokens were wasted
                if last is not None:
                    wasted = self._metrics.wasted_tokens.labels(
                        self.engine.name, self.engine.model_id
                    )
                    wasted.inc(last.completion_tokens)
                raise
        except TimeoutError:
            self._metrics.cancellations.labels(self.engine.name, "deadline").inc()
            raise DeadlinePassed(
                f"the deadline passed {1000 * (time.monotonic() - job.deadline):.0f} ms ago, "
                f"{1000 * (time.monotonic() - job.received):.0f} ms after the request arrived; "
                "it was dropped"
            ) from None
        rest, finish = truncator.close(finish)
        done = time.monotonic()
        timings = Timings(
            context_s=job.prompted - job.received,
            queue_s=last.queue_s if last else 0.0,
            first_token_s=(first_token_at or done) - job.received,
            total_s=done - job.received,
            engine_s=engine_done - engine_start,
        )
        tokens = last.completion_tokens if last else 0
        model = model_name(self.engine.model_id, job.adapter)
        self._record(
            CompletionRecord(
                completion_id=job.completion_id,
                created_ms=int(time.time() * 1000),
                model=model,
                template_id=self.template.template_id,
                template_hash=self.template.content_hash,
                engine=self.engine.name,
                language=job.document.language or "unknown",
                mode=cursor.mode.value,
                prompt_tokens=last.prompt_tokens if last else 0,
                completion_tokens=tokens,
                first_token_ms=timings.first_token_s * 1000,
                total_ms=timings.total_s * 1000,
                finish=finish.value,
                chars=len(truncator.text),
            )
        )
        self._metrics.observe(
            self.engine.name,
            self.engine.model_id,
            self.template.template_id,
            finish.value,
            timings,
            tokens,
        )
        yield CompletionEvent(
            job.request_id,
            job.completion_id,
            rest,
            True,
            finish,
            timings,
            prompt_tokens=last.prompt_tokens if last else 0,
            completion_tokens=tokens,
            cached_prompt_tokens=last.cached_tokens if last else 0,
            model=model,
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
