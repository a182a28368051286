"""Build the gRPC server around an engine, run it, and shut it down gracefully."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ghostpen.server import wire
from ghostpen.server.arms import Traffic
from ghostpen.server.auth import Authenticator, TokenFile
from ghostpen.server.chunker_process import ChunkerProcess
from ghostpen.server.completion import Completer
from ghostpen.server.console import Console
from ghostpen.server.context_process import ContextProcess
from ghostpen.server.engines.base import Engine
from ghostpen.server.engines.factory import start_engine
from ghostpen.server.errors import StoreUnavailable
from ghostpen.server.inline import InlineCompletions
from ghostpen.server.ledger import Ledger
from ghostpen.server.metrics import Metrics
from ghostpen.server.service import CompletionService
from ghostpen.server.settings import Settings, TelemetrySettings
from ghostpen.server.telemetry.ingest import Telemetry
from ghostpen.server.telemetry.store_process import StoreProcess
from ghostpen.server.telemetry.writer import TelemetryWriter
from ghostpen.server.trials import Trials
from ghostpen.server.web import ReportCache, start_web

log = logging.getLogger(__name__)
SERVICE_NAME = wire.SERVICE.full_name
# Health of the process alone, whatever its engine and store do: for liveness probes, which
# must not restart a frontend because its upstreams are down. It goes NOT_SERVING on drain.
LIVENESS_SERVICE = "liveness"
SETTLE_S = 1.0  # after the drain, for handlers to write the statuses it decided


@dataclass
class RunningServer:
    server: grpc.aio.Server
    service: CompletionService
    health: health.aio.HealthServicer
    engine: Engine
    metrics: Metrics
    writer: TelemetryWriter
    context: ContextProcess
    chunker: ChunkerProcess
    loop_watch: asyncio.Task[None]
    expiry: asyncio.Task[None]  # deletes captured text past its retention period
    following: asyncio.Task[None]  # reads the running experiment and the default arm
    traffic: Traffic
    port: int
    web: web.AppRunner | None = None
    web_port: int = 0
    dashboard: StoreProcess | None = None  # the web side's own reader
    trials: Trials | None = None  # the console's template trials
    stopped: bool = False

    async def stop(self, grace_s: float) -> None:
        """Drain, then close: health turns NOT_SERVING at once (and stays so), work in flight
        gets `grace_s`, and queued telemetry is written before the store closes. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        await self.health.enter_graceful_shutdown()
        await self.service.drain(grace_s)
        await self.server.stop(min(SETTLE_S, grace_s))
        self.loop_watch.cancel()
        self.expiry.cancel()
        self.following.cancel()
        if self.web is not None:
            await self.web.cleanup()
        if self.trials is not None:
            await self.trials.close()
        if self.dashboard is not None:
            await self.dashboard.close()
        await self.writer.close()
        await self.context.close()
        await self.chunker.close()
        await self.engine.close()


