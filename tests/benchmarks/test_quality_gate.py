"""The quality gate: the fixed small suite of benchmarks/eval/gate.toml, run as `ghostpen eval`
runs it (its own engine, every core), must score at or above the recorded floors less their
tolerance. It catches a prompt or post-processing change that makes completions worse; the full
evaluation says by how much."""

import dataclasses
import os
import tomllib
from pathlib import Path

import pytest

from ghostpen.benchmarks.eval.harness import Plan, run_plan, variants_of
from ghostpen.benchmarks.eval.report import METRICS, read_records
from ghostpen.server.settings import Settings

GATE = Path(__file__).parents[2] / "benchmarks" / "eval" / "gate.toml"


@pytest.mark.system
@pytest.mark.timeout(1200)
def test_the_gate_suite_scores_at_or_above_its_floors(tmp_path: Path) -> None:
    gate = tomllib.loads(GATE.read_text())
    plan = Plan(
        suites=(gate["suite"],),
        tree=None,
        tasks=gate["tasks"],
        function_tasks=gate["function_tasks"],
        kinds=tuple(gate["kinds"]),
        variants=variants_of([gate["variant"]]),
        seed=gate["seed"],
        concurrency=8,
    )
    settings = Settings.load({"engine": "llama.cpp"})
    engine = dataclasses.replace(settings.engine, threads=len(os.sched_getaffinity(0)))
    run_plan(plan, dataclasses.replace(settings, engine=engine), tmp_path)
    records = read_records(tmp_path / "records.jsonl")
    assert len(records) == gate["tasks"] + gate["function_tasks"]
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
