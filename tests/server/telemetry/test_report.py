"""Report numbers from a known set of events, identical on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from ghostpen.server.telemetry.records import CompletionRecord, TelemetryEvent
from ghostpen.server.telemetry.report import ReportFilter, build_report, to_csv, to_html
from ghostpen.server.telemetry.store import MIGRATIONS, Store
from tests.postgres import drop_database, start_database

DAY = 86_400_000
BASE = CompletionRecord(
    completion_id="",
    created_ms=1_700_000_000_000,
    model="qwen",
    template_id="fim@v1",
    template_hash="abc",
    engine="llama.cpp",
    language="python",
    mode="single_line",
    prompt_tokens=500,
    completion_tokens=8,
    first_token_ms=200.0,
    total_ms=300.0,
    finish="line_end",
    chars=20,
)
COMPLETIONS = [
    replace(BASE, completion_id="a", total_ms=100.0),
    replace(BASE, completion_id="b", total_ms=200.0),
    replace(BASE, completion_id="c", total_ms=300.0, created_ms=BASE.created_ms + 3 * DAY),
    replace(BASE, completion_id="d", total_ms=400.0, language="rust"),
    replace(BASE, completion_id="e", model="other"),  # served, never shown
]


def event(event_id: str, completion_id: str, kind: str, **fields: object) -> TelemetryEvent:
    return TelemetryEvent(event_id, completion_id, kind, 0, 0, **fields)


EVENTS = [
    *(event(f"s{c}", c, "shown") for c in "abcd"),
    event("acc-a", "a", "accepted", ms_since_shown=500, accepted_chars=20),
    event("acc-b", "b", "accepted", ms_since_shown=800, accepted_chars=10),
    event("part-c", "c", "partially_accepted", ms_since_shown=900, accepted_chars=5, unit="word"),
    event("rej-d", "d", "rejected", ms_since_shown=300, reason="typed_over"),
    event("r30-a", "a", "retention", after_s=30, fraction=1.0, present=True),
    event("r30-b", "b", "retention", after_s=30, fraction=0.4, present=False),
    event("r300-a", "a", "retention", after_s=300, fraction=0.9, present=True),
]


def test_report_numbers(store: Store) -> None:
    assert store.write(COMPLETIONS, EVENTS) == set()
    report = build_report(store, ReportFilter())
    overall = report["overall"]
    assert (overall["served"], overall["shown"], overall["accepted"]) == (5, 4, 2)
    assert (overall["partially_accepted"], overall["rejected"]) == (1, 1)
    assert overall["acceptance_rate"] == 0.75  # (2 whole + 1 partial) / 4 shown
    assert overall["accepted_chars"] == 35
    assert overall["retention"]["30"] == {"checks": 2, "mean_fraction": 0.7, "present_rate": 0.5}
    assert overall["retention"]["300"]["mean_fraction"] == 0.9
    assert overall["retention"]["15"]["checks"] == 0
    groups = {(g["model"], g["language"]): g for g in report["by_group"]}
    assert groups[("qwen", "python")]["acceptance_rate"] == 1.0
    assert groups[("qwen", "rust")]["acceptance_rate"] == 0.0
    assert groups[("other", "python")]["shown"] == 0
    assert groups[("qwen", "python")]["latency_ms"]["p50"] == 200.0
    assert report["bucket"] == "day"
    assert [p["shown"] for p in report["acceptance_over_time"]] == [3, 1]
    rust_only = build_report(store, ReportFilter(language="rust"))
    assert rust_only["overall"]["served"] == 1
    later = build_report(store, ReportFilter(since_ms=BASE.created_ms + DAY))
    assert later["overall"]["served"] == 1


@pytest.mark.system
def test_sqlite_and_postgresql_give_the_same_report(tmp_path: Path) -> None:
    reports = []
    url, name = start_database()
    try:
        for database in (str(tmp_path / "same.db"), url):
            opened = Store.open(database, tmp_path)
            opened.write(COMPLETIONS, EVENTS)
            reports.append(build_report(opened, ReportFilter()))
            opened.close()
    finally:
        drop_database(name)
    assert reports[0] == reports[1]


def test_duplicates_are_stored_once(store: Store) -> None:
    store.write(COMPLETIONS, EVENTS[:2])
    assert store.write([], EVENTS[:3]) == {("", "sa"), ("", "sb")}
    assert store.query("SELECT COUNT(*) FROM events") == [(3,)]


def test_event_ids_are_unique_per_user(store: Store) -> None:
    """One user's event ids cannot shadow another's: each user's "sa" is stored."""
    mine, theirs = (replace(EVENTS[0], user_id=user) for user in ("alice", "bob"))
    store.write(COMPLETIONS, [mine])
    assert store.write([], [theirs, mine]) == {("alice", "sa")}
    assert store.query("SELECT user_id FROM events ORDER BY user_id") == [("alice",), ("bob",)]


