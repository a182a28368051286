"""The quality gate: the fixed small suite of benchmarks/eval/gate.toml, run through the real
engine, must score at or above the recorded floors less their tolerance. It catches a prompt or
post-processing change that makes completions worse; the full evaluation measures by how much."""

import tomllib
from pathlib import Path

from ghostpen.benchmarks.eval.harness import Plan, eval_tasks, scratch_projects
from ghostpen.benchmarks.eval.report import METRICS
from ghostpen.benchmarks.eval.run import evaluate, parse_variant
from ghostpen.server.completion import Completer, Discard

GATE = Path(__file__).parents[2] / "benchmarks" / "eval" / "gate.toml"


async def test_the_gate_suite_scores_at_or_above_its_floors(server, settings) -> None:
    gate = tomllib.loads(GATE.read_text())
    plan = Plan(
        suites=(gate["suite"],),
        tree=None,
        tasks=gate["tasks"],
        function_tasks=gate["function_tasks"],
        kinds=tuple(gate["kinds"]),
        variants=(parse_variant(gate["variant"]),),
        seed=gate["seed"],
        concurrency=8,
    )
    tasks = eval_tasks(plan, settings)
    assert len(tasks) == gate["tasks"] + gate["function_tasks"]
    completer = Completer.from_settings(server.engine, settings, sink=Discard())
    runners = scratch_projects(tasks, settings.cache_dir / "eval")
    records = []
    try:
        await evaluate(completer, tasks, plan.variants, runners, 8, records.append)
    finally:
        for runner in runners.values():
            runner.close()
    verdicts = [r.passed for r in records if r.kind == "function"]
    assert len(verdicts) == gate["function_tasks"] and None not in verdicts
    scores = {}
    for metric, score in METRICS:
        values = [v for r in records if (v := score(r)) is not None]
        scores[metric] = sum(values) / len(values) if values else None
    below = {
        metric: f"{scores[metric]:.3f} < {floor:.3f} - {gate['tolerance'][metric]}"
        for metric, floor in gate["floor"].items()
        if scores[metric] < floor - gate["tolerance"][metric]
    }
    assert not below, f"below the gate's floors: {below}; all scores: {scores}"
