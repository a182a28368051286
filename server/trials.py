"""A template tried before it is served: the exact prompts it builds on real code, and the
offline evaluation (ghostpen eval's tasks and scoring) of it beside the default, on the server's
own engine: what the dashboard's prompt editor runs.

The code is a pinned evaluation suite's (`trial_suite`), third-party code fetched once into the
cache; tasks are drawn once per server. A trial competes with the developers' completions for
the engine, so one runs at a time, `trial_concurrency` completions in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from ghostpen.benchmarks.eval.harness import Plan, eval_tasks
from ghostpen.benchmarks.eval.run import (
    EvalTask,
    Record,
    Variant,
    candidates,
    document_of,
    evaluate,
    repo_of,
)
from ghostpen.context.template import Template
from ghostpen.server.completion import Completer, Discard
from ghostpen.server.context_process import ChunkCache
from ghostpen.server.errors import InvalidInput
from ghostpen.server.settings import Settings
from ghostpen.server.stats import paired_bootstrap

KINDS = ("line", "rest_of_line", "block")
SCORES = ("exact", "edit_similarity")


@dataclass
class Trial:
    trial_id: str
    candidate: str  # template ids
    default: str
    total: int  # completions: each task under both templates
    started_ms: int
    done: int = 0
    status: str = "running"  # running | finished | failed
    error: str = ""
    records: list[Record] = field(default_factory=list)
    scores: dict[str, object] = field(default_factory=dict)  # once finished

    def view(self) -> dict[str, object]:
        """What the dashboard shows: progress, then each template's mean scores and the paired
        difference (candidate - default) with its bootstrap 95% CI."""
        shown: dict[str, object] = {
            "id": self.trial_id,
            "candidate": self.candidate,
            "default": self.default,
            "status": self.status,
            "done": self.done,
            "total": self.total,
            "error": self.error,
        }
        if self.status == "finished":
            shown["scores"] = self.scores
        return shown


class Trials:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._tasks: list[EvalTask] | None = None
        self._loading = asyncio.Lock()
        self._trials: OrderedDict[str, Trial] = OrderedDict()
        self._running: tuple[Trial, asyncio.Task[None]] | None = None

    async def tasks(self) -> list[EvalTask]:
        """The suite's tasks, drawn (and the suite fetched) at the first use."""
        async with self._loading:
            if self._tasks is None:
                telemetry = self._settings.telemetry
                plan = Plan(
                    suites=(telemetry.trial_suite,),
                    tree=None,
                    tasks=telemetry.trial_tasks,
                    function_tasks=0,
                    kinds=KINDS,
                    variants=(),
                    seed=0,
                    concurrency=telemetry.trial_concurrency,
                )
                self._tasks = await asyncio.to_thread(eval_tasks, plan, self._settings)
            return self._tasks

    async def preview(self, completer: Completer, template: Template) -> list[dict[str, str]]:
        """The prompt `template` builds, as `completer` would build it, for the first
        `preview_samples` tasks: the text the engine would read, byte for byte."""
        tasks = (await self.tasks())[: self._settings.telemetry.preview_samples]
        tried = completer.varied(template=template)
        return await asyncio.to_thread(_prompts, tried, tasks)  # chunking: off the event loop

    def start(self, default: Completer, candidate: Template) -> Trial:
        """Evaluate `candidate` beside `default`'s template, on `default`'s engine, adapter and
        context settings; InvalidInput while another trial runs."""
        if self._running is not None and not self._running[1].done():
            running = self._running[0]
            raise InvalidInput(
                f"trial {running.trial_id} of {running.candidate} is running "
                f"({running.done} of {running.total}); one runs at a time"
            )
        trial = Trial(
            uuid.uuid4().hex[:12],
            candidate.template_id,
            default.template.template_id,
            0,
            int(time.time() * 1000),
        )
        self._trials[trial.trial_id] = trial
        while len(self._trials) > self._settings.telemetry.trials_kept:
            self._trials.popitem(last=False)
        task = asyncio.get_running_loop().create_task(self._run(trial, default, candidate))
        self._running = (trial, task)
        return trial

    def get(self, trial_id: str) -> Trial | None:
        return self._trials.get(trial_id)

    def recent(self) -> list[Trial]:
        """The trials kept, oldest first."""
        return list(self._trials.values())

    async def close(self) -> None:
        if self._running is not None:
            self._running[1].cancel()
            await asyncio.gather(self._running[1], return_exceptions=True)

    async def _run(self, trial: Trial, default: Completer, candidate: Template) -> None:
        try:
            tasks = await self.tasks()
            trial.total = 2 * len(tasks)
            concurrency = self._settings.telemetry.trial_concurrency

            def keep(record: Record) -> None:
                trial.records.append(record)
                trial.done += 1

            quiet = default.varied(sink=Discard())  # a trial serves nobody
            runs = [
                (quiet, Variant("default")),
                (quiet.varied(template=candidate), Variant("candidate")),
            ]
            await asyncio.gather(*(evaluate(c, tasks, [v], {}, concurrency, keep) for c, v in runs))
            trial.scores, trial.status = _scores(trial.records), "finished"
        except asyncio.CancelledError:
            trial.status, trial.error = "failed", "the server stopped"
            raise
        except Exception as error:  # shown on the page, not lost in a log
            trial.status, trial.error = "failed", f"{type(error).__name__}: {error}"


def _scores(records: list[Record]) -> dict[str, object]:
    by = {(r.variant, r.task_id): r for r in records if r.variant in ("default", "candidate")}
    tasks = sorted({task for variant, task in by if variant == "default"})
    tasks = [t for t in tasks if ("candidate", t) in by]
    scores: dict[str, object] = {"tasks": len(tasks)}
    for score in SCORES:
        before = [float(getattr(by["default", t], score) or 0.0) for t in tasks]
        after = [float(getattr(by["candidate", t], score) or 0.0) for t in tasks]
        if not tasks:
            continue
        files = [by["default", t].file for t in tasks]  # tasks of one file are alike
        difference = paired_bootstrap(before, after, clusters=files)
        scores[score] = {
            "default": sum(before) / len(tasks),
            "candidate": sum(after) / len(tasks),
            "difference": dataclasses.asdict(difference),
            "described": difference.describe(),
        }
    return scores


def _prompts(completer: Completer, tasks: list[EvalTask]) -> list[dict[str, str]]:
    chunks = ChunkCache(completer.context_settings.chunk_max_lines)
    shown = []
    for item in tasks:
        task = item.task
        context, _ = candidates(chunks, task)
        prompt = completer.prompt(repo_of(task), document_of(task), context)
        shown.append(
            {
                "file": task.file.path,
                "kind": task.kind,
                "prompt": prompt.text,
                "expected": task.expected,
            }
        )
    return shown
