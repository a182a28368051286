"""What a product manager reads: acceptance and retention per model, template and language.

One function computes the numbers from the store (the same SQL on SQLite and PostgreSQL); the
renderers turn them into JSON, CSV, or a self-contained HTML page with SVG charts.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

from ghostpen.server.telemetry.records import RETENTION_INTERVALS_S
from ghostpen.server.telemetry.store import Store

_DAY_MS = 86_400_000
_HOUR_MS = 3_600_000


@dataclass(frozen=True)
class ReportFilter:
    since_ms: int = 0
    until_ms: int = 2**62
    model: str = ""
    template: str = ""
    language: str = ""
    user: str = ""
    team: str = ""
    tenant: str = ""  # the dashboard sets its viewer's: no one sees another tenant's numbers

    def where(self) -> tuple[str, list[object]]:
        clauses, values = ["c.created_ms >= ?", "c.created_ms < ?"], [self.since_ms, self.until_ms]
        for column, value in (
            ("model", self.model),
            ("template_id", self.template),
            ("language", self.language),
            ("user_id", self.user),
            ("team", self.team),
            ("tenant", self.tenant),
        ):
            if value:
                clauses.append(f"c.{column} = ?")
                values.append(value)
        return " AND ".join(clauses), values


def build_report(store: Store, chosen: ReportFilter) -> dict[str, object]:
    where, values = chosen.where()
    completions = store.query(
        "SELECT c.completion_id, c.created_ms, c.model, c.template_id, c.language, c.total_ms "
        f"FROM completions c WHERE {where} ORDER BY c.created_ms",
        values,
    )
    events = store.query(
        "SELECT e.completion_id, e.kind, e.accepted_chars, e.after_s, e.fraction, e.present "
        f"FROM events e JOIN completions c ON c.completion_id = e.completion_id WHERE {where}",
        values,
    )
    kinds: dict[str, set[str]] = defaultdict(set)
    chars: dict[str, int] = defaultdict(int)
    retention: dict[str, dict[int, tuple[float, int]]] = defaultdict(dict)
    for completion_id, kind, accepted_chars, after_s, fraction, present in events:
        kinds[kind].add(completion_id)
        if kind in ("accepted", "partially_accepted"):
            chars[completion_id] += accepted_chars or 0
        if kind == "retention":
            retention[completion_id][after_s] = (fraction, present)
    groups: dict[tuple[str, str, str], list[tuple]] = defaultdict(list)
    for row in completions:
        groups[(row[2], row[3], row[4])].append(row)
    span = (completions[-1][1] - completions[0][1]) if completions else 0
    bucket = _DAY_MS if span > 2 * _DAY_MS else _HOUR_MS
    return {
        "filter": chosen.__dict__,
        "overall": _summary(completions, kinds, chars, retention),
        "by_group": [
            {
                "model": model,
                "template": template,
                "language": language,
                **_summary(rows, kinds, chars, retention),
            }
            for (model, template, language), rows in sorted(groups.items())
        ],
        "acceptance_over_time": _over_time(completions, kinds, bucket),
        "bucket": "day" if bucket == _DAY_MS else "hour",
    }


def _summary(rows: list[tuple], kinds, chars, retention) -> dict[str, object]:
    ids = {row[0] for row in rows}
    shown = ids & kinds["shown"]
    accepted = ids & kinds["accepted"]
    partial = (ids & kinds["partially_accepted"]) - accepted
    rejected = ids & kinds["rejected"]
    curve = {}
    for after_s in RETENTION_INTERVALS_S:
        measured = [retention[i][after_s] for i in ids if after_s in retention.get(i, {})]
        curve[str(after_s)] = {
            "checks": len(measured),
            "mean_fraction": _mean([fraction for fraction, _ in measured]),
            "present_rate": _mean([float(bool(present)) for _, present in measured]),
        }
    latencies = sorted(row[5] for row in rows)
    return {
        "served": len(ids),
        "shown": len(shown),
        "accepted": len(accepted),
        "partially_accepted": len(partial),
        "rejected": len(rejected),
        "acceptance_rate": _ratio(len(accepted) + len(partial), len(shown)),
        "accepted_chars": sum(chars[i] for i in ids),
        "retention": curve,
        "latency_ms": {f"p{p}": _percentile(latencies, p) for p in (50, 90, 99)},
    }


def _over_time(rows: list[tuple], kinds, bucket: int) -> list[dict[str, object]]:
    buckets: dict[int, list[str]] = defaultdict(list)
    for row in rows:
        buckets[row[1] // bucket * bucket].append(row[0])
    series = []
    for start, ids in sorted(buckets.items()):
        shown = len(set(ids) & kinds["shown"])
        taken = len(set(ids) & (kinds["accepted"] | kinds["partially_accepted"]))
        series.append(
            {
                "start": datetime.fromtimestamp(start / 1000, UTC).isoformat(timespec="minutes"),
                "shown": shown,
                "acceptance_rate": _ratio(taken, shown),
            }
        )
    return series


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _percentile(ordered: list[float], p: int) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))], 1)


def to_json(report: dict[str, object]) -> str:
    return json.dumps(report, indent=2)


def to_csv(report: dict[str, object]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    header = [
        "model",
        "template",
        "language",
        "served",
        "shown",
        "accepted",
        "partially_accepted",
        "rejected",
        "acceptance_rate",
        "accepted_chars",
    ]
    header += [f"retention_{s}s" for s in RETENTION_INTERVALS_S]
    header += ["latency_p50_ms", "latency_p90_ms", "latency_p99_ms"]
    writer.writerow(header)
    for group in report["by_group"]:
        writer.writerow(
            [group[k] for k in header[:10]]
            + [group["retention"][str(s)]["mean_fraction"] for s in RETENTION_INTERVALS_S]
            + [group["latency_ms"][p] for p in ("p50", "p90", "p99")]
        )
    return out.getvalue()


def to_html(report: dict[str, object], refresh_s: int = 0) -> str:
    overall = report["overall"]
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    curve = [(s, overall["retention"][str(s)]["mean_fraction"]) for s in RETENTION_INTERVALS_S]
    cut = slice(5, 10) if report["bucket"] == "day" else slice(11, 16)  # MM-DD or HH:MM
    over_time = [(p["start"][cut], p["acceptance_rate"]) for p in report["acceptance_over_time"]]
    rows = "".join(_group_row(group) for group in report["by_group"])
    retention_headers = "".join(f"<th>kept {_interval(s)}</th>" for s in RETENTION_INTERVALS_S)
    acceptance = _percent(overall["acceptance_rate"])
    kept_5_min = _percent(overall["retention"]["300"]["mean_fraction"])
    time_chart = _line_chart(over_time)
    curve_chart = _line_chart([(_interval(s), v) for s, v in curve])
    title = "ghostpen: acceptance and retention"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{refresh}<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #1d2330; }}
.cards {{ display: flex; gap: 1rem; margin-bottom: 1.5rem; }}
.card {{ border: 1px solid #d5d9e2; border-radius: 8px; padding: .8rem 1.2rem; }}
.card b {{ display: block; font-size: 1.6rem; }}
.charts {{ display: flex; gap: 2rem; flex-wrap: wrap; }}
table {{ border-collapse: collapse; margin-top: 1.5rem; }}
th, td {{ border-bottom: 1px solid #e3e6ec; padding: .35rem .7rem; text-align: right; }}
th:nth-child(-n+3), td:nth-child(-n+3) {{ text-align: left; }}
</style></head><body>
<h1>Acceptance and retention</h1>
<div class="cards">
<div class="card">shown<b id="shown">{overall["shown"]}</b></div>
<div class="card">acceptance rate<b id="acceptance">{acceptance}</b></div>
<div class="card">kept after 5 min<b id="retention-300">{kept_5_min}</b></div>
<div class="card">accepted characters<b id="accepted-chars">{overall["accepted_chars"]}</b></div>
</div>
<div class="charts">
<figure><figcaption>Acceptance rate per {report["bucket"]}</figcaption>{time_chart}</figure>
<figure><figcaption>Share of accepted text still there</figcaption>{curve_chart}</figure>
</div>
<table id="groups"><thead><tr><th>model</th><th>template</th><th>language</th><th>shown</th>
<th>accepted</th><th>acceptance</th>{retention_headers}<th>p50 ms</th><th>p90 ms</th></tr></thead>
<tbody>{rows}</tbody></table>
</body></html>
"""


