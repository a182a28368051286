"""What people look at, checked against the database: a real Prometheus scraping /metrics, and
the report and /dashboard rendered by a real (headless) Chromium."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from ghostpen.benchmarks.server_process import free_port
from ghostpen.proto import ghostpen_pb2 as pb
from ghostpen.proto import ghostpen_pb2_grpc as pb_grpc
from ghostpen.server.app import RunningServer, start_server
from ghostpen.server.metrics import Metrics
from ghostpen.server.settings import Settings
from ghostpen.server.telemetry.report import ReportFilter, build_report, to_html
from ghostpen.server.telemetry.store import Store
from tests.chromium import FLAGS

ARTIFACTS = Path(__file__).parents[3] / "test-artifacts"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def isolated(server: RunningServer, settings: Settings, tmp_path_factory) -> AsyncIterator:
    """A second server on the same engine with a database of its own, filled with events."""
    database = tmp_path_factory.mktemp("dashboards") / "telemetry.db"
    own = dataclasses.replace(
        settings,
        telemetry=dataclasses.replace(settings.telemetry, database=str(database)),
        # shadow mode: every completion is shown, so the events below may accept its text
        context=dataclasses.replace(settings.context, show_gate=False),
    )
    running = await start_server(own, server.engine, Metrics())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.CompletionStub(channel)
            events = []
            for index in range(4):  # 4 shown; 2 accepted, 1 partly, 1 rejected; retention on 2
                request = pb.CompleteRequest(
                    request_id=f"d{index}", path=f"f{index}.py", prefix=b"x = ", max_tokens=3
                )
                chunks = [c async for c in stub.Complete(request)]
                completion_id = chunks[-1].completion_id
                shown = len("".join(c.text for c in chunks))  # what an event may accept at most
                kinds = [("shown", pb.Shown())]
                outcomes = [
                    ("accepted", pb.Accepted(accepted_chars=min(4, shown))),
                    ("accepted", pb.Accepted(accepted_chars=min(4, shown))),
                    ("partially_accepted", pb.PartiallyAccepted(accepted_chars=min(2, shown))),
                    ("rejected", pb.Rejected()),
                ]
                kinds.append(outcomes[index])
                if index < 2:
                    kinds.append(
                        (
                            "retention",
                            pb.Retention(after_s=300, retained_fraction=0.5 + index * 0.3),
                        )
                    )
                for kind, body in kinds:
                    events.append(
                        pb.TelemetryEvent(
                            event_id=uuid.uuid4().hex, completion_id=completion_id, **{kind: body}
                        )
                    )
            await stub.Report(pb.ReportRequest(events=events))
        yield running, database
    finally:  # the engine is the session's: stop only ours
        await running.server.stop(0)
        await running.web.cleanup()
        await running.writer.close()


def expected(database: Path) -> dict:
    store = Store.open(str(database), database.parent)
    try:
        return build_report(store, ReportFilter())["overall"]
    finally:
        store.close()


async def test_prometheus_scrapes_the_numbers_the_database_holds(isolated, tmp_path) -> None:
    running, database = isolated
    truth = expected(database)
    assert (truth["acceptance_rate"], truth["retention"]["300"]["mean_fraction"]) == (0.75, 0.65)
    config = tmp_path / "prometheus.yml"
    target = f"127.0.0.1:{running.web_port}"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: ghostpen\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    prometheus = subprocess.Popen(
        [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    acceptance = (
        'sum(ghostpen_completion_events_total{kind=~"accepted|partially_accepted"})'
        ' / sum(ghostpen_completion_events_total{kind="shown"})'
    )
    retention = (
        'sum(ghostpen_retention_fraction_sum{after_s="300"})'
        ' / sum(ghostpen_retention_fraction_count{after_s="300"})'
    )
    try:
        values = {}
        for _ in range(60):
            values = {
                name: await _promql(port, query)
                for name, query in (("acceptance", acceptance), ("retention", retention))
            }
            if None not in values.values():
                break
            await asyncio.sleep(0.5)
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
    assert values["acceptance"] == pytest.approx(truth["acceptance_rate"])
    assert values["retention"] == pytest.approx(truth["retention"]["300"]["mean_fraction"])


async def _promql(port: int, query: str) -> float | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    except OSError:
        return None
    result = json.loads(body)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


async def test_dashboard_and_report_render_in_chromium_with_the_database_numbers(
    isolated, tmp_path
) -> None:
    running, database = isolated
    truth = expected(database)
    report_file = tmp_path / "report.html"
    store = Store.open(str(database), tmp_path)
    report_file.write_text(to_html(build_report(store, ReportFilter())))
    store.close()
    ARTIFACTS.mkdir(exist_ok=True)
    for name, url in (
        ("dashboard", f"http://127.0.0.1:{running.web_port}/dashboard"),
        ("report", report_file.as_uri()),
    ):
        dom = await _chromium(tmp_path, "--dump-dom", url)
        assert f'<b id="shown">{truth["shown"]}</b>' in dom
        assert '<b id="acceptance">75.0%</b>' in dom
        assert '<b id="retention-300">65.0%</b>' in dom
        assert dom.count("<svg") == 2
        screenshot = ARTIFACTS / f"{name}.png"
        await _chromium(tmp_path, f"--screenshot={screenshot}", "--window-size=1280,900", url)
        assert screenshot.stat().st_size > 10_000


async def _chromium(tmp_path: Path, *arguments: str) -> str:
    profile = tmp_path / f"chromium-{time.monotonic_ns()}"
    result = await asyncio.to_thread(
        subprocess.run,
        ["chromium", *FLAGS, f"--user-data-dir={profile}", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout
