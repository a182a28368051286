"""The HTTP side: /metrics for Prometheus, /dashboard (and /dashboard.json) for people.

The dashboard reads through its own store process and connection, never the telemetry writer's,
and a report is reused for `dashboard_cache_s`: a page refreshed by many people costs one query.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ghostpen.server.errors import StoreUnavailable
from ghostpen.server.metrics import Metrics
from ghostpen.server.telemetry.report import ReportFilter, build_report, to_html, to_json
from ghostpen.server.telemetry.store_process import StoreProcess

DASHBOARD_REFRESH_S = 15


class ReportCache:
    """The latest report, computed once at a time and kept `ttl_s`."""

    def __init__(self, store: StoreProcess, ttl_s: float) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._report: dict[str, object] | None = None
        self._made = 0.0
        self._making: asyncio.Task[dict[str, object]] | None = None

    async def report(self) -> dict[str, object]:
        if self._report is not None and time.monotonic() - self._made < self._ttl_s:
            return self._report
        if self._making is None:
            self._making = asyncio.create_task(self._store.call(build_report, ReportFilter()))
        making = self._making
        try:
            self._report = await asyncio.shield(making)
            self._made = time.monotonic()
        finally:
            if self._making is making and making.done():
                self._making = None
        return self._report


async def start_web(
    host: str, port: int, metrics: Metrics, reports: ReportCache
) -> tuple[web.AppRunner, int]:
    """Serve until the runner is cleaned up; returns it and the bound port (port 0 picks one)."""

    async def serve_metrics(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def dashboard(_: web.Request) -> web.Response:
        report = await _report(reports)
        return web.Response(text=to_html(report, DASHBOARD_REFRESH_S), content_type="text/html")

    async def dashboard_json(_: web.Request) -> web.Response:
        report = await _report(reports)
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


async def _report(reports: ReportCache) -> dict[str, object]:
    try:
        return await reports.report()
    except StoreUnavailable as error:
        raise web.HTTPServiceUnavailable(text=str(error)) from None