def _group_row(group: dict[str, object]) -> str:
    cells = [html.escape(str(group[k])) for k in ("model", "template", "language")]
    cells += [
        str(group["shown"]),
        str(group["accepted"] + group["partially_accepted"]),
        _percent(group["acceptance_rate"]),
    ]
    cells += [_percent(group["retention"][str(s)]["mean_fraction"]) for s in RETENTION_INTERVALS_S]
    cells += [str(group["latency_ms"]["p50"]), str(group["latency_ms"]["p90"])]
    return "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def _line_chart(points: list[tuple[str, float | None]], width: int = 420, height: int = 220) -> str:
    """A 0..100% line chart as inline SVG; missing values are skipped."""
    left, bottom, top = 40, height - 30, 10
    known = [(i, value) for i, (_, value) in enumerate(points) if value is not None]
    step = (width - left - 10) / max(1, len(points) - 1)

    def xy(i: int, value: float) -> str:
        return f"{left + i * step:.1f},{bottom - value * (bottom - top):.1f}"

    levels = [(f, bottom - f * (bottom - top)) for f in (0, 0.25, 0.5, 0.75, 1)]
    grid = "".join(
        f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e6ec"/>'
        f'<text x="4" y="{y + 4:.1f}" font-size="11">{int(f * 100)}%</text>'
        for f, y in levels
    )
    labels = "".join(
        f'<text x="{left + i * step:.1f}" y="{height - 10}" font-size="11" '
        f'text-anchor="middle">{html.escape(label)}</text>'
        for i, (label, _) in enumerate(points)
    )
    line = " ".join(xy(i, value) for i, value in known)
    dots = "".join(
        f'<circle cx="{xy(i, v).split(",")[0]}" cy="{xy(i, v).split(",")[1]}" r="3" '
        f'fill="#3660d9"/>'
        for i, v in known
    )
    return (
        f'<svg width="{width}" height="{height}" role="img">{grid}{labels}'
        f'<polyline fill="none" stroke="#3660d9" stroke-width="2" points="{line}"/>{dots}</svg>'
    )


def _interval(seconds: int) -> str:
    return f"{seconds // 60} min" if seconds >= 120 else f"{seconds} s"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"
