"""Run tasks through the real pipeline (the Completer the server uses) for each variant, many in
flight at once so the engine batches them, and record one line per task and variant.

A variant changes one component and keeps the others as the server runs them. Its spec joins
parts with `+`: a retrieval strategy (`none`, `edit-distance`, `jaccard`, `bm25`, `hybrid`, or
`oracle`, retrieval's upper bound: the chunks that define what the expected text needs), a
template (`template:generic-prefix`), `raw` (the engine's text with no post-processing, up to the
mode's token budget), or a context setting (`suffix_token_budget=128`). Unnamed parts are the
server's: `bm25` is BM25 with the server's template and budgets.

Every suggestion is scored, whatever the show gate says of it: the gate runs in shadow, and its
verdict and the model's confidence are recorded beside the scores, so the report can weigh what
the gate withholds against what it keeps (`report.gate_rows`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ghostpen.benchmarks.eval.execution import ScratchProject
from ghostpen.benchmarks.eval.metrics import identifier_match
from ghostpen.benchmarks.eval.strategies import STRATEGIES, identifiers
from ghostpen.context.chunker import Chunk
from ghostpen.context.gate import confidence
from ghostpen.context.prompt import Document, build_prompt
from ghostpen.context.ranker import Exclusion, RankedChunk, Ranker
from ghostpen.context.settings import ContextSettings
from ghostpen.context.template import Template, load_template
from ghostpen.server.completion import Completer, CompletionJob, RequestSpec
from ghostpen.server.context_process import ChunkCache
from ghostpen.server.engines.base import EngineRequest
from ghostpen.server.training.heldout import edit_similarity, exact_match
from ghostpen.server.training.tasks import Task, mode_of

DESIGN_STRATEGY = "edit-distance"
ORACLE = "oracle"  # not a strategy the server could run: it knows the expected text
DEADLINE_S = 3600.0  # an evaluation waits for every completion, however long the queue


@dataclass(frozen=True)
class Variant:
    name: str  # its spec
    strategy: str = DESIGN_STRATEGY
    template: str = ""  # "": the server's
    truncate: bool = True  # False: the engine's raw text, up to the mode's token budget
    context: tuple[tuple[str, int | float | bool], ...] = ()  # ContextSettings fields changed


def parse_variant(spec: str) -> Variant:
    """A variant from its spec (see the module's docstring); ValueError naming a bad part."""
    variant = Variant(spec)
    settable = {
        f.name: f.type
        for f in dataclasses.fields(ContextSettings)
        if f.type in ("int", "float", "bool")
    }
    for part in spec.split("+"):
        if part in STRATEGIES or part == ORACLE:
            variant = dataclasses.replace(variant, strategy=part)
        elif part.startswith("template:"):
            load_template(part.removeprefix("template:"))  # refuses an unknown template
            variant = dataclasses.replace(variant, template=part.removeprefix("template:"))
        elif part == "raw":
            variant = dataclasses.replace(variant, truncate=False)
        elif (setting := re.fullmatch(r"(\w+)=(-?[0-9.]+)", part)) and setting[1] in settable:
            kind = {"float": float, "bool": lambda v: bool(int(v))}.get(settable[setting[1]], int)
            changed = (*variant.context, (setting[1], kind(setting[2])))
            variant = dataclasses.replace(variant, context=changed)
        else:
            raise ValueError(
                f"variant part {part!r} is none of: a strategy ({', '.join(STRATEGIES)}, "
                f"{ORACLE}), "
                "template:NAME, raw, or FIELD=NUMBER for a context setting"
            )
    return variant


@dataclass(frozen=True)
class EvalTask:
    task: Task
    project: str
    tests: tuple[str, ...] = ()  # pytest node ids that judge a function-body task


@dataclass(frozen=True)
class Record:
    """One task under one variant: what the JSONL holds, a line each."""

    task_id: str
    project: str
    language: str
    kind: str
    variant: str
    expected: str
    predicted: str
    exact: float | None  # None: not completed (a retrieval-only run)
    edit_similarity: float | None
    identifier_exact: float | None
    identifier_f1: float | None
    oracle: bool  # a chunk of another file defines a name the expected text needs
    recalled: bool  # and the prompt's context holds one
    passed: bool | None  # function-body tasks: the project's tests pass with the completion
    prompt_tokens: int
    completion_tokens: int
    context_ms: float
    total_ms: float
    confidence: float | None = None  # the mean log-probability of the suggestion's tokens
    withheld: str = ""  # the show gate's reason to hold the suggestion back ("": shown)

    @property
    def file(self) -> str:
        """The file the task was cut from: tasks of one file are alike, so intervals resample
        files whole."""
        return f"{self.project}/{self.task_id.rsplit(':', 2)[0]}"


async def evaluate(
    completer: Completer,
    tasks: Sequence[EvalTask],
    chosen: Sequence[Variant],
    runners: dict[str, ScratchProject],
    concurrency: int,
    record: Callable[[Record], None],
    done: frozenset[tuple[str, str]] = frozenset(),
) -> None:
    """Every task under every variant, `concurrency` completions in flight; `record` gets each
    result as it comes (runs of hours keep what they did if stopped). Pairs of task id and
    variant name in `done` are not run again."""
    cache = ChunkCache(completer.context_settings.chunk_max_lines)
    runners_busy = {name: asyncio.Lock() for name in runners}
    slots = asyncio.Semaphore(concurrency)
    variants = [(variant, _completer_for(completer, variant)) for variant in chosen]

    async def one(
        item: EvalTask, chunks: list[Chunk], oracle: set[Chunk], variant: Variant, runner: Completer
    ) -> None:
        task, rank = item.task, _rank(variant, oracle)
        async with slots:
            predicted, job, outcome = await _complete(runner, task, variant, rank, chunks)
        passed = None
        if item.tests:
            async with runners_busy[item.project]:
                passed = await asyncio.to_thread(
                    runners[item.project].passes, task, predicted, item.tests
                )
        picked = {r.chunk for r in job.prompt.context}
        exact_ids, f1 = identifier_match(predicted, task.expected)
        record(
            Record(
                task.task_id, item.project, task.file.language, task.kind, variant.name,
                task.expected, predicted, exact_match(predicted, task.expected),
                edit_similarity(predicted, task.expected), exact_ids, f1, bool(oracle),
                bool(picked & oracle), passed, *outcome,
            )
        )  # fmt: skip

    async with asyncio.TaskGroup() as group:
        for item in tasks:
            chunks, oracle = candidates(cache, item.task)  # once a task, for all its variants
            for variant, runner in variants:
                if (item.task.task_id, variant.name) not in done:
                    group.create_task(one(item, chunks, oracle, variant, runner))


def retrieve_only(
    template: Template,
    context: ContextSettings,
    tasks: Sequence[EvalTask],
    chosen: Sequence[Variant],
    record: Callable[[Record], None],
    done: frozenset[tuple[str, str]] = frozenset(),
) -> None:
    """Retrieval on its own, without the engine: for each task and variant, whether the prompt's
    context holds a chunk the oracle names (recall@k), in milliseconds a task. Pairs in `done`
    are not run again."""
    cache = ChunkCache(context.chunk_max_lines)
    variants = [(variant, _parts(template, context, variant)) for variant in chosen]
    for item in tasks:
        task = item.task
        chunks, oracle = candidates(cache, task)
        document = document_of(task)
        for variant, (mine, settings) in variants:
            if (task.task_id, variant.name) in done:
                continue
            started = time.monotonic()
            rank = _rank(variant, oracle)
            prompt = build_prompt(repo_of(task), document, chunks, mine, settings, rank=rank)
            took_ms = (time.monotonic() - started) * 1000
            picked = {r.chunk for r in prompt.context}
            record(
                Record(
                    task.task_id, item.project, task.file.language, task.kind, variant.name,
                    task.expected, "", None, None, None, None, bool(oracle),
                    bool(picked & oracle), None, prompt.estimated_tokens, 0, took_ms, took_ms,
                )
            )  # fmt: skip


def candidates(cache: ChunkCache, task: Task) -> tuple[list[Chunk], set[Chunk]]:
    """The chunks of a task's open files, and those among them the oracle names."""
    chunks = [c for f in task.context for c in cache.chunks(f.path, f.language, f.text)]
    return chunks, _oracle(task, chunks)


def _rank(variant: Variant, oracle: set[Chunk]) -> Ranker:
    if variant.strategy != ORACLE:
        return STRATEGIES[variant.strategy]
    ordered = sorted(oracle, key=lambda c: (c.path, c.start_line))

    def known(query: str, chunks: Sequence[Chunk], exclude: Exclusion, top_k: int) -> list:
        return [RankedChunk(c, 1.0) for c in ordered if not exclude.covers(c)][:top_k]

    return known


def document_of(task: Task) -> Document:
    return Document(task.file.path, task.file.language, task.left + task.right, len(task.left))


def repo_of(task: Task) -> str:
    return task.file.path.split("/", 1)[0]


def _completer_for(completer: Completer, variant: Variant) -> Completer:
    return completer.varied(*_parts(completer.template, completer.context_settings, variant))


def _parts(
    template: Template, context: ContextSettings, variant: Variant
) -> tuple[Template, ContextSettings]:
    """The template and context settings a variant runs with; the show gate in shadow."""
    return (
        load_template(variant.template) if variant.template else template,
        dataclasses.replace(context, **{**dict(variant.context), "show_gate": False}),
    )


# prompt tokens, completion tokens, context ms, total ms, confidence, the show gate's verdict
Measured = tuple[int, int, float, float, float | None, str]


async def _complete(
    completer: Completer, task: Task, variant: Variant, rank: Ranker, chunks: list[Chunk]
) -> tuple[str, CompletionJob, Measured]:
    """The completion's text, its job, and what was measured of it."""
    document = document_of(task)
    mode = mode_of(task.kind)
    received = time.monotonic()
    spec = RequestSpec(f"{task.task_id}:{variant.name}", mode, 0, "", DEADLINE_S, received)
    prompt = completer.prompt(repo_of(task), document, chunks, rank=rank)
    job = completer.job(spec, document, prompt)  # stateless: variants share what they can
    if not variant.truncate:
        return await _raw(completer, job)
    text, outcome = "", None
    async for event in completer.run(job):
        text += event.text
        outcome = event.outcome or outcome
    assert outcome is not None, "a finished completion has its outcome"
    timings = outcome.timings
    return text, outcome.job, (  # its prompt as sent: fitted, if the engine found it too long
        outcome.prompt_tokens, outcome.completion_tokens,
        timings.context_s * 1000, timings.total_s * 1000, outcome.confidence, outcome.withheld,
    )  # fmt: skip


async def _raw(completer: Completer, job: CompletionJob) -> tuple[str, CompletionJob, Measured]:
    """What the engine says for the prompt, with no post-processing at all."""
    request = EngineRequest(
        job.completion_id, job.prompt.text, completer.max_tokens(job.mode), job.cache_key
    )
    text, last, logprobs = "", None, []
    async for delta in completer.engine.generate(request):
        text += delta.text
        last = delta
        logprobs += delta.logprobs
    done = time.monotonic()
    tokens = (last.prompt_tokens, last.completion_tokens) if last else (0, 0)
    return text, job, (
        *tokens, (job.prompted - job.received) * 1000, (done - job.received) * 1000,
        confidence(logprobs), "",
    )  # fmt: skip


_DEFINES = (
    r"(?:def|class|function|func|fn|struct|enum|trait|type|interface|const|let|var|static"
    r"|macro_rules!)\s+(?:\([^)]*\)\s*)?{name}\b"
    r"|^\s*(?:self\.|this\.)?{name}\s*[:=]"
    r"|^\s*(?!(?:return|new|throw|await|yield|else|case|if|while|for)\b)"
    r"(?:[\w<>\[\],.?]+\s+)+{name}\s*\("
)


def _oracle(task: Task, chunks: list[Chunk]) -> set[Chunk]:
    """The chunks of other files that define a name the expected text uses and the cursor's
    own file does not define or use before the cursor: what retrieval is for. A definition is
    recognized by its keyword (def, class, function, func, fn, type...), an assignment or a
    typed declaration at the start of a line."""
    known = set(identifiers(task.left))
    wanted = {name for name in identifiers(task.expected) if name not in known and len(name) > 2}
    if not wanted:
        return set()
    pattern = re.compile(
        "|".join(_DEFINES.format(name=re.escape(name)) for name in sorted(wanted)), re.MULTILINE
    )
    return {c for c in chunks if c.path != task.file.path and pattern.search(c.text)}
