"""llama.cpp through llama-cpp-python's low-level bindings: the embedded default on CPU.

One llama.cpp context keeps a KV sequence resident per session (`sequences.py`), each in its own
stream (`kv_unified` off: a token attends only to its own sequence's cells, so one session's long
prompt does not slow the others' decoding). One scheduler thread runs steps: each step is one
`llama_decode` of every decoding request's next token plus up to `batch_tokens` of prompt from the
requests still reading theirs. A new request joins at the next step, and a long prompt read is cut
into chunks so that the others keep decoding (continuous batching). Greedy sampling runs inside
llama.cpp, from the batch that read the prompt's last token, with no extra forward pass; the
sampled token's log-probability (the show gate's confidence) is read from llama.cpp's logits in
place, without copying them.

Abort and deadlines take effect between any two steps, prompt reads included. Waiting requests are
admitted newest first (`queue_order`): under overload the newest request is the one whose developer
has just paused, the likeliest still to want it; a deadline drops the rest before they cost compute.

Weight repacking into llama.cpp's "extra buffer types" (AMX among them) is off unless
`extra_buffer_types` is set: on a Xeon Sapphire Rapids it crashed at the first decode.
"""

from __future__ import annotations

import asyncio
import bisect
import codecs
import ctypes
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ghostpen.server.engines.base import (
    STEP_BUCKETS,
    Engine,
    EngineDelta,
    EngineRequest,
    EngineStats,
    check_adapter,
)
from ghostpen.server.engines.sequences import KvSequence, SequenceTable, Shift
from ghostpen.server.errors import EngineFailure, InvalidInput, ModelError, PromptTooLong
from ghostpen.server.settings import EngineSettings

log = logging.getLogger(__name__)


def compute_threads(settings: EngineSettings) -> int:
    """`threads`, or by default every core this process may use but one. llama.cpp's threads wait
    for each other at every operation; with all cores taken, one other busy process (an editor, a
    compiler, our own gRPC side) stalls them all: measured 10x slower on 2 cores."""
    if settings.threads > 0:
        return settings.threads
    return max(1, len(os.sched_getaffinity(0)) - 1)


