"""Run tasks through the real pipeline (the Completer the server uses) for each variant: a
context strategy, a prompt template, with or without post-processing's truncation. Each
variant changes one component and keeps the others as the server runs them.

ghostpen eval SOURCE_TREE [--tasks 30] [--seed 0] [--strategies none,edit-distance,jaccard,bm25]
    [--templates generic-prefix@v1] [--ablate-truncation] [--kinds line,rest_of_line,block]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from ghostpen.benchmarks.corpus import percentiles
from ghostpen.benchmarks.eval.metrics import edit_similarity, exact_match, identifier_match
from ghostpen.benchmarks.eval.strategies import STRATEGIES, identifiers
from ghostpen.benchmarks.eval.tasks import Task
from ghostpen.context.chunker import Chunk
from ghostpen.context.postprocess import Mode
from ghostpen.context.prompt import Document
from ghostpen.context.template import Template
from ghostpen.server.completion import Completer, CompletionJob, RequestSpec
from ghostpen.server.context_process import ChunkCache
from ghostpen.server.engines.base import EngineRequest

DESIGN_STRATEGY = "edit-distance"


@dataclass(frozen=True)
class Variant:
    name: str
    strategy: str = DESIGN_STRATEGY
    template: Template | None = None  # None: the server's
    truncate: bool = True  # False: the engine's raw text, up to the mode's token budget


def variants(
    strategies: Sequence[str], templates: Sequence[Template] = (), ablate_truncation: bool = False
) -> list[Variant]:
    chosen = [Variant(strategy, strategy) for strategy in strategies]
    chosen += [Variant(f"template {t.template_id}", template=t) for t in templates]
    if ablate_truncation:
        chosen.append(Variant("no truncation", truncate=False))
    return chosen


@dataclass(frozen=True)
class Outcome:
    variant: str
    kind: str
    exact: float
    edit_similarity: float
    identifier_exact: float
    identifier_f1: float
    retrieved_relevant: bool | None  # None: no chunk of another file holds the answer's names
    context_ms: float
    total_ms: float


async def evaluate(
    completer: Completer, tasks: Sequence[Task], chosen: Sequence[Variant], repo: str
) -> list[Outcome]:
    cache = ChunkCache(completer.context_settings.chunk_max_lines)
    outcomes = []
    for number, task in enumerate(tasks):
        chunks = [c for f in task.context for c in cache.chunks(f.path, f.language, f.text)]
        relevant = _relevant(task, chunks)
        document = Document(
            task.file.path, task.file.language, task.left + task.right, len(task.left)
        )
        mode = Mode.MULTI_LINE if task.kind == "block" else Mode.SINGLE_LINE
        for variant in chosen:
            runner = completer.with_template(variant.template) if variant.template else completer
            received = time.monotonic()
            spec = RequestSpec(f"eval-{number}-{variant.name}", mode, 0, "", 120.0, received)
            prompt = runner.prompt(repo, document, chunks, rank=STRATEGIES[variant.strategy])
            job = runner.job(spec, document, prompt)
            if variant.truncate:
                text, timings = "", None
                async for event in runner.run(job):
                    text += event.text
                    timings = event.outcome.timings if event.outcome else timings
                assert timings is not None, "a finished completion has its outcome"
                context_ms, total_ms = timings.context_s, timings.total_s
            else:
                text = await _raw(runner, job)
                context_ms, total_ms = job.prompted - received, time.monotonic() - received
            exact_ids, f1 = identifier_match(text, task.expected)
            picked = {r.chunk for r in job.prompt.context}
            outcomes.append(
                Outcome(
                    variant.name,
                    task.kind,
                    exact_match(text, task.expected),
                    edit_similarity(text, task.expected),
                    exact_ids,
                    f1,
                    bool(picked & relevant) if relevant else None,
                    context_ms * 1000,
                    total_ms * 1000,
                )
            )
    return outcomes


async def _raw(completer: Completer, job: CompletionJob) -> str:
    """What the engine says for the prompt, with no post-processing at all."""
    request = EngineRequest(job.request_id, job.prompt.text, completer.max_tokens(job.mode))
    text = ""
    async for delta in completer.engine.generate(request):
        text += delta.text
    return text


def _relevant(task: Task, chunks: list[Chunk]) -> set[Chunk]:
    """Chunks of other files holding a name of the expected completion that the cursor's own
    file does not define or use before the cursor: what retrieval is for."""
    known = set(identifiers(task.left))
    wanted = {name for name in identifiers(task.expected) if name not in known and len(name) > 2}
    return {c for c in chunks if wanted & set(identifiers(c.text))} if wanted else set()


def summarize(outcomes: list[Outcome], chosen: Sequence[Variant]) -> list[dict[str, object]]:
    """A row a variant over all tasks; with more than one kind of task, a row a variant and kind
    after them (named "variant [kind]")."""
    groups = [(variant.name, variant.name, None) for variant in chosen]
    kinds = sorted({o.kind for o in outcomes})
    if len(kinds) > 1:
        groups += [(f"{v.name} [{kind}]", v.name, kind) for kind in kinds for v in chosen]
    rows = []
    for label, name, kind in groups:
        mine = [o for o in outcomes if o.variant == name and kind in (None, o.kind)]
        judged = [o for o in mine if o.retrieved_relevant is not None]
        rows.append(
            {
                "variant": label,
                "tasks": len(mine),
                "exact_match": _mean([o.exact for o in mine]),
                "edit_similarity": _mean([o.edit_similarity for o in mine]),
                "identifier_exact": _mean([o.identifier_exact for o in mine]),
                "identifier_f1": _mean([o.identifier_f1 for o in mine]),
                "recall_at_k": _mean([float(bool(o.retrieved_relevant)) for o in judged]),
                "recall_tasks": len(judged),
                "context_ms_p50": percentiles([o.context_ms for o in mine])["p50"],
                "total_ms_p50": percentiles([o.total_ms for o in mine])["p50"],
            }
        )
    return rows


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def markdown(rows: list[dict[str, object]]) -> str:
    header = [
        "variant",
        "tasks",
        "exact_match",
        "edit_similarity",
        "identifier_exact",
        "identifier_f1",
        "recall_at_k",
        "recall_tasks",
        "context_ms_p50",
        "total_ms_p50",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row[h]:.3f}" if isinstance(row[h], float) else str(row[h]) for h in header]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
