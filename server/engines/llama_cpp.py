"""llama.cpp through llama-cpp-python: the embedded default on CPU.

Its calls block, so one worker thread owns the model and runs requests one at a time, handing
tokens to the event loop as they come. A stale request stops at the next token, or at the next
prompt batch while the prompt is still being read, so no compute goes to text nobody will see.

Waiting requests are taken newest first by default (`queue_order`): under overload the newest
request is the one whose developer has just paused, the likeliest still to want it; the older
ones are mostly superseded or cancelled by then, and a deadline drops the rest.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from server.engines.base import Engine, EngineDelta, EngineRequest
from server.errors import EngineFailure, LimitExceeded
from server.settings import EngineSettings


@dataclass
class _Job:
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    deltas: asyncio.Queue[EngineDelta | BaseException]
    submitted: float
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: EngineDelta | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.deltas.put_nowait, item)


class LlamaCppEngine(Engine):
    name = "llama.cpp"

    def __init__(self, llm: object, model_id: str, settings: EngineSettings) -> None:
        self._llm = llm
        self.model_id = model_id
        self._settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-cpp")
        self._jobs: dict[str, _Job] = {}
        self._waiting: list[_Job] = []  # submitted, not yet taken by the worker
        self._waiting_lock = threading.Lock()
        # llama.cpp has one KV cache: sessions taking turns would each find another's prompt in
        # it and read theirs cold (~3 s for 600 tokens here). The cache of the sessions not on
        # the engine is saved instead (a save and a load cost ~0.5 s for 500 tokens).
        self._owner = ""
        self._states: OrderedDict[str, object] = OrderedDict()
        # All requests, cancelled ones included, so wasted work shows.
        self.tokens_generated = 0
        self.tokens_prefilled = 0

    @classmethod
    async def start(
        cls, settings: EngineSettings, model_path: Path, model_id: str
    ) -> LlamaCppEngine:
        from llama_cpp import Llama

        threads = settings.threads or os.cpu_count() or 1

        def load() -> object:
            return Llama(
                model_path=str(model_path),
                n_ctx=settings.context_window,
                n_batch=settings.batch_tokens,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )

        llm = await asyncio.get_running_loop().run_in_executor(None, load)
        return cls(llm, model_id, settings)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        loop = asyncio.get_running_loop()
        job = _Job(request, loop, asyncio.Queue(), time.monotonic())
        self._jobs[request.request_id] = job
        with self._waiting_lock:
            self._waiting.append(job)
        # One turn of the worker per job submitted, so each is taken exactly once.
        loop.run_in_executor(self._executor, self._run_next)
        try:
            while True:
                item = await job.deltas.get()
                if isinstance(item, LimitExceeded):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineFailure(f"llama.cpp failed: {item}") from item
                yield item
                if item.finished:
                    return
        finally:
            job.cancelled.set()
            self._jobs.pop(request.request_id, None)

    async def abort(self, request_id: str) -> None:
        job = self._jobs.get(request_id)
        if job is not None:
            job.cancelled.set()

    async def close(self) -> None:
        for job in list(self._jobs.values()):
            job.cancelled.set()
        self._executor.shutdown(wait=True)
        self._llm.close()

    def _run_next(self) -> None:
        newest_first = self._settings.queue_order == "newest"
        with self._waiting_lock:
            job = self._waiting.pop() if newest_first else self._waiting.pop(0)
        try:
            self._generate(job)
        except Exception as exc:  # handed to the awaiting coroutine, which raises it there
            job.emit(exc)

    def _generate(self, job: _Job) -> None:
        llm = self._llm
        queue_s = time.monotonic() - job.submitted
        if job.cancelled.is_set():
            job.emit(EngineDelta("", 0, 0, queue_s, finished=True, aborted=True))
            return
        tokens = llm.tokenize(job.request.prompt.encode("utf-8"), add_bos=True, special=True)
        room = llm.n_ctx() - len(tokens)
        if room < 1:
            raise LimitExceeded(
                f"prompt of {len(tokens)} tokens does not fit the context window of {llm.n_ctx()} "
                "tokens (setting context_window; lower the prompt budgets)"
            )
        max_tokens = min(job.request.max_tokens, room)
        self._switch_to(job.request.cache_key)
        cached = self._prefill(tokens, job.cancelled)
        if cached is None:
            job.emit(EngineDelta("", 0, len(tokens), queue_s, finished=True, aborted=True))
            return
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        eos = llm.token_eos()
        count = 0
        for token in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0):
            if job.cancelled.is_set():
                job.emit(EngineDelta("", count, len(tokens), queue_s, finished=True, aborted=True))
                return
            if token == eos:
                break
            count += 1
            self.tokens_generated += 1
            text = decoder.decode(llm.detokenize([token], special=True))
            job.emit(EngineDelta(text, count, len(tokens), queue_s, cached_tokens=cached))
            if count >= max_tokens:
                job.emit(
                    EngineDelta(
                        "",
                        count,
                        len(tokens),
                        queue_s,
                        True,
                        length_limited=True,
                        cached_tokens=cached,
                    )
                )
                return
        tail = decoder.decode(b"", final=True)
        job.emit(EngineDelta(tail, count, len(tokens), queue_s, True, cached_tokens=cached))

    def _switch_to(self, key: str) -> None:
        """Put the KV cache of `key`'s session in place, keeping the current owner's aside."""
        if key == self._owner or not self._settings.session_states:
            return
        if self._owner and self._llm.n_tokens:
            self._states[self._owner] = self._llm.save_state()
            self._states.move_to_end(self._owner)
            while len(self._states) > self._settings.session_states:
                self._states.popitem(last=False)
        state = self._states.pop(key, None) if key else None
        if state is not None:
            self._llm.load_state(state)
        self._owner = key

    def _prefill(self, tokens: Sequence[int], cancelled: threading.Event) -> int | None:
        """Read the prompt a batch at a time after the part already in the KV cache, checking for
        cancellation between batches. The last token is left for `generate`, which then finds
        everything before it cached. Returns how many tokens were cached; None if cancelled."""
        llm = self._llm
        cached = llm.input_ids[: llm.n_tokens]
        common = 0
        for old, new in zip(cached, tokens, strict=False):
            if old != new:
                break
            common += 1
        end = len(tokens) - 1
        if common >= end:
            return end
        llm.n_tokens = common
        step = self._settings.batch_tokens
        for start in range(common, end, step):
            if cancelled.is_set():
                return None
            batch = tokens[start : min(start + step, end)]
            llm.eval(batch)
            self.tokens_prefilled += len(batch)
        return None if cancelled.is_set() else common
