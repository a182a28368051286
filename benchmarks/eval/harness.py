"""`ghostpen eval`: the tasks of the suites (or a local tree), run through the real engine under
each variant, written as they finish to OUT/records.jsonl, with OUT/summary.json (what ran, how
long, how fast) and OUT/report.md (scores and differences with their CIs)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ghostpen.benchmarks.eval.execution import ScratchProject, function_tasks
from ghostpen.benchmarks.eval.report import (
    gate_markdown,
    gate_rows,
    markdown,
    read_records,
    summary,
)
from ghostpen.benchmarks.eval.run import (
    EvalTask,
    Record,
    Variant,
    candidates,
    evaluate,
    parse_variant,
    retrieve_only,
)
from ghostpen.benchmarks.eval.suites import load_projects, project_files, suite
from ghostpen.context.template import load_template
from ghostpen.server.completion import Completer, Discard
from ghostpen.server.context_process import ChunkCache
from ghostpen.server.settings import Settings
from ghostpen.server.training.tasks import build_tasks, source_files


@dataclass(frozen=True)
class Plan:
    suites: tuple[str, ...]  # or () with a tree
    tree: Path | None
    tasks: int  # per suite (or for the tree), split evenly between its projects
    function_tasks: int  # per suite, split between its projects that have tests
    kinds: tuple[str, ...]
    variants: tuple[Variant, ...]
    seed: int
    concurrency: int
    retrieval_only: bool = False  # no engine: recall@k of each variant's context only
    # Only the tasks whose expected text needs a definition another open file holds (the
    # retrieval oracle is not empty): the selection CrossCodeEval makes.
    needs_context: bool = False


def eval_tasks(plan: Plan, settings: Settings) -> list[EvalTask]:
    """The plan's tasks, deterministic for its seed: those drawn, or with `needs_context` the
    drawn tasks that need another open file's definition."""
    drawn = _drawn(plan, settings)
    if not plan.needs_context:
        return drawn
    chunks = ChunkCache(settings.context.chunk_max_lines)
    return [item for item in drawn if candidates(chunks, item.task)[1]]


def _drawn(plan: Plan, settings: Settings) -> list[EvalTask]:
    max_files, max_bytes = settings.limits.max_files, settings.limits.max_file_bytes
    if plan.tree is not None:
        files = source_files(plan.tree, max_bytes)
        tasks = build_tasks(files, plan.tasks, plan.seed, max_files, plan.kinds)
        return [EvalTask(task, plan.tree.name) for task in tasks]
    cache = settings.cache_dir / "eval"
    found = []
    for name in plan.suites:
        projects = suite(name)
        files = {p.name: project_files(p, cache, max_bytes) for p in projects}
        for index, project in enumerate(projects):
            count = _share(plan.tasks, len(projects), index)
            tasks = build_tasks(files[project.name], count, plan.seed, max_files, plan.kinds)
            found += [EvalTask(task, project.name) for task in tasks]
        tested = [p for p in projects if p.tests]
        for index, project in enumerate(tested):
            count = _share(plan.function_tasks, len(tested), index)
            checked = function_tasks(
                project, cache, files[project.name], count, plan.seed, max_files
            )
            found += [EvalTask(c.task, project.name, c.tests) for c in checked]
    return found


