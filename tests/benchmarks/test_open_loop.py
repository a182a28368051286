"""The open-loop load generator: arrivals, and both kinds of target on small inputs for real."""

from __future__ import annotations

import statistics
import sysconfig
from pathlib import Path

from ghostpen.benchmarks.open_loop import (
    GhostpenTarget,
    OpenAITarget,
    arrival_gaps,
    markdown,
    run_open_loop,
)
from ghostpen.benchmarks.peers import running_peer
from ghostpen.context.template import load_template
from ghostpen.server.model_store import resolve
from ghostpen.server.training.tasks import build_tasks, source_files

TREE = Path(sysconfig.get_paths()["stdlib"]) / "json"


def test_arrivals_have_the_asked_rate_and_lower_burstiness_clumps_them() -> None:
    poisson = arrival_gaps(4000, rate=5.0, burstiness=1.0, seed=1)
    bursty = arrival_gaps(4000, rate=5.0, burstiness=0.25, seed=1)
    assert arrival_gaps(10, 5.0, 1.0, seed=1) == poisson[:10]  # seeded
    for gaps in (poisson, bursty):
        assert abs(statistics.fmean(gaps) - 0.2) < 0.02
    cv = [statistics.pstdev(g) / statistics.fmean(g) for g in (poisson, bursty)]
    assert abs(cv[0] - 1.0) < 0.1 and cv[1] > 1.7  # gamma: cv = 1 / sqrt(shape)
    assert arrival_gaps(3, float("inf"), 1.0, seed=0) == [0.0, 0.0, 0.0]


async def test_ghostpen_and_a_llama_cpp_peer_serve_the_same_tasks(server, settings) -> None:
    files = source_files(TREE, settings.limits.max_file_bytes)
    tasks = build_tasks(files, 3, seed=0, max_files=12)
    ours = GhostpenTarget(f"127.0.0.1:{server.port}")
    try:
        # Three cold ~1,500-token prompts, read one after another: on 2 cores, one compute thread
        # reads ~60 tokens/s (engines/llama_cpp.py compute_threads).
        mine = await run_open_loop(ours, tasks, 2.0, 1.0, 0, max_tokens=8, deadline_s=200)
    finally:
        await ours.close()
    assert mine["completed"] == 3 and mine["errors"] == {}
    assert 0 < mine["total_ms"]["p50"] <= mine["total_ms"]["max"]

    model = resolve(settings.engine.model, settings.cache_dir, "gguf")
    with running_peer("llama-cpp", model.path, settings.engine.context_window) as (base, _):
        template = load_template(settings.context.template)
        peer = OpenAITarget(base, model.path.name, template, settings.context, "llama-cpp")
        try:
            body = peer.body(tasks[0], 8)
            assert body["prompt"].startswith("# Path: ")  # the default template, prefix-only
            assert body["stop"] == ["\n", *template.stop]
            theirs = await run_open_loop(peer, tasks, 2.0, 1.0, 0, max_tokens=8, deadline_s=60)
        finally:
            await peer.close()
    assert theirs["completed"] == 3 and theirs["errors"] == {}, theirs["errors"]
    assert theirs["first_text_ms"]["n"] >= 1
    table = markdown([mine, theirs])
    assert "| ghostpen | 3/3 |" in table and "| llama-cpp | 3/3 |" in table
    assert table.splitlines()[2].endswith("| - | - |")  # no process of its own to measure