async def start_server(settings: Settings, engine: Engine, metrics: Metrics) -> RunningServer:
    """Start serving on settings.server (port 0 picks a free port; the bound one is returned)."""
    limit = settings.server.max_message_bytes
    auth = Authenticator(settings.auth, TokenFile.at(settings.auth, settings.cache_dir))
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # A peer that vanished (laptop closed, network gone) is found and its session freed.
            ("grpc.keepalive_time_ms", int(settings.server.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(settings.server.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )
    stored = settings.telemetry
    store = StoreProcess("writer", stored.database, settings.cache_dir, stored.store_probe_s)
    await store.start()  # a database that cannot be opened stops the start, with its reason
    writer = TelemetryWriter(
        store, stored.write_batch_max, stored.known_completions, stored.retry_s
    )
    writer.start()
    telemetry = Telemetry(writer, metrics, settings.limits.max_request_id_chars, stored.captures)
    ledger = Ledger(metrics, telemetry.record, stored.record_commit_wait_ms / 1000, stored.captures)
    adapters = settings.engine.adapter_paths()
    traffic = Traffic(Completer.from_settings(engine, settings, ledger), adapters)
    await traffic.refresh(store.call)  # a Complete call is served with the default of the start
    completer = traffic.default
    context = ContextProcess(completer.context_settings, completer.template)
    chunker = ChunkerProcess(settings.context)
    inline = InlineCompletions(completer, context)
    service = CompletionService(
        completer, traffic, chunker, inline, telemetry, settings, metrics, auth
    )
    server.add_generic_rpc_handlers((wire.handlers(service),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{settings.server.host}:{settings.server.port}"
    if settings.auth.tls_cert:
        key = Path(settings.auth.tls_key).read_bytes()
        chain = Path(settings.auth.tls_cert).read_bytes()
        port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, chain)]))
    else:
        port = server.add_insecure_port(address)
    await server.start()

    async def set_health(serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)

    await set_health(True)
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_updates: set[asyncio.Task[None]] = set()
    parts = {"engine": True, "store": True}  # serving while every part is

    def watcher(part: str) -> Callable[[bool], None]:
        def changed(ok: bool) -> None:
            parts[part] = ok
            task = asyncio.get_running_loop().create_task(set_health(all(parts.values())))
            health_updates.add(task)
            task.add_done_callback(health_updates.discard)

        return changed

    engine.watch(watcher("engine"))
    store.watch(watcher("store"))
    metrics.watch_engine(engine.stats)
    loop_watch = asyncio.get_running_loop().create_task(metrics.watch_loop())
    expiry = asyncio.get_running_loop().create_task(_expire_captured(writer, stored))
    following = asyncio.get_running_loop().create_task(
        traffic.follow(store.call, stored.experiment_refresh_s)
    )
    running = RunningServer(
        server,
        service,
        health_servicer,
        engine,
        metrics,
        writer,
        context,
        chunker,
        loop_watch,
        expiry,
        following,
        traffic,
        port,
    )
    if settings.server.metrics_port >= 0:
        reader = StoreProcess(
            "dashboard", stored.database, settings.cache_dir, stored.store_probe_s
        )
        trials = Trials(settings)
        console = Console(reader, store, traffic, trials, settings.auth, adapters)
        running.web, running.web_port = await start_web(
            settings.server.host,
            settings.server.metrics_port,
            metrics,
            ReportCache(reader, stored.dashboard_cache_s),
            auth,
            settings.auth,
            console.routes,
        )
        running.dashboard, running.trials = reader, trials
    return running


async def _expire_captured(writer: TelemetryWriter, settings: TelemetrySettings) -> None:
    """Delete captured text older than capture_retention_days, at start and every
    capture_purge_s after: whether or not capture is on now, text kept before expires."""
    while True:
        before_ms = int((time.time() - settings.capture_retention_days * 86_400) * 1000)
        try:
            texts, corrections = await writer.delete_captured("*", None, before_ms)
        except StoreUnavailable as error:
            log.warning("expired captured text not deleted yet: %s", error)
        except Exception:  # a bug of ours must not end the expiry for good
            log.exception("expired captured text not deleted")
        else:
            if texts:
                log.info("deleted %d expired captured texts, %d corrections", texts, corrections)
        await asyncio.sleep(settings.capture_purge_s)


async def serve(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM."""
    metrics = Metrics()
    engine = await start_engine(settings.engine, settings.cache_dir, metrics)
    running = await start_server(settings, engine, metrics)
    scheme = "https" if settings.auth.tls_cert else "http"
    web_address = f"{scheme}://{settings.server.host}:{running.web_port}"
    print(
        f"ghostpen serving {engine.model_id} on {engine.name} at "
        f"{settings.server.host}:{running.port}"
        + (f"; {web_address}/metrics and {web_address}/dashboard" if running.web else ""),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    grace_s = settings.server.shutdown_grace_s
    log.info("draining (shutdown_grace_s=%g)", grace_s)
    started = time.monotonic()
    await running.stop(grace_s)
    log.info("stopped in %.2f s", time.monotonic() - started)
