"""The gRPC ingest server: authenticates, validates, stamps the receive time, stores in Redis, then
acknowledges.

All three RPCs go through one StreamWriter, so concurrent calls share Redis round trips. Replies carry
directives: an agent that still reports a task that was reassigned away from it is told to abandon it.
Refusals name the field or the limit: INVALID_ARGUMENT (bad heartbeat), UNAUTHENTICATED (no or bad
credentials), PERMISSION_DENIED (agent_id not the caller's), RESOURCE_EXHAUSTED (rate or size limit,
ingest overloaded, more new streams at once than HBREG_STREAM_OPEN_RATE) and UNAVAILABLE (Redis down);
the last two carry a `grpc-retry-pushback-ms` hint.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Sequence

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.exceptions import ConnectionError as RedisConnectionError

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core import health as ops_health
from heartbeat_registry.core import redis_client
from heartbeat_registry.core.lifecycle import stop_signal
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.tasks import TaskStore
from heartbeat_registry.errors import ConfigError
from heartbeat_registry.pb import HEARTBEAT_SERVICE, TASK_SERVICE, hb, hb_grpc
from ingest import metrics, validate
from ingest.auth import Authenticator, AuthError, AuthInterceptor, Identity, Requests
from ingest.directives import directives_for
from ingest.limits import RateLimiter, StreamAdmission
from ingest.tasks import UNREACHABLE, TaskService
from ingest.writer import Batch, Overloaded, StreamWriter, Unavailable

log = logging.getLogger(__name__)
RETRY_PUSHBACK_MS = 250
GC_THRESHOLDS = (10_000, 10, 100)


def _refusal(exc: Overloaded | Unavailable) -> Refused:
    """What the caller is told when the writer cannot take its heartbeats."""
    if isinstance(exc, Overloaded):
        return Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", f"ingest overloaded: {exc}", RETRY_PUSHBACK_MS)
    return Refused(grpc.StatusCode.UNAVAILABLE, "redis_unavailable", str(exc), RETRY_PUSHBACK_MS)


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, message: str, retry_ms: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.retry_ms = retry_ms


class HeartbeatService(hb_grpc.HeartbeatServiceServicer):
    """The three RPCs. Each takes the caller's Identity as a third argument, which the AuthInterceptor
    passes (so the signatures differ from the generated servicer's, on purpose)."""

    def __init__(self, writer: StreamWriter, tasks: TaskStore, settings: Settings) -> None:
        self._writer = writer
        self._tasks = tasks
        self._limiter = RateLimiter(settings.rate_limit, settings.rate_burst)
        self._admission = StreamAdmission(settings.stream_open_rate, settings.stream_open_rate)
        self._max_batch = settings.max_batch
        self._max_skew_ms = int(settings.max_clock_skew * 1000)

    def _fields(self, beat: hb.Heartbeat, identity: Identity, received: int, now: float, at: str) -> validate.Fields:
        """The heartbeat's fields for the writer; raises Refused if it may not be stored (`at`: where in
        the request it sits, as the field path's prefix)."""
        fields = validate.fields_of(beat)
        agent = fields[0]
        try:
            validate.check_fields(*fields, received, self._max_skew_ms)
        except validate.Refusal as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, exc.field, at + str(exc)) from None
        if not identity.allows(agent):
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                "identity",
                f"{at}agent_id: {agent!r} is not an agent the caller may speak for "
                f"(credentials are for {identity.agent_id!r})",
            )
        limiter = self._limiter
        if not limiter.allow(agent, now):
            retry = limiter.retry_after_ms(agent)
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "rate_limit",
                f"{at}agent_id: {agent!r} exceeds the rate limit of "
                f"{limiter.rate:g} heartbeats/s (burst {limiter.burst:g}); retry in {retry} ms",
                retry,
            )
        return fields

    def _admit(self, beats: Sequence[hb.Heartbeat], identity: Identity, received: int, now: float) -> Batch:
        """Pack a batch's `beats` for the writer; raise Refused for the first one that may not be stored."""
        batch = self._writer.batch(received)
        try:
            for i, beat in enumerate(beats):
                batch.add(*self._fields(beat, identity, received, now, f"heartbeats[{i}]."), beat.seq)
        except Refused:
            # a refused request stores nothing, so it uses none of its agents' rates: a relay sends the
            # rest of a refused batch again, and those agents must not pay for the refused attempt
            for admitted in beats[:i]:
                self._limiter.refund(admitted.agent_id)
            raise
        return batch

    async def _handle(
        self,
        rpc: str,
        beats: Sequence[hb.Heartbeat],
        identity: Identity,
        context: grpc.aio.ServicerContext,
        received: int,
        batch: bool = False,
    ) -> list[hb.Directive]:
        """Admit and store `beats`; aborts the call with the right status when they are refused. Returns
        the directives for the reply, after an assignee's RUNNING beat made it the task's owner."""
        now = time.monotonic()
        try:
            if batch:
                pending = self._writer.write(self._admit(beats, identity, received, now))
            else:  # one heartbeat: packed straight into its shard's next round trip
                (beat,) = beats
                pending = self._writer.write_one(*self._fields(beat, identity, received, now, ""), beat.seq, received)
            self._limiter.sweep(now)
            try:
                news = await pending
            except (Overloaded, Unavailable) as exc:
                raise _refusal(exc) from None
        except Refused as refusal:
            await self._refuse(context, rpc, refusal, len(beats))
        metrics.ACCEPTED_BY_RPC[rpc].inc(len(beats))
        directives, confirms = directives_for(beats, news, received)
        for confirm in confirms:
            try:
                took_ms = await self._tasks.confirm(confirm.task_id, confirm.agent_id, confirm.epoch)
            except UNREACHABLE as exc:
                # The heartbeat is stored: refusing it now would only make the agent send it again. The
                # offer stays until it is confirmed, so the agent's next RUNNING beat confirms it (the
                # error used to escape and end the agent's stream as INTERNAL, found by the chaos soak).
                metrics.CONFIRMS_FAILED.inc()
                log.warning(
                    "task confirmation failed; the agent's next beat confirms it",
                    extra={"task": confirm.task_id, "agent": confirm.agent_id, "error": repr(exc)},
                )
                continue
            if took_ms is not None:
                metrics.TASKS_TAKEN_UP.observe(took_ms / 1000)
        return directives

    async def _refuse(self, context: grpc.aio.ServicerContext, rpc: str, refusal: Refused, count: int = 1) -> None:
        """Count `count` refused heartbeats and end the call with the refusal and its pushback (abort
        raises: nothing after this runs)."""
        metrics.REFUSED.labels(rpc, refusal.reason).inc(count)
        if refusal.retry_ms:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(refusal.retry_ms)),))
        await context.abort(refusal.code, str(refusal))

    async def Beat(  # type: ignore[override]
        self, request: hb.Heartbeat, context: grpc.aio.ServicerContext, identity: Identity
    ) -> hb.BeatReply:
        received = now_ms()
        directives = await self._handle("beat", (request,), identity, context, received)
        if directives:
            return hb.BeatReply(seq=request.seq, received_ms=received, directives=directives)
        return hb.BeatReply(seq=request.seq, received_ms=received)

    async def BeatBatch(  # type: ignore[override]
        self, request: hb.BeatBatchRequest, context: grpc.aio.ServicerContext, identity: Identity
    ) -> hb.BeatBatchReply:
        received = now_ms()
        beats = request.heartbeats
        if not beats or len(beats) > self._max_batch:
            metrics.REFUSED.labels("batch", "batch_size").inc(len(beats))
            code = grpc.StatusCode.INVALID_ARGUMENT if not beats else grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(code, f"heartbeats: {len(beats)} heartbeats; a batch holds 1 to {self._max_batch}")
        metrics.BATCH_SIZE.observe(len(beats))
        directives = await self._handle("batch", beats, identity, context, received, batch=True)
        return hb.BeatBatchReply(received_ms=received, accepted=len(beats), directives=directives)

    async def BeatStream(  # type: ignore[override]
        self, requests: Requests, context: grpc.aio.ServicerContext, identity: Identity
    ) -> None:
        metrics.ACTIVE_STREAMS.inc()
        try:
            beat = await requests.read()
            if beat is None:
                return
            try:
                # Refused before it takes an admission slot: during a Redis outage every agent retries
                # every few hundred ms, and slots spent on streams that cannot store anything pushed the
                # slots promised to the crowd seconds past the outage (found by the chaos soak: a 5 s
                # Valkey restart left 587 agents waiting long enough to be stalled).
                await self._writer.ready(1)
            except (Overloaded, Unavailable) as exc:
                await self._refuse(context, "stream", _refusal(exc))
            # Admitted or refused once its first heartbeat is read: the client then waits in its read of
            # the reply and gets the refusal whole. A refusal as the stream opens races the client's first
            # write, and the asyncio client reports that race as INTERNAL, without the pushback.
            retry_ms = self._admission.admit(time.monotonic())
            if retry_ms:
                busy = (
                    f"ingest busy: more new streams than the {self._admission.rate:g}/s it takes on; "
                    f"retry in {retry_ms} ms"
                )
                refusal = Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", busy, retry_ms)
                await self._refuse(context, "stream", refusal)
            while beat is not None:
                received = now_ms()
                directives = await self._handle("stream", (beat,), identity, context, received)
                if directives:
                    await context.write(hb.BeatReply(seq=beat.seq, received_ms=received, directives=directives))
                else:
                    await context.write(hb.BeatReply(seq=beat.seq, received_ms=received))
                beat = await requests.read()
        finally:
            metrics.ACTIVE_STREAMS.dec()


