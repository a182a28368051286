"""Open-loop load on the stateless path, in the manner of `vllm bench serve`: requests arrive at a
set rate whatever the server's pace (Poisson, or gamma for burstiness), each with a deadline.

The requests are completion tasks cut from a real source tree (`server/training/tasks.py`). Two
kinds of target take them:
- ghostpen's `Complete` over gRPC: prefix, suffix and the recently touched files travel inline;
- any OpenAI-compatible `/v1/completions` endpoint, streaming: how peers (llama-cpp-python's own
  server, `vllm serve`) and existing deployments are measured. It gets the very prompt ghostpen
  builds for the same task (same template, same ranked context), so both serve the same tokens.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import grpc
import uvloop

from ghostpen.benchmarks.corpus import percentile_cells, percentiles
from ghostpen.benchmarks.peers import running_peer
from ghostpen.benchmarks.server_process import process_usage, running_server
from ghostpen.context.prompt import Document, build_prompt
from ghostpen.context.settings import ContextSettings
from ghostpen.context.template import Template, load_template
from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.proto import ghostpen_pb2_grpc as pb_grpc
from ghostpen.server.context_process import ChunkCache
from ghostpen.server.model_store import resolve
from ghostpen.server.settings import Settings
from ghostpen.server.training.tasks import Task, build_tasks, source_files

MAX_CONTEXT_FILES = 11
MAX_STOP_STRINGS = 4


@dataclass(frozen=True)
class Outcome:
    ok: bool
    first_text_ms: float | None  # None: no text came
    total_ms: float
    status: str = "OK"  # the gRPC status or HTTP error of a failed request


class Target(Protocol):
    name: str

    async def complete(self, task: Task, max_tokens: int, deadline_s: float) -> Outcome: ...

    async def close(self) -> None: ...


class GhostpenTarget:
    """`Complete` on a ghostpen server; the server builds the prompt."""

    def __init__(self, address: str, name: str = "ghostpen") -> None:
        self.name = name
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.CompletionStub(self._channel)

    async def complete(self, task: Task, max_tokens: int, deadline_s: float) -> Outcome:
        request = pb.CompleteRequest(
            request_id=f"{task.file.path}:{task.cursor}",
            path=task.file.path,
            language=task.file.language,
            prefix=task.left.encode(),
            suffix=task.right.encode(),
            context_files=[
                pb.ContextFile(path=f.path, language=f.language, text=f.text.encode())
                for f in task.context[:MAX_CONTEXT_FILES]
            ],
            mode=pb.MODE_SINGLE_LINE,
            max_tokens=max_tokens,
            deadline_unix_ms=int((time.time() + deadline_s) * 1000),
        )
        started = time.perf_counter()
        first = None
        try:
            async for chunk in self._stub.Complete(request):
                if chunk.text and first is None:
                    first = (time.perf_counter() - started) * 1000
        except grpc.aio.AioRpcError as error:
            return Outcome(False, first, (time.perf_counter() - started) * 1000, error.code().name)
        return Outcome(True, first, (time.perf_counter() - started) * 1000)

    async def close(self) -> None:
        await self._channel.close()


class OpenAITarget:
    """A `/v1/completions` endpoint, streamed (server-sent events), temperature 0."""

    def __init__(
        self,
        base_url: str,
        model: str,
        template: Template,
        context: ContextSettings,
        name: str = "openai",
    ) -> None:
        self.name = name
        self._url = base_url.rstrip("/") + "/completions"
        self._model = model
        self._template = template
        self._context = context
        self._chunks = ChunkCache(context.chunk_max_lines)
        self._session = aiohttp.ClientSession()

    def prompt(self, task: Task) -> str:
        """The prompt ghostpen's server builds for the same task."""
        chunks = [
            chunk
            for f in task.context[:MAX_CONTEXT_FILES]
            for chunk in self._chunks.chunks(f.path, f.language, f.text)
        ]
        document = Document(
            task.file.path, task.file.language, task.left + task.right, len(task.left)
        )
        return build_prompt("", document, chunks, self._template, self._context).text

    def body(self, task: Task, max_tokens: int) -> dict[str, object]:
        return {
            "model": self._model,
            "prompt": self.prompt(task),
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            # Single line, as ghostpen's requests; the OpenAI API takes at most 4 stop strings.
            "stop": ["\n", *self._template.stop][:MAX_STOP_STRINGS],
        }

    async def complete(self, task: Task, max_tokens: int, deadline_s: float) -> Outcome:
        body = self.body(task, max_tokens)
        started = time.perf_counter()
        first = None
        try:
            async with self._session.post(
                self._url, json=body, timeout=aiohttp.ClientTimeout(total=deadline_s)
            ) as response:
                if response.status != 200:
                    return Outcome(False, None, _ms(started), f"HTTP {response.status}")
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    choices = json.loads(line[5:]).get("choices") or [{}]
                    if choices[0].get("text") and first is None:
                        first = _ms(started)
        except TimeoutError:
            return Outcome(False, first, _ms(started), "DEADLINE_EXCEEDED")
        except aiohttp.ClientError as error:
            return Outcome(False, first, _ms(started), type(error).__name__)
        return Outcome(True, first, _ms(started))

    async def close(self) -> None:
        await self._session.close()


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _percentiles(values: list[float]) -> dict[str, float] | None:
    return percentiles(values) if values else None


