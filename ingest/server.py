"""The gRPC ingest server: validates, stamps the receive time, stores in Redis, then acknowledges.

All three RPCs go through one StreamWriter, so concurrent calls share Redis round trips. Replies carry
directives: an agent that still reports a task that was reassigned away from it is told to abandon it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from heartbeat_registry import ops
from heartbeat_registry.names import Names
from heartbeat_registry.pb import hb, hb_grpc
from heartbeat_registry.settings import Settings
from ingest import metrics, validate
from ingest.writer import Overloaded, StreamWriter, Unavailable

log = logging.getLogger(__name__)
SERVICE_NAME = hb.DESCRIPTOR.services_by_name["HeartbeatService"].full_name
MAX_BATCH = 10_000
RETRY_PUSHBACK_MS = "250"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def directives_for(beats: Sequence[hb.Heartbeat], fences: dict[str, str]) -> list[hb.Directive]:
    """ABANDON for each agent still reporting the task a reassignment fenced it off from."""
    out = []
    seen = set()
    for beat in beats:
        fence = fences.get(beat.agent_id)
        if fence is None or beat.agent_id in seen:
            continue
        task_id, _, epoch = fence.partition(" ")
        if beat.task_id == task_id:
            seen.add(beat.agent_id)
            out.append(
                hb.Directive(
                    kind=hb.Directive.ABANDON,
                    agent_id=beat.agent_id,
                    task_id=task_id,
                    epoch=int(epoch or 0),
                    reason="task reassigned",
                )
            )
    return out


class HeartbeatService(hb_grpc.HeartbeatServiceServicer):
    def __init__(self, writer: StreamWriter) -> None:
        self._writer = writer

    async def _store(
        self, rpc: str, beats: Sequence[hb.Heartbeat], received: int, context: grpc.aio.ServicerContext
    ) -> dict[str, str]:
        try:
            fences = await self._writer.write(beats, received)
        except Overloaded as exc:
            metrics.REFUSED.labels(rpc, "overloaded").inc(len(beats))
            context.set_trailing_metadata((("grpc-retry-pushback-ms", RETRY_PUSHBACK_MS),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"ingest overloaded: {exc}")
        except Unavailable as exc:
            metrics.REFUSED.labels(rpc, "redis_unavailable").inc(len(beats))
            context.set_trailing_metadata((("grpc-retry-pushback-ms", RETRY_PUSHBACK_MS),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        metrics.ACCEPTED.labels(rpc).inc(len(beats))
        return fences

    async def _refuse(self, rpc: str, exc: validate.Refusal, context: grpc.aio.ServicerContext) -> None:
        metrics.REFUSED.labels(rpc, exc.field.rpartition(".")[2]).inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Beat(self, request: hb.Heartbeat, context: grpc.aio.ServicerContext) -> hb.BeatReply:
        received = now_ms()
        try:
            validate.check(request)
        except validate.Refusal as exc:
            await self._refuse("beat", exc, context)
        fences = await self._store("beat", (request,), received, context)
        return hb.BeatReply(
            seq=request.seq, received_ms=received, directives=directives_for((request,), fences)
        )

    async def BeatBatch(
        self, request: hb.BeatBatchRequest, context: grpc.aio.ServicerContext
    ) -> hb.BeatBatchReply:
        received = now_ms()
        beats = request.heartbeats
        if not beats:
            await self._refuse("batch", validate.Refusal("heartbeats", "must not be empty"), context)
        if len(beats) > MAX_BATCH:
            await self._refuse(
                "batch", validate.Refusal("heartbeats", f"at most {MAX_BATCH} per batch ({len(beats)})"), context
            )
        try:
            for i, beat in enumerate(beats):
                validate.check(beat, f"heartbeats[{i}].")
        except validate.Refusal as exc:
            await self._refuse("batch", exc, context)
        metrics.BATCH_SIZE.observe(len(beats))
        fences = await self._store("batch", beats, received, context)
        return hb.BeatBatchReply(
            received_ms=received, accepted=len(beats), directives=directives_for(beats, fences)
        )

    async def BeatStream(
        self, request_iterator: AsyncIterator[hb.Heartbeat], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[hb.BeatReply]:
        metrics.ACTIVE_STREAMS.inc()
        try:
            async for beat in request_iterator:
                received = now_ms()
                try:
                    validate.check(beat)
                except validate.Refusal as exc:
                    await self._refuse("stream", exc, context)
                fences = await self._store("stream", (beat,), received, context)
                yield hb.BeatReply(
                    seq=beat.seq, received_ms=received, directives=directives_for((beat,), fences)
                )
        finally:
            metrics.ACTIVE_STREAMS.dec()


class RedisWatch:
    """Keeps the gRPC health status (and a metric) in step with whether Redis answers a PING."""

    def __init__(self, client: aioredis.Redis, servicer: health.aio.HealthServicer) -> None:
        self.client = client
        self.servicer = servicer
        self.up = False

    async def run(self, stop: asyncio.Event) -> None:
        first = True
        while not stop.is_set():
            try:
                await asyncio.wait_for(self.client.ping(), timeout=1.0)
                up = True
            except Exception:
                up = False
            if up != self.up or first:
                first = False
                self.up = up
                metrics.REDIS_UP.set(1 if up else 0)
                log.info("redis reachable" if up else "redis unreachable")
                status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", SERVICE_NAME):
                    await self.servicer.set(name, status)
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass


class Ingest:
    """The ingest node's parts, started and stopped in order (tests run it in-process)."""

    def __init__(self, settings: Settings) -> None:
        settings.require("redis_url")
        self.settings = settings
        self.redis = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=2.0, socket_connect_timeout=1.0, retry_on_timeout=False
        )
        self.writer = StreamWriter(self.redis, Names.of(settings), settings.stream_retention)
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
        hb_grpc.add_HeartbeatServiceServicer_to_server(HeartbeatService(self.writer), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.watch = RedisWatch(self.redis, self.health)
        self._stop = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Start serving; returns the bound gRPC port (useful with port 0)."""
        self.port = self.server.add_insecure_port(self.settings.grpc_addr)
        if not self.port:
            raise OSError(f"cannot listen on {self.settings.grpc_addr}")
        self.writer.start()
        await self.server.start()
        self._watcher = asyncio.create_task(self.watch.run(self._stop))
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight calls finish, write what is queued, close Redis."""
        await self.server.stop(grace=grace)
        await self.writer.close()
        self._stop.set()
        if self._watcher:
            await self._watcher
        await self.redis.aclose()


async def serve(settings: Settings) -> None:
    stop = ops.stop_signal()
    ingest = Ingest(settings)
    await ingest.start()
    cleanup = await ops.serve_ops(settings.ingest_metrics_addr, lambda: ingest.watch.up)
    log.info("ingest listening", extra={"grpc_addr": settings.grpc_addr, "ops_addr": settings.ingest_metrics_addr})
    await stop.wait()
    log.info("ingest stopping: draining in-flight calls")
    await ingest.stop()
    await cleanup()
    log.info("ingest stopped")