def run_plan(
    plan: Plan, settings: Settings, out: Path, resume: bool = False
) -> list[dict[str, object]]:
    """Run the plan; write the records, the summary and the report under `out`. With `resume`,
    the plan's records already in `out` are kept and only the rest run: a run of an hour that
    stopped goes on where it was."""
    from ghostpen.server.engines.factory import start_in_process

    started = time.time()
    tasks = eval_tasks(plan, settings)
    kept = _resumable(out / "records.jsonl", tasks, plan.variants) if resume else []
    done = frozenset((r.task_id, r.variant) for r in kept)
    total = len(tasks) * len(plan.variants) - len(kept)
    planned = time.time()
    out.mkdir(parents=True, exist_ok=True)
    records: list[Record] = []

    def opened() -> TextIO:
        jsonl = (out / "records.jsonl").open("w", encoding="utf-8")
        jsonl.writelines(json.dumps(dataclasses.asdict(r)) + "\n" for r in kept)
        return jsonl

    async def run() -> None:
        if plan.retrieval_only:
            with opened() as jsonl:
                template = load_template(settings.context.template)
                keep = _writer(records, jsonl, total)
                retrieve_only(template, settings.context, tasks, plan.variants, keep, done)
            return
        engine = await start_in_process(settings.engine, settings.cache_dir)
        # An evaluation serves nobody: its outcomes are neither counted nor stored.
        completer = Completer.from_settings(engine, settings, sink=Discard())
        runners = scratch_projects(tasks, settings.cache_dir / "eval")
        try:
            with opened() as jsonl:
                keep = _writer(records, jsonl, total)
                await evaluate(
                    completer, tasks, plan.variants, runners, plan.concurrency, keep, done
                )
        finally:
            for runner in runners.values():
                runner.close()
            await engine.close()

    asyncio.run(run())
    finished = time.time()
    names = [v.name for v in plan.variants]
    completions = len(records)  # run now; `kept` ran before
    records = kept + records
    rows = summary(records, names)
    gate = [] if plan.retrieval_only else gate_rows(records, names)
    meta = {
        "suites": list(plan.suites),
        "tree": str(plan.tree) if plan.tree else None,
        "seed": plan.seed,
        "tasks": len(tasks),
        "needs_context": plan.needs_context,
        "kinds": list(plan.kinds),
        "variants": names,
        "concurrency": plan.concurrency,
        "model": settings.engine.model,
        "template": settings.context.template,
        "engine": settings.engine.engine,
        "threads": settings.engine.threads,
        "cpu": _cpu(),
        "resumed": len(kept),
        "planning_s": round(planned - started, 1),
        "running_s": round(finished - planned, 1),
        "completions_per_minute": round(completions / max(finished - planned, 1e-9) * 60, 1),
        "summary": rows,
        "gate": gate,
    }
    (out / "summary.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    earlier = f" ({len(kept)} kept from an earlier run)" if kept else ""
    header = (
        f"{len(tasks)} tasks x {len(names)} variants = {len(records)} completions{earlier}; "
        f"{completions} in {meta['running_s']} s ({meta['completions_per_minute']} a minute), "
        f"{plan.concurrency} in flight; tasks planned in {meta['planning_s']} s. "
        f"CPU: {meta['cpu']}.\n\n"
    )
    report = header + markdown(rows, names) + "\n"
    if gate:
        report += "\n" + gate_markdown(gate) + "\n"
    (out / "report.md").write_text(report, encoding="utf-8")
    return rows


def scratch_projects(tasks: Sequence[EvalTask], cache: Path) -> dict[str, ScratchProject]:
    """A scratch copy of each project whose tests judge some of `tasks`; close them after."""
    known = load_projects()
    return {
        name: ScratchProject(known[name], cache) for name in {t.project for t in tasks if t.tests}
    }


def _resumable(path: Path, tasks: Sequence[EvalTask], variants: Sequence[Variant]) -> list[Record]:
    """The records at `path` of this plan's pairs of task and variant, each once."""
    if not path.exists():
        return []
    planned = {(t.task.task_id, v.name) for t in tasks for v in variants}
    kept: dict[tuple[str, str], Record] = {}
    for record in read_records(path):
        kept.setdefault((record.task_id, record.variant), record)
    return [record for pair, record in kept.items() if pair in planned]


def _writer(records: list[Record], jsonl: TextIO, total: int) -> Callable[[Record], None]:
    """Keeps each record and writes it at once: a run stopped midway keeps what it did. Says
    how far it is, how fast and how long it has left at every twentieth of the `total`."""
    started = time.monotonic()
    step = max(total // 20, 1)

    def keep(record: Record) -> None:
        records.append(record)
        jsonl.write(json.dumps(dataclasses.asdict(record)) + "\n")
        jsonl.flush()
        done = len(records)
        if done % step == 0 or done == total:
            rate = done / max(time.monotonic() - started, 1e-9) * 60
            left = (total - done) / rate
            print(
                f"eval: {done} of {total} ({done / total:.0%}), {rate:,.1f} a minute, "
                f"about {left:,.0f} min left",
                file=sys.stderr,
                flush=True,
            )

    return keep


def _share(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def variants_of(specs: Sequence[str]) -> tuple[Variant, ...]:
    return tuple(parse_variant(spec) for spec in specs)
