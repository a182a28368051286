"""The HTTP side: /metrics for Prometheus, /dashboard (and /dashboard.json) for people."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ghostpen.server.metrics import Metrics
from ghostpen.server.telemetry.report import ReportFilter, build_report, to_html, to_json
from ghostpen.server.telemetry.writer import TelemetryWriter

DASHBOARD_REFRESH_S = 15


async def start_web(
    host: str, port: int, metrics: Metrics, writer: TelemetryWriter
) -> tuple[web.AppRunner, int]:
    """Serve until the runner is cleaned up; returns it and the bound port (port 0 picks one)."""

    async def serve_metrics(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def dashboard(_: web.Request) -> web.Response:
        report = await writer.read(lambda store: build_report(store, ReportFilter()))
        return web.Response(text=to_html(report, DASHBOARD_REFRESH_S), content_type="text/html")

    async def dashboard_json(_: web.Request) -> web.Response:
        report = await writer.read(lambda store: build_report(store, ReportFilter()))
        return web.Response(text=to_json(report), content_type="application/json")

    app = web.Application()
    app.add_routes(
        [
            web.get("/metrics", serve_metrics),
            web.get("/dashboard", dashboard),
            web.get("/dashboard.json", dashboard_json),
        ]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, bound
