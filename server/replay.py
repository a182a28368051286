"""Replay before going live: the completions developers accepted, where their text was captured
with consent (`capture_text`), re-run offline against a candidate arm and the control, and
scored against what the developer finally kept (the 5-minute correction, else what was
accepted): exact match and edit similarity, paired by capture with bootstrap 95% CIs; latency
and prompt tokens per arm.

An arm's prompt is rendered from what was captured: the prefix and suffix windows and the
context chunks that were chosen then. So the template, the adapter and post-processing replay
faithfully; retrieval settings (top_k, the strategy, budgets wider than the captured windows)
cannot, since the chunks that were not chosen were never kept. The report says so.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ghostpen.context.settings import ContextSettings
from ghostpen.context.template import Template, load_template
from ghostpen.server import experiments, prompts
from ghostpen.server.engines.base import Engine
from ghostpen.server.errors import InvalidInput
from ghostpen.server.experiments import Arm
from ghostpen.server.settings import Settings
from ghostpen.server.stats import paired_bootstrap
from ghostpen.server.telemetry.store import Store
from ghostpen.server.training.export import ExportConfig, Sample, Tally, captured
from ghostpen.server.training.heldout import Scored, score

REPLAY_LIMIT = 200  # the most recent accepted captures replayed
REPLAY_CONCURRENCY = 4  # completions in flight
CAVEAT = (
    "prompts are rendered from the captured windows and chosen context: templates, adapters "
    "and post-processing replay; retrieval settings do not"
)


@dataclass(frozen=True)
class ReplayArm:
    name: str
    template: Template
    adapter: str
    context: ContextSettings
    settings: tuple[tuple[str, str], ...]


def arms(store: Store, settings: Settings, candidate: Arm, control: Arm) -> list[ReplayArm]:
    """The control and the candidate as they would be served: over the promoted default."""
    default = experiments.default(store)
    adapters = settings.engine.adapter_paths()
    experiments.check((control, candidate), adapters, lambda r: prompts.resolve(store, r))
    chosen = []
    for arm in (control, candidate):
        served = arm.over(default)
        template = (
            prompts.resolve(store, served.template)
            if served.template
            else load_template(settings.context.template)
        )
        context = served.context(settings.context)
        chosen.append(ReplayArm(arm.name, template, served.adapter, context, served.settings))
    return chosen


def recorded(store: Store, arm: ReplayArm, limit: int) -> list[Sample]:
    """The last `limit` accepted captures, each a sample whose prompt is in `arm`'s template."""
    with tempfile.TemporaryDirectory() as scratch:
        config = ExportConfig(Path(scratch), arm.template, arm.context, min_retained=0.0)
        return captured(store, config, Tally())[-limit:]


async def replay(
    engine: Engine,
    settings: Settings,
    store: Store,
    chosen: list[ReplayArm],
    limit: int = REPLAY_LIMIT,
    concurrency: int = REPLAY_CONCURRENCY,
) -> dict[str, object]:
    """The control and the candidate (`arms`) on the same captures; InvalidInput when there
    are none to replay."""
    by_capture = [{_key(s): s for s in recorded(store, arm, limit)} for arm in chosen]
    common = [key for key in by_capture[0] if key in by_capture[1]]
    if not common:
        raise InvalidInput(
            "no accepted completion with captured text to replay: capture needs consent "
            "(capture_text) and a 5-minute retention check"
        )
    samples = [[mine[key] for key in common] for mine in by_capture]
    results: dict[str, object] = {}
    scored: list[list[Scored]] = []
    for arm, mine in zip(chosen, samples, strict=True):
        arm_settings = dataclasses.replace(settings, context=arm.context)
        done = await score(engine, arm_settings, arm.template, mine, concurrency, arm.adapter)
        scored.append(done)
        results[arm.name] = {
            "template": arm.template.template_id,
            "adapter": arm.adapter,
            "settings": dict(arm.settings),
            "exact": _mean([s.exact for s in done]),
            "similarity": _mean([s.similarity for s in done]),
            "latency_p50_ms": _median([s.total_ms for s in done]),
            "prompt_tokens": _mean([float(s.prompt_tokens) for s in done]),
            "failed": sum(s.failed for s in done),
        }
    before, after = scored
    files = [s.file for s in samples[0]]  # completions in one file are alike: resampled whole
    differences = {
        name: paired_bootstrap(
            [getattr(s, name) for s in before], [getattr(s, name) for s in after], clusters=files
        )
        for name in ("exact", "similarity")
    }
    return {
        "captures": len(before),
        "arms": results,
        "difference": {name: dataclasses.asdict(d) for name, d in differences.items()},
        "described": {name: d.describe() for name, d in differences.items()},
        "caveat": CAVEAT,
    }


def to_text(report: dict[str, object]) -> str:
    lines = [f"{report['captures']} accepted completions replayed; {report['caveat']}"]
    for name, arm in report["arms"].items():  # type: ignore[attr-defined]
        lines.append(
            f"{name} ({arm['template']}, adapter {arm['adapter'] or 'none'}): exact "
            f"{arm['exact']:.3f}, similarity {arm['similarity']:.3f}, p50 "
            f"{arm['latency_p50_ms']:.0f} ms, {arm['prompt_tokens']:.0f} prompt tokens"
        )
    for name, described in report["described"].items():  # type: ignore[attr-defined]
        lines.append(f"candidate - control, {name}: {described}")
    return "\n".join(lines) + "\n"


def _key(sample: Sample) -> tuple[str, int, str, str]:
    """A capture, whatever template its prompt was rendered in (the same text captured twice
    is replayed once)."""
    return (sample.file, sample.time_ms, sample.prefix, sample.expected)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0
