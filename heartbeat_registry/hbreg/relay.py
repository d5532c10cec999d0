"""`hbreg relay`: the host relay as a process.

What it does and why is heartbeat_registry/relay.py (the core, which needs only the client install).
Here is what every long-running process of the project has around it: grpc.health.v1 on the agents'
address (NOT_SERVING while the last BeatBatch got nothing through), `/metrics` and `/healthz` on
HBREG_RELAY_METRICS_ADDR, logfmt logs, and SIGTERM as a request to drain: stop taking heartbeats, send
what is queued, answer every agent still waiting, then exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import Counter, Gauge, Histogram

from heartbeat_registry.client import TlsConfig
from heartbeat_registry.core import health as ops_health
from heartbeat_registry.core.lifecycle import stop_signal
from heartbeat_registry.core.settings import PARSERS, Settings
from heartbeat_registry.errors import ConfigError
from heartbeat_registry.pb import HEARTBEAT_SERVICE, hb_grpc
from heartbeat_registry.relay import Relay, RelayObserver, RelayService, listen

log = logging.getLogger(__name__)

BATCHES = Counter("hbreg_relay_batches_total", "BeatBatch requests the ingest acknowledged")
HEARTBEATS = Counter("hbreg_relay_heartbeats_total", "Heartbeats the ingest acknowledged through the relay")
BATCH_SIZE = Histogram(
    "hbreg_relay_batch_size", "Heartbeats per BeatBatch sent upstream", buckets=(1, 10, 50, 100, 250, 500, 1000, 5000)
)
UPSTREAM = Histogram(
    "hbreg_relay_upstream_seconds",
    "One acknowledged BeatBatch round trip to the ingest",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)
REFUSED = Counter("hbreg_relay_heartbeats_refused_total", "Heartbeats answered with an error, by gRPC status", ["code"])
RETRIES = Counter("hbreg_relay_upstream_retries_total", "BeatBatch calls failed and retried, by gRPC status", ["code"])
QUEUED = Gauge("hbreg_relay_queued_heartbeats", "Heartbeats waiting for a batch")
IN_FLIGHT = Gauge("hbreg_relay_batches_in_flight", "Batches waiting for the ingest")
UP = Gauge("hbreg_relay_upstream_up", "1 while the ingest answers the relay")


class Metrics(RelayObserver):
    def batch(self, size: int, seconds: float) -> None:
        BATCHES.inc()
        HEARTBEATS.inc(size)
        BATCH_SIZE.observe(size)
        UPSTREAM.observe(seconds)

    def refused(self, code: grpc.StatusCode, count: int) -> None:
        REFUSED.labels(code.name).inc(count)

    def retried(self, code: grpc.StatusCode) -> None:
        RETRIES.labels(code.name).inc()


def upstream_endpoints(settings: Settings) -> list[str]:
    """HBREG_GRPC_ADDR, comma-separated for several ingest endpoints (the relay fails over in order)."""
    parse, expects = PARSERS["address"]
    endpoints = []
    for part in settings.grpc_addr.split(","):
        try:
            endpoints.append(parse(part.strip()))
        except ValueError:
            raise ConfigError(f"HBREG_GRPC_ADDR={settings.grpc_addr!r}: expected {expects}[,{expects}...]") from None
    return endpoints


def upstream_tls(settings: Settings) -> TlsConfig | None:
    if settings.relay_tls_ca is None:
        if settings.relay_tls_cert is not None or settings.relay_tls_key is not None:
            raise ConfigError("HBREG_RELAY_TLS_CERT and HBREG_RELAY_TLS_KEY need HBREG_RELAY_TLS_CA")
        return None
    if (settings.relay_tls_cert is None) != (settings.relay_tls_key is None):
        raise ConfigError("HBREG_RELAY_TLS_CERT and HBREG_RELAY_TLS_KEY go together (mutual TLS)")
    return TlsConfig.from_files(
        str(settings.relay_tls_ca),
        str(settings.relay_tls_cert) if settings.relay_tls_cert else None,
        str(settings.relay_tls_key) if settings.relay_tls_key else None,
    )


def relay_of(settings: Settings, observer: RelayObserver | None = None) -> Relay:
    """The relay the settings describe: upstream HBREG_GRPC_ADDR with HBREG_RELAY_TOKEN (and TLS)."""
    return Relay(
        upstream_endpoints(settings),
        token=settings.relay_token,
        tls=upstream_tls(settings),
        flush=settings.relay_flush,
        observer=observer,
    )


class RelayServer:
    """The relay and its agent-facing gRPC server, started and stopped in order (tests run it in-process)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.relay = relay_of(settings, Metrics())
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_concurrent_streams", 100_000),
                # every agent of a host reconnecting at once must not be refused by grpc's default limit
                ("grpc.server_max_pending_requests", 100_000),
                ("grpc.server_max_pending_requests_hard_limit", 100_000),
            ]
        )
        hb_grpc.add_HeartbeatServiceServicer_to_server(RelayService(self.relay), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = listen(self.server, settings.relay_addr)
        QUEUED.set_function(lambda: self.relay.queued)
        IN_FLIGHT.set_function(lambda: self.relay.in_flight)
        UP.set_function(lambda: 0 if self.relay.upstream_ok is False else 1)
        self._serving: bool | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self.relay.upstream_ok is not False

    async def start(self) -> None:
        await self.relay.start()
        await self.server.start()
        self._watch = asyncio.create_task(self._health_watch())

    async def _health_watch(self) -> None:
        while True:
            serving = self.healthy
            if serving != self._serving:
                self._serving = serving
                (log.info if serving else log.warning)("ingest answers" if serving else "ingest does not answer")
                answer = health_pb2.HealthCheckResponse
                status = answer.SERVING if serving else answer.NOT_SERVING
                for name in ("", HEARTBEAT_SERVICE):
                    await self.health.set(name, status)
            await asyncio.sleep(0.25)

    async def stop(self, grace: float = 1.0) -> None:
        """Drain: NOT_SERVING, no new heartbeats, what is queued sent and answered, then the server stops."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.health.enter_graceful_shutdown()
        await self.relay.close()
        await self.server.stop(grace=grace)


async def serve(settings: Settings) -> None:
    stop = stop_signal()
    node = RelayServer(settings)
    if settings.relay_token is None:
        log.warning("HBREG_RELAY_TOKEN is not set: the ingest accepts the relay's batches only with HBREG_AUTH=off")
    await node.start()
    cleanup = await ops_health.serve(settings.relay_metrics_addr, lambda: node.healthy)
    log.info(
        "relay listening",
        extra={
            "relay_addr": settings.relay_addr,
            "upstream": settings.grpc_addr,
            "tls": "mutual" if settings.relay_tls_cert else ("on" if settings.relay_tls_ca else "off"),
            "flush_ms": round(settings.relay_flush * 1000, 3),
            "ops_addr": settings.relay_metrics_addr,
        },
    )
    await stop.wait()
    log.info("relay stopping: draining", extra={"queued": node.relay.queued, "in_flight": node.relay.in_flight})
    await node.stop()
    await cleanup()
    log.info("relay stopped")
