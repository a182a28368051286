"""An experiment's report: per arm, what its suggestions earned, each figure with its 95%
confidence sequence (server/stats.py: valid however often it is read), and each arm against the
first (the control) with a plain verdict: better, worse, or not yet known.

Figures are per suggestion shown (a completion with a `shown` event): accepted (0 or 1),
accepted characters, and retained characters at 15 s, 30 s, 2 min and 5 min (accepted characters
times the fraction still there). Retained characters per shown suggestion at 5 minutes is the
headline. A retention figure counts only suggestions shown long enough ago for its check to
have come (RETENTION_DUE_S after it); a due check that never came counts as nothing retained.
Latency is the time to the last token of the suggestions shown, p50 and p90.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

from ghostpen.server import experiments
from ghostpen.server.errors import InvalidInput
from ghostpen.server.stats import (
    Sequential,
    sequential_difference,
    sequential_mean,
    sequential_quantile,
)
from ghostpen.server.telemetry.store import Store

RETAINED_AFTER_S = (15, 30, 120, 300)
HEADLINE = "retained_chars_300s"
RETENTION_DUE_S = 60  # past a check's time, for the editor's report of it to have arrived
LATENCY_LEVELS = {"latency_p50_ms": 0.5, "latency_p90_ms": 0.9}
MEAN_FIGURES = (  # per suggestion shown
    "acceptance_rate",
    "accepted_chars",
    *(f"retained_chars_{after_s}s" for after_s in RETAINED_AFTER_S),
)


def arms_report(store: Store, name: str, now_ms: int | None = None) -> dict[str, object]:
    experiment = experiments.get(store, name)
    if experiment is None:
        raise InvalidInput(f"no experiment named {name!r}")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    rows = store.query(
        "SELECT c.completion_id, c.arm, c.created_ms, c.total_ms FROM completions c "
        "WHERE c.experiment = ? AND EXISTS (SELECT 1 FROM events s "
        "WHERE s.completion_id = c.completion_id AND s.kind = 'shown')",
        (name,),
    )
    events = store.query(
        "SELECT e.completion_id, e.kind, e.accepted_chars, e.after_s, e.fraction "
        "FROM events e JOIN completions c ON c.completion_id = e.completion_id "
        "WHERE c.experiment = ? AND e.kind IN ('accepted', 'partially_accepted', 'retention')",
        (name,),
    )
    accepted: dict[str, int] = defaultdict(int)
    retained: dict[str, dict[int, float]] = defaultdict(dict)
    for completion_id, kind, chars, after_s, fraction in events:
        if kind == "retention":
            retained[completion_id][after_s] = fraction or 0.0
        else:
            accepted[completion_id] = max(accepted[completion_id], chars or 0)
    figures: dict[str, dict[str, list[float]]] = {
        arm.name: defaultdict(list) for arm in experiment.arms
    }
    for completion_id, arm, created_ms, total_ms in rows:
        if arm not in figures:
            continue
        chars = accepted.get(completion_id, 0)
        arm_figures = figures[arm]
        arm_figures["acceptance_rate"].append(1.0 if completion_id in accepted else 0.0)
        arm_figures["accepted_chars"].append(float(chars))
        for after_s in RETAINED_AFTER_S:
            if created_ms + (after_s + RETENTION_DUE_S) * 1000 <= now_ms:
                fraction = retained[completion_id].get(after_s, 0.0) if chars else 0.0
                arm_figures[f"retained_chars_{after_s}s"].append(chars * fraction)
        arm_figures["latency_ms"].append(total_ms)
    control = experiment.arms[0].name
    arms = []
    for arm in experiment.arms:
        values = figures[arm.name]
        entry: dict[str, object] = {
            "arm": arm.name,
            "weight": arm.weight,
            "template": arm.template,
            "adapter": arm.adapter,
            "settings": dict(arm.settings),
            "shown": len(values["acceptance_rate"]),
        }
        for figure in MEAN_FIGURES:
            entry[figure] = _figure(sequential_mean(values[figure]))
            if arm.name != control:
                difference = sequential_difference(figures[control][figure], values[figure])
                entry[f"{figure}_vs_control"] = _figure(difference, difference.verdict())
        for figure, level in LATENCY_LEVELS.items():
            entry[figure] = _figure(sequential_quantile(values["latency_ms"], level))
        if arm.name != control:
            for figure in LATENCY_LEVELS:
                entry[f"{figure}_vs_control"] = {
                    "verdict": _latency_verdict(entry, arms[0], figure)
                }
        arms.append(entry)
    return {
        "experiment": experiment.name,
        "status": experiment.status,
        "started_ms": experiment.started_ms,
        "started_by": experiment.started_by,
        "note": experiment.note,
        "control": control,
        "headline": HEADLINE,
        "method": "95% confidence sequences (normal mixture, mSPRT; Johari et al. 2017), "
        "valid at every look",
        "arms": arms,
        "actions": [a.__dict__ for a in experiments.actions(store, name)],
    }


def to_text(report: dict[str, object]) -> str:
    """The report as a terminal reads it."""
    lines = [
        f"experiment {report['experiment']} ({report['status']}), control {report['control']}",
        f"{report['method']}",
    ]
    for arm in report["arms"]:  # type: ignore[attr-defined]
        lines.append(f"\narm {arm['arm']} (weight {arm['weight']:g}): {arm['shown']} shown")
        for figure in (*MEAN_FIGURES, *LATENCY_LEVELS):
            value = arm[figure]
            line = f"  {figure}: {_described(value)}"
            versus = arm.get(f"{figure}_vs_control")
            if versus:
                line += f"; vs control: {versus['verdict']}"
                if "estimate" in versus:
                    line += f" {_described(versus)}"
            lines.append(line)
    return "\n".join(lines) + "\n"


def _figure(value: Sequential, verdict: str = "") -> dict[str, object]:
    finite = math.isfinite(value.low) and math.isfinite(value.high)
    figure: dict[str, object] = {
        "estimate": round(value.estimate, 4),
        "low": round(value.low, 4) if finite else None,
        "high": round(value.high, 4) if finite else None,
        "count": value.count,
    }
    if verdict:
        figure["verdict"] = verdict
    return figure


def _latency_verdict(arm: dict[str, object], control: dict[str, object], figure: str) -> str:
    """Better or worse only when the two arms' intervals do not overlap."""
    mine, theirs = arm[figure], control[figure]
    if None in (mine["low"], theirs["low"]):  # type: ignore[index]
        return "not yet known"
    if mine["high"] < theirs["low"]:  # type: ignore[index]
        return "better"
    if mine["low"] > theirs["high"]:  # type: ignore[index]
        return "worse"
    return "not yet known"


def _described(value: dict[str, object]) -> str:
    if value["low"] is None:
        return f"{value['estimate']} (CI not yet known)"
    return f"{value['estimate']} (CI {value['low']} to {value['high']})"