class RedisWatch:
    """Keeps the gRPC health status, the writer's fail-fast flag and the stream-length metrics in step
    with Redis."""

    def __init__(
        self, client: aioredis.Redis, servicer: health.aio.HealthServicer, writer: StreamWriter, names: Names
    ) -> None:
        self.client = client
        self.servicer = servicer
        self.writer = writer
        self.names = names
        self.up: bool | None = None

    async def run(self, stop: asyncio.Event) -> None:
        ticks = 0
        while not stop.is_set():
            try:
                await asyncio.wait_for(self.client.ping(), timeout=1.0)
                up = True
            except RedisConnectionError:
                up = False
                await redis_client.close_idle(self.client)  # from before a restart, as StreamWriter's
            except Exception:
                up = False
            self.writer.available = up
            if up != self.up:
                self.up = up
                metrics.REDIS_UP.set(1 if up else 0)
                (log.info if up else log.warning)("redis reachable" if up else "redis unreachable")
                status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", HEARTBEAT_SERVICE):
                    await self.servicer.set(name, status)
            if up and ticks % 20 == 0:
                await self._stream_lengths()
            ticks += 1
            # while Redis is out, calls wait for it (StreamWriter's hold): ask again sooner
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.25 if up else 0.05)

    async def _stream_lengths(self) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            for stream in self.names.streams():
                pipe.xlen(stream)
            for shard, length in enumerate(await pipe.execute()):
                metrics.STREAM_LENGTH.labels(str(shard)).set(length)
        except Exception:  # a metric is not worth failing the watch for
            pass


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None:
        if settings.tls_client_ca is not None:
            raise ConfigError("HBREG_TLS_CLIENT_CA needs HBREG_TLS_CERT and HBREG_TLS_KEY")
        return None
    if settings.tls_key is None:
        raise ConfigError("HBREG_TLS_CERT needs HBREG_TLS_KEY")
    ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC server's options (the benchmark's empty servicer runs with the same)."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", 100_000),
        # A fleet reconnecting at once opens thousands of calls within a second, and grpc.aio takes them
        # from gRPC core one per turn of the event loop. Core keeps at most this many waiting and, past
        # its defaults (1,000, 3,000 at most), drops calls at random before the servicer sees them:
        # CANCELLED with no pushback, which the asyncio client mostly reports as INTERNAL when its first
        # write races the reset (grpc/grpc#36066). Here they wait their turn, and StreamAdmission refuses
        # what the ingest cannot take on with RESOURCE_EXHAUSTED and a pushback.
        ("grpc.server.max_pending_requests", 100_000),
        ("grpc.server.max_pending_requests_hard_limit", 100_000),
    ]