def test_the_show_gates_verdict_and_confidence_are_kept_with_the_completion(store: Store) -> None:
    withheld = replace(BASE, completion_id="w", confidence=-1.75, withheld="unsure", chars=0)
    store.write([withheld, COMPLETIONS[0]], [])
    known = store.known_completions(["w", "a"])
    assert known == {"w": withheld, "a": COMPLETIONS[0]}
    assert (known["a"].confidence, known["a"].withheld) == (None, "")


def test_the_report_narrows_to_a_user_a_team_and_a_tenant(store: Store) -> None:
    owned = [
        replace(COMPLETIONS[0], user_id="alice", team="platform", tenant="acme"),
        replace(COMPLETIONS[1], user_id="bob", team="platform", tenant="acme"),
        replace(COMPLETIONS[2], user_id="carol", team="web", tenant="acme"),
        replace(COMPLETIONS[3], user_id="dave", team="platform", tenant="other"),
    ]
    store.write(owned, [])

    def served(**chosen: str) -> int:
        return build_report(store, ReportFilter(**chosen))["overall"]["served"]

    assert served(tenant="acme") == 3
    assert served(tenant="acme", team="platform") == 2
    assert served(tenant="acme", user="carol") == 1
    assert served(tenant="other", user="alice") == 0


def test_csv_and_html_carry_the_numbers(store: Store) -> None:
    store.write(COMPLETIONS, EVENTS)
    report = build_report(store, ReportFilter())
    rows = to_csv(report).splitlines()
    assert rows[0].startswith("model,template,language,served,shown,accepted")
    assert "qwen,fim@v1,python,3,3,2,1,0,1.0,35,,0.7,,0.9,,200.0,300.0,300.0" in rows
    page = to_html(report)
    assert '<b id="acceptance">75.0%</b>' in page
    assert '<b id="retention-300">90.0%</b>' in page
    assert page.count("<svg") == 2


def test_grafana_dashboard_asks_only_for_series_the_server_exports() -> None:
    import json
    import re

    from ghostpen.server.metrics import Metrics

    dashboard = json.loads(
        (Path(__file__).parents[3] / "server/telemetry/grafana_dashboard.json").read_text()
    )
    exported = {metric.name for metric in Metrics().registry.collect()}
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 6
    for expr in exprs:
        for series in re.findall(r"ghostpen_[a-z_]+", expr):
            base = re.sub(r"_(total|sum|count|bucket)$", "", series)
            assert base in exported, series


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "old.db")
        return
    url, name = start_database()
    yield url
    drop_database(name)


def test_rows_from_before_owners_belong_to_the_local_user(
    database: str, tmp_path: Path, monkeypatch
) -> None:
    """A database made by the first schema keeps its rows through the owners migration."""
    monkeypatch.setattr("ghostpen.server.telemetry.store.MIGRATIONS", MIGRATIONS[:1])
    Store.open(database, tmp_path).close()
    completion, event = COMPLETIONS[0].row()[:14], EVENTS[0].row()[:13]  # the old columns
    execute(database, f"INSERT INTO completions VALUES ({', '.join('?' * 14)})", completion)
    execute(database, f"INSERT INTO events VALUES ({', '.join('?' * 13)})", event)
    monkeypatch.undo()
    store = Store.open(database, tmp_path)
    try:
        assert store.query("SELECT user_id, tenant FROM completions") == [("local", "default")]
        assert store.query("SELECT user_id, event_id FROM events") == [("local", "sa")]
        again = replace(EVENTS[0], user_id="local")
        assert store.write([], [again]) == {("local", "sa")}  # still known, per user
    finally:
        store.close()


def execute(database: str, sql: str, parameters: tuple) -> None:
    if database.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(database) as db:
            db.execute(sql.replace("?", "%s"), parameters)
    else:
        with contextlib.closing(sqlite3.connect(database)) as db, db:
            db.execute(sql, parameters)