def arrival_gaps(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds between arrivals: gamma with shape `burstiness` and mean 1/rate (1.0: Poisson;
    lower: burstier). An infinite rate sends everything at once."""
    if rate == float("inf"):
        return [0.0] * count
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, scale) for _ in range(count)]


async def run_open_loop(
    target: Target,
    tasks: Sequence[Task],
    rate: float,
    burstiness: float,
    seed: int,
    max_tokens: int,
    deadline_s: float,
) -> dict[str, object]:
    started = time.perf_counter()
    running = []
    for task, gap in zip(tasks, arrival_gaps(len(tasks), rate, burstiness, seed), strict=True):
        running.append(asyncio.create_task(target.complete(task, max_tokens, deadline_s)))
        await asyncio.sleep(gap)
    outcomes: list[Outcome] = await asyncio.gather(*running)
    elapsed = time.perf_counter() - started
    done = [o for o in outcomes if o.ok]
    return {
        "target": target.name,
        "rate": rate,
        "burstiness": burstiness,
        "requests": len(outcomes),
        "completed": len(done),
        "completions_per_s": round(len(done) / elapsed, 3),
        "errors": dict(Counter(o.status for o in outcomes if not o.ok)),
        "first_text_ms": _percentiles([o.first_text_ms for o in done if o.first_text_ms]),
        "total_ms": _percentiles([o.total_ms for o in done]),
        "seconds": round(elapsed, 1),
    }


@dataclass(frozen=True)
class OpenLoopConfig:
    tree: Path  # source tree the tasks are cut from
    requests: int
    rate: float
    burstiness: float = 1.0
    seed: int = 0
    max_tokens: int = 24
    deadline_s: float = 10.0
    engine: str = "llama.cpp"
    peers: tuple[str, ...] = ()
    endpoint: str = ""  # an OpenAI-compatible base URL: measured instead of ghostpen
    endpoint_model: str = ""
    upstreams: str = ""  # engine = remote: the servers it sends to


def run_comparison(config: OpenLoopConfig, settings: Settings) -> list[dict[str, object]]:
    """ghostpen (or the given endpoint), then each peer on the same model, one at a time so
    that each has the machine to itself; the same tasks at the same arrival times."""
    files = source_files(config.tree, settings.limits.max_file_bytes)
    tasks = build_tasks(files, config.requests, config.seed, MAX_CONTEXT_FILES + 1)
    template = load_template(settings.context.template)

    def measure(target_factory, pid: int | None = None) -> dict[str, object]:
        async def run() -> dict[str, object]:
            target = target_factory()
            try:
                return await run_open_loop(
                    target, tasks, config.rate, config.burstiness, config.seed,
                    config.max_tokens, config.deadline_s,
                )  # fmt: skip
            finally:
                await target.close()

        cpu_before = process_usage(pid)[0] if pid else 0.0
        result = uvloop.run(run())
        if pid:  # the server's own process (vllm serve's engine runs in a child: not counted)
            cpu_after, peak_rss = process_usage(pid)
            result["server_cpu_s"] = round(cpu_after - cpu_before, 1)
            result["server_peak_rss_mib"] = round(peak_rss / 2**20)
        return result

    results = []
    if config.endpoint:
        results.append(measure(lambda: OpenAITarget(
            config.endpoint, config.endpoint_model, template, settings.context, "endpoint"
        )))  # fmt: skip
    else:
        env = {"GHOSTPEN_UPSTREAMS": config.upstreams} if config.upstreams else None
        with running_server("--engine", config.engine, env=env) as server:
            results.append(measure(lambda: GhostpenTarget(server.address), server.process.pid))
    for peer in config.peers:
        want = "hf" if peer == "vllm" else "gguf"
        model = resolve(settings.engine.model, settings.cache_dir, want)
        with running_peer(peer, model.path, settings.engine.context_window) as (base, process):
            results.append(measure(lambda base=base, model=model, peer=peer: OpenAITarget(
                base, model.path.name, template, settings.context, peer
            ), process.pid))  # fmt: skip
    return results


def markdown(results: list[dict[str, object]]) -> str:
    """One row a target; ratios against the first (ghostpen), > 1 meaning the first is faster."""
    base = results[0]
    lines = [
        "| target | completed | completions/s | errors | first text p50 / p90 / p99 ms "
        "| total p50 / p90 / p99 ms | total p50 vs first | server CPU s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        first, total = row["first_text_ms"], row["total_ms"]
        ratio = total["p50"] / base["total_ms"]["p50"] if total and base["total_ms"] else None
        lines.append(
            f"| {row['target']} | {row['completed']}/{row['requests']} "
            f"| {row['completions_per_s']:.2f} | {row['errors'] or 0} | {percentile_cells(first)} "
            f"| {percentile_cells(total)} | {'' if ratio is None else f'{ratio:.2f}x'} "
            f"| {row.get('server_cpu_s', '-')} | {row.get('server_peak_rss_mib', '-')} |"
        )
    return "\n".join(lines)