class Ingest:
    """The ingest node's parts, started and stopped in order (tests run it in-process)."""

    def __init__(self, settings: Settings) -> None:
        settings.require("redis_url")
        assert settings.redis_url is not None
        self.settings = settings
        self.credentials = _credentials(settings)
        try:
            authenticator = Authenticator(
                settings.signing_secret(), settings.auth, mtls=settings.tls_client_ca is not None
            )
        except AuthError as exc:
            raise ConfigError(str(exc)) from None
        names = Names.of(settings)
        # A round trip slower than a second fails (UNAVAILABLE), and the agent tries another ingest: an
        # acknowledgement later than that is of little use to an agent beating every second or so.
        self.redis = redis_client.connect(
            settings, socket_timeout=1.0, socket_connect_timeout=1.0, retry_on_timeout=False
        )
        self.writer = StreamWriter(
            self.redis, names, settings.stream_retention, settings.max_pending, settings.redis_hold
        )
        self.server = grpc.aio.server(
            interceptors=[AuthInterceptor(authenticator, (HEARTBEAT_SERVICE, TASK_SERVICE))],
            options=grpc_options(settings),
        )
        self.tasks = TaskStore(self.redis, names)
        hb_grpc.add_HeartbeatServiceServicer_to_server(HeartbeatService(self.writer, self.tasks, settings), self.server)
        hb_grpc.add_TaskServiceServicer_to_server(TaskService(self.tasks, settings.assign_timeout), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                HEARTBEAT_SERVICE,
                TASK_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.watch = RedisWatch(self.redis, self.health, self.writer, names)
        self._stop = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Start serving; returns the bound gRPC port (useful with port 0)."""
        addr = self.settings.grpc_addr
        if self.credentials is None:
            self.port = self.server.add_insecure_port(addr)
        else:
            self.port = self.server.add_secure_port(addr, self.credentials)
        if not self.port:
            raise OSError(f"cannot listen on {addr}")
        if not self.settings.auth:
            log.warning("AUTHENTICATION IS OFF (HBREG_AUTH=off): any caller may send heartbeats for any agent")
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


async def serve(settings: Settings, ops: bool = True) -> None:
    """Run one ingest until SIGTERM. `ops`: serve /metrics and /healthz (not for one of several processes,
    whose parent serves them for all: ingest/processes.py)."""
    stop = stop_signal()
    ingest = Ingest(settings)
    await ingest.start()
    # Each open stream keeps a few hundred objects alive for hours, and with the default thresholds the
    # collector scanned all of them every few seconds while a fleet reconnected: 7.6 s of pauses (up to
    # 0.7 s each, nothing answered meanwhile) in 30 s of a 20,000-agent storm; 2 s (at most 0.4 s) with
    # these. Short-lived cycles (a few percent of what a message allocates) are still collected young.
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()  # what exists after start-up (code, grpc, the servicers) is never garbage
    cleanup = await ops_health.serve(settings.ingest_metrics_addr, lambda: bool(ingest.watch.up)) if ops else None
    log.info(
        "ingest listening",
        extra={
            "grpc_addr": settings.grpc_addr,
            "tls": "mutual" if settings.tls_client_ca else ("on" if settings.tls_cert else "off"),
            "auth": "on" if settings.auth else "OFF",
            "ops_addr": settings.ingest_metrics_addr,
        },
    )
    await stop.wait()
    log.info("ingest stopping: draining in-flight calls")
    await ingest.stop()
    if cleanup is not None:
        await cleanup()
    log.info("ingest stopped")
