"""The HTTP side: /metrics for Prometheus, /dashboard (and /dashboard.json) for people, and the
console's pages (server/console.py).

The dashboard shows its viewer's tenant, narrowed by its query: `?user=alice`, `?team=platform`,
`?model=...&language=python`.

The dashboard reads through its own store process and connection, never the telemetry writer's,
and a report is reused for `dashboard_cache_s`: a page refreshed by many people costs one query.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ghostpen.server.auth import Authenticator
from ghostpen.server.errors import LimitExceeded, StoreUnavailable, Unauthenticated
from ghostpen.server.identity import Identity
from ghostpen.server.metrics import Metrics
from ghostpen.server.settings import AuthSettings
from ghostpen.server.telemetry.report import ReportFilter, build_report, to_html, to_json
from ghostpen.server.telemetry.store_process import StoreProcess

DASHBOARD_REFRESH_S = 15
REPORTS_KEPT = 64  # filters whose reports are cached
FILTERS = ("model", "template", "language", "user", "team")
MAX_FILTER_CHARS = 256
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
VIEWER = web.RequestKey("viewer", Identity)


class ReportCache:
    """Reports by filter, each computed once at a time and kept `ttl_s`; at most `REPORTS_KEPT`
    filters, least recent out."""

    def __init__(self, store: StoreProcess, ttl_s: float) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._reports: OrderedDict[ReportFilter, tuple[float, dict[str, object]]] = OrderedDict()
        self._making: dict[ReportFilter, asyncio.Task[dict[str, object]]] = {}

    async def report(self, chosen: ReportFilter) -> dict[str, object]:
        kept = self._reports.get(chosen)
        if kept is not None and time.monotonic() - kept[0] < self._ttl_s:
            self._reports.move_to_end(chosen)
            return kept[1]
        making = self._making.get(chosen)
        if making is None:
            making = asyncio.create_task(self._store.call(build_report, chosen))
            self._making[chosen] = making
        try:
            report = await asyncio.shield(making)
        finally:
            if making.done() and self._making.get(chosen) is making:
                del self._making[chosen]
        self._reports[chosen] = (time.monotonic(), report)
        self._reports.move_to_end(chosen)
        if len(self._reports) > REPORTS_KEPT:
            self._reports.popitem(last=False)
        return report


async def start_web(
    host: str,
    port: int,
    metrics: Metrics,
    reports: ReportCache,
    auth: Authenticator,
    settings: AuthSettings,
    pages: Callable[[Callable[[web.Request], Identity]], Sequence[web.RouteDef]] = lambda _: (),
) -> tuple[web.AppRunner, int]:
    """Serve until the runner is cleaned up; returns it and the bound port (port 0 picks one).
    With authentication on, every page wants a token: `Authorization: Bearer`, or a browser's
    Basic login with the token as its password; /metrics also takes `metrics_token`."""

    @web.middleware
    async def authenticated(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        scrape = settings.metrics_token
        scraper = scrape and secrets.compare_digest(given.encode(), f"Bearer {scrape}".encode())
        if request.path == "/metrics" and scraper:
            return await handler(request)
        try:
            request[VIEWER] = auth.identify(given, request.remote or "")
        except Unauthenticated as error:
            raise web.HTTPUnauthorized(
                text=str(error), headers={"WWW-Authenticate": 'Basic realm="ghostpen"'}
            ) from None
        except LimitExceeded as error:
            raise web.HTTPTooManyRequests(text=str(error)) from None
        return await handler(request)

    async def serve_metrics(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def dashboard(request: web.Request) -> web.Response:
        report = await _report(reports, request)
        return web.Response(text=to_html(report, DASHBOARD_REFRESH_S), content_type="text/html")

    async def dashboard_json(request: web.Request) -> web.Response:
        report = await _report(reports, request)
        return web.Response(text=to_json(report), content_type="application/json")

    app = web.Application(middlewares=[authenticated])
    app.add_routes(
        [
            web.get("/metrics", serve_metrics),
            web.get("/dashboard", dashboard),
            web.get("/dashboard.json", dashboard_json),
            *pages(lambda request: request[VIEWER]),
        ]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls_context(settings))
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, bound


def tls_context(settings: AuthSettings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


def _filter(request: web.Request) -> ReportFilter:
    """The page's query (model, template, language, user, team) within its viewer's tenant."""
    chosen = {}
    for name in FILTERS:
        value = request.query.get(name, "")
        if len(value) > MAX_FILTER_CHARS:
            raise web.HTTPBadRequest(
                text=f"{name} has {len(value)} characters; the limit is {MAX_FILTER_CHARS}"
            )
        chosen[name] = value
    return ReportFilter(**chosen, tenant=request[VIEWER].tenant)


async def _report(reports: ReportCache, request: web.Request) -> dict[str, object]:
    try:
        return await reports.report(_filter(request))
    except StoreUnavailable as error:
        raise web.HTTPServiceUnavailable(text=str(error)) from None