class _Llama:
    """The llama.cpp model, context, batch and sampler, and the ctypes calls on them."""

    def __init__(self, settings: EngineSettings, model_path: Path, sequences: int) -> None:
        import llama_cpp as lc

        self._lc = lc
        lc.llama_backend_init()
        lc.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())
        model_params = lc.llama_model_default_params()
        model_params.use_extra_bufts = settings.extra_buffer_types
        self.model = lc.llama_model_load_from_file(str(model_path).encode(), model_params)
        if not self.model:
            raise ModelError(f"llama.cpp could not load the model file {model_path}")
        self.batch_capacity = settings.batch_tokens + sequences
        params = lc.llama_context_default_params()
        params.n_ctx = settings.context_window * sequences
        params.n_seq_max = sequences
        params.n_batch = params.n_ubatch = self.batch_capacity
        params.n_threads = params.n_threads_batch = compute_threads(settings)
        params.flash_attn_type = (
            lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if settings.flash_attention
            else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.kv_unified = False
        params.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise ModelError(
                f"llama.cpp could not create a context of {sequences} sequences x "
                f"{settings.context_window} tokens (settings kv_cache_tokens, context_window)"
            )
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.vocab_size = lc.llama_vocab_n_tokens(self.vocab)
        self.memory = lc.llama_get_memory(self.ctx)
        self.can_shift = bool(lc.llama_memory_can_shift(self.memory))
        self.sampler = lc.llama_sampler_init_greedy()
        self.batch = lc.llama_batch_init(self.batch_capacity, 0, 1)
        self._piece = ctypes.create_string_buffer(256)
        self.adapters: dict[str, object] = {}
        self._adapter = ""
        for name, path in settings.adapter_paths().items():
            adapter = lc.llama_adapter_lora_init(self.model, str(path).encode())
            if not adapter:
                self.close()
                raise ModelError(f"llama.cpp could not load the LoRA adapter {name!r} from {path}")
            self.adapters[name] = adapter

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        room = len(data) + 8
        tokens = (self._lc.llama_token * room)()
        count = self._lc.llama_tokenize(self.vocab, data, len(data), tokens, room, True, True)
        return list(tokens[:count])

    def piece(self, token: int) -> bytes:
        count = self._lc.llama_token_to_piece(self.vocab, token, self._piece, 256, 0, True)
        return self._piece.raw[: max(count, 0)]

    def is_end(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self.vocab, token))

    def forget(self, seq_id: int, keep: int) -> None:
        """Drop the sequence's KV from position `keep` on."""
        self._lc.llama_memory_seq_rm(self.memory, seq_id, keep, -1)

    def shift(self, seq_id: int, shift: Shift) -> None:
        """Drop what lies between the shifted run's new and old start, then move the run there
        (llama.cpp re-rotates its keys at the next decode)."""
        self._lc.llama_memory_seq_rm(self.memory, seq_id, shift.start + shift.by, shift.start)
        self._lc.llama_memory_seq_add(self.memory, seq_id, shift.start, shift.end, shift.by)

    def use_adapter(self, name: str) -> None:
        if name == self._adapter:
            return
        if name:
            adapters = (self._lc.llama_adapter_lora_p_ctypes * 1)(self.adapters[name])
            self._lc.llama_set_adapters_lora(self.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        else:
            self._lc.llama_set_adapters_lora(self.ctx, None, 0, None)
        self._adapter = name

    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> int:
        """One step: (token, position, sequence, wants logits) each; llama_decode's code."""
        batch = self.batch
        for i, (token, pos, seq_id, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        return self._lc.llama_decode(self.ctx, batch)

    def sample(self, index: int) -> tuple[int, float]:
        """The greedy token from the logits of the last step's entry `index`, and its
        log-probability (a log-softmax over the vocabulary, ~0.3 ms)."""
        token = self._lc.llama_sampler_sample(self.sampler, self.ctx, index)
        pointer = self._lc.llama_get_logits_ith(self.ctx, index)
        logits = np.ctypeslib.as_array(pointer, shape=(self.vocab_size,))
        top = float(logits.max())
        total = float(np.exp(logits - top).sum())
        return token, float(logits[token]) - top - math.log(total)

    def close(self) -> None:
        lc = self._lc
        lc.llama_batch_free(self.batch)
        lc.llama_sampler_free(self.sampler)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _LOG_CALLBACK(level: int, text: bytes, _: object) -> None:
    if level in (3, 4):  # GGML_LOG_LEVEL_WARN, _ERROR; the rest is load chatter
        log.warning("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


@dataclass(eq=False)
class _Job:
    request: EngineRequest
    prompt: list[int]
    max_tokens: int
    deliver: Callable[[EngineDelta | BaseException], None]
    submitted: float
    cancelled: bool = False
    sequence: KvSequence | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to read
    cached: int = 0
    queue_s: float = 0.0
    next_token: int = -1  # sampled, not yet read back
    generated: int = 0
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    def delta(
        self,
        text: str = "",
        logprob: float | None = None,
        *,
        finished: bool = False,
        length: bool = False,
        aborted: bool = False,
    ) -> EngineDelta:
        return EngineDelta(
            text,
            self.generated,
            len(self.prompt),
            self.queue_s,
            finished=finished or length or aborted,
            length_limited=length,
            aborted=aborted,
            cached_tokens=self.cached,
            logprobs=() if logprob is None else (logprob,),
        )


class LlamaCppEngine(Engine):
    name = "llama.cpp"

    def __init__(self, llama: _Llama, model_id: str, settings: EngineSettings) -> None:
        self._llama = llama
        self.model_id = model_id
        self._settings = settings
        self._table = SequenceTable(
            settings.kv_cache_tokens // settings.context_window,
            settings.kv_shift_min_tokens if llama.can_shift else 0,
        )
        self._wake = threading.Condition()
        self._inbox: list[_Job] = []
        self._waiting: list[_Job] = []
        self._running: list[_Job] = []
        self._jobs: dict[str, _Job] = {}
        self._closed = False
        self._steps = 0
        self._step_tokens = 0
        self._step_buckets = [0] * (len(STEP_BUCKETS) + 1)
        # Cumulative, cancelled requests included, so that wasted work shows.
        self.tokens_generated = 0
        self.tokens_prefilled = 0
        self.evictions = 0
        self._thread = threading.Thread(target=self._run, name="llama-cpp-steps", daemon=True)
        self._thread.start()

    @classmethod
    async def start(
        cls, settings: EngineSettings, model_path: Path, model_id: str
    ) -> LlamaCppEngine:
        sequences = settings.kv_cache_tokens // settings.context_window
        if sequences < 1:
            raise ModelError(
                f"kv_cache_tokens={settings.kv_cache_tokens} holds no sequence of "
                f"context_window={settings.context_window} tokens"
            )
        llama = await asyncio.to_thread(_Llama, settings, model_path, sequences)
        return cls(llama, model_id, settings)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        check_adapter(request.adapter, self._llama.adapters)
        prompt = self._llama.tokenize(request.prompt)
        window = self._settings.context_window
        if not prompt:
            raise InvalidInput("the prompt has no tokens")
        if len(prompt) >= window:
            raise PromptTooLong(len(prompt), window)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[EngineDelta | BaseException] = asyncio.Queue()
        job = _Job(
            request,
            prompt,
            max(1, min(request.max_tokens, window - len(prompt))),
            lambda item: loop.call_soon_threadsafe(deltas.put_nowait, item),
            time.monotonic(),
        )
        with self._wake:
            self._jobs[request.request_id] = job
            self._inbox.append(job)
            self._wake.notify()
        try:
            while True:
                item = await deltas.get()
                if isinstance(item, BaseException):
                    raise EngineFailure(f"llama.cpp failed: {item}") from item
                yield item
                if item.finished:
                    return
        finally:
            self._cancel(job)

    async def abort(self, request_id: str) -> None:
        job = self._jobs.get(request_id)
        if job is not None:
            self._cancel(job)

    def _cancel(self, job: _Job) -> None:
        with self._wake:
            job.cancelled = True
            self._wake.notify()

    def stats(self) -> EngineStats:
        with self._wake:
            return EngineStats(
                waiting=len(self._waiting) + len(self._inbox),
                running=len(self._running),
                kv_tokens_used=self._table.tokens_used,
                kv_tokens_capacity=len(self._table.sequences) * self._settings.context_window,
                sequences_resident=self._table.resident,
                evictions=self.evictions,
                tokens_prefilled=self.tokens_prefilled,
                tokens_generated=self.tokens_generated,
                steps=self._steps,
                step_tokens=self._step_tokens,
                step_buckets=tuple(self._step_buckets),
            )

    async def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        await asyncio.to_thread(self._thread.join)
        self._llama.close()

    # The scheduler thread.

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._closed or self._inbox or self._running or self._waiting):
                    self._wake.wait()
                if self._closed:
                    for job in self._inbox + self._waiting + self._running:
                        job.deliver(job.delta(aborted=True))
                    return
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                now = time.monotonic()
                self._drop_stale(now)
                self._admit(now)
                if not self._running:
                    if self._waiting:  # all wait for a busy sequence: until something changes
                        self._wake.wait(0.05)
                    continue
            try:
                self._step()
            except Exception as exc:  # a bug or a llama.cpp failure: fail what ran, keep serving
                log.exception("llama.cpp step failed")
                with self._wake:
                    for job in list(self._running):
                        self._end(job, exc, keep_kv=False)

    def _drop_stale(self, now: float) -> None:
        for job in list(self._running):
            if job.cancelled or _expired(job, now):
                self._end(job, job.delta(aborted=True))
        for job in list(self._waiting):
            if job.cancelled or _expired(job, now):
                self._waiting.remove(job)
                self._jobs.pop(job.request.request_id, None)
                job.queue_s = now - job.submitted
                job.deliver(job.delta(aborted=True))

    def _admit(self, now: float) -> None:
        newest_first = self._settings.queue_order == "newest"
        for job in list(reversed(self._waiting) if newest_first else self._waiting):
            request = job.request
            assignment = self._table.assign(request.cache_key, request.adapter, job.prompt, now)
            if assignment is None:
                continue
            self._waiting.remove(job)
            sequence = assignment.sequence
            for shift in assignment.shifts:
                self._llama.shift(sequence.seq_id, shift)
            self._llama.forget(sequence.seq_id, assignment.reused)
            self.evictions += assignment.evicted
            job.sequence = sequence
            job.cached = assignment.reused
            job.pending = job.prompt[assignment.reused :]
            job.queue_s = now - job.submitted
            self._running.append(job)

    def _step(self) -> None:
        """One llama_decode over the running requests that share the step's adapter."""
        adapters = sorted({job.request.adapter for job in self._running})
        adapter = adapters[self._steps % len(adapters)]
        self._steps += 1
        running = [job for job in self._running if job.request.adapter == adapter]
        entries: list[tuple[int, int, int, bool]] = []
        fed: list[tuple[_Job, list[int], int]] = []  # job, tokens read, entry with its logits
        for job in running:
            if job.next_token >= 0:
                sequence = job.sequence
                assert sequence is not None
                entries.append((job.next_token, len(sequence.tokens), sequence.seq_id, True))
                fed.append((job, [job.next_token], len(entries) - 1))
        budget = self._llama.batch_capacity - len(entries)
        for job in reversed(running):  # newest first: its developer waits the least while
            if budget <= 0:
                break
            if not job.pending:
                continue
            sequence = job.sequence
            assert sequence is not None
            chunk = job.pending[:budget]
            start = len(sequence.tokens)
            done = len(chunk) == len(job.pending)
            for offset, token in enumerate(chunk):
                last = done and offset == len(chunk) - 1
                entries.append((token, start + offset, sequence.seq_id, last))
            fed.append((job, chunk, len(entries) - 1 if done else -1))
            budget -= len(chunk)
        self._llama.use_adapter(adapter)
        code = self._llama.decode(entries)
        if code != 0:
            raise EngineFailure(f"llama_decode returned {code} for a step of {len(entries)}")
        outputs: list[tuple[_Job, int]] = []
        with self._wake:
            self._step_tokens += len(entries)
            self._step_buckets[bisect.bisect_left(STEP_BUCKETS, len(entries))] += 1
            for job, tokens, index in fed:
                assert job.sequence is not None
                job.sequence.tokens.extend(tokens)
                if job.pending:
                    del job.pending[: len(tokens)]
                    self.tokens_prefilled += len(tokens)
                if index >= 0:
                    outputs.append((job, index))
            for job, index in outputs:
                self._take(job, *self._llama.sample(index))

    def _take(self, job: _Job, token: int, logprob: float) -> None:
        """A sampled token: stream it, or finish the request."""
        if job.cancelled:
            self._end(job, job.delta(aborted=True))
            return
        if self._llama.is_end(token):
            self._end(job, job.delta(job.decoder.decode(b"", final=True), finished=True))
            return
        job.generated += 1
        self.tokens_generated += 1
        text = job.decoder.decode(self._llama.piece(token))
        if job.generated >= job.max_tokens:
            text += job.decoder.decode(b"", final=True)
            self._end(job, job.delta(text, logprob, length=True))
            return
        job.next_token = token
        job.deliver(job.delta(text, logprob))

    def _end(self, job: _Job, last: EngineDelta | BaseException, keep_kv: bool = True) -> None:
        """Finish a running request and free its sequence (called with the lock held)."""
        self._running.remove(job)
        self._jobs.pop(job.request.request_id, None)
        sequence = job.sequence
        assert sequence is not None
        if not keep_kv:
            self._llama.forget(sequence.seq_id, 0)
            sequence.tokens.clear()
        self._table.release(sequence, time.monotonic())
        job.deliver(last)


def _expired(job: _Job, now: float) -> bool:
    return 0 < job.request.deadline <= now
