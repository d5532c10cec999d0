"""`hbreg assigner`: a REFERENCE Role Assignment service, so the embedded system shows the whole loop.

Production systems bring their own (HBREG_ASSIGNER=off keeps `hbreg up` from starting this one). It shows
how to consume the contract: read `task-reassignments` with isolation.level=read_committed in a consumer
group, and for each Reassignment call `TaskService.Assign(task_id, agent_id, epoch)` at exactly the epoch
the record carries, with a service token. FAILED_PRECONDITION means the task moved on (a newer epoch
exists): that record is done. The choice of agent: an idle, healthy agent (its latest heartbeat IDLE and
fresh), the least recently assigned first, never the agent the task was taken from. With none idle, it
waits and tries again; the record's offset is committed only once it was assigned or found stale.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer
from prometheus_client import Counter, Histogram

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core import health, redis_client
from heartbeat_registry.core.lifecycle import stop_signal
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.topics import Replication, ensure_topics, reassignment_topics
from heartbeat_registry.core.views import RegistryEntry
from heartbeat_registry.pb import hb, hb_grpc

log = logging.getLogger(__name__)
ASSIGNED = Counter("hbreg_assigner_assigned_total", "Tasks assigned")
STALE = Counter("hbreg_assigner_stale_total", "Reassignments found stale (the task moved on)")
WAITS = Counter("hbreg_assigner_waits_total", "Times no idle agent was found")
LATENCY = Histogram(
    "hbreg_assigner_latency_seconds",
    "Reassignment emitted -> assigned",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RETRY_S = 0.2


class Assigner:
    def __init__(self, settings: Settings, client: aioredis.Redis, stub: hb_grpc.TaskServiceStub, token: str | None):
        self.settings = settings
        self.names = Names.of(settings)
        self.redis = client
        self.stub = stub
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.fresh_ms = int(settings.stall_timeout * 1000 / 2)
        self.last_assigned: dict[str, float] = {}  # agent -> monotonic time of its last assignment
        self.healthy = False

    async def idle_agents(self, exclude: str) -> list[str]:
        """Agents whose latest heartbeat is IDLE and fresh, least recently assigned first."""
        pipe = self.redis.pipeline(transaction=False)
        for shard in range(self.names.shards):
            pipe.hgetall(self.names.latest(shard))
        now = now_ms()
        idle = [
            agent
            for reply in await pipe.execute()
            for key, raw in reply.items()
            if (agent := key.decode()) != exclude
            and (entry := RegistryEntry.decode(agent, raw)).status == hb.IDLE
            and now - entry.last_seen_ms <= self.fresh_ms
        ]
        return sorted(idle, key=lambda a: (self.last_assigned.get(a, 0.0), a))

    async def assign(self, reassignment: hb.Reassignment, stop: asyncio.Event) -> None:
        """Until the task is assigned or found stale (or the service stops)."""
        while not stop.is_set():
            for agent in await self.idle_agents(reassignment.from_agent_id):
                self.last_assigned[agent] = time.monotonic()
                request = hb.AssignRequest(task_id=reassignment.task_id, agent_id=agent, epoch=reassignment.epoch)
                try:
                    await self.stub.Assign(request, metadata=self.metadata, timeout=5)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                        STALE.inc()
                        log.info(
                            "reassignment is stale",
                            extra={"task": reassignment.task_id, "epoch": reassignment.epoch, "why": exc.details()},
                        )
                        return
                    raise
                ASSIGNED.inc()
                LATENCY.observe(max(0, now_ms() - reassignment.emitted_at_ms) / 1000)
                log.info("assigned", extra={"task": reassignment.task_id, "epoch": reassignment.epoch, "agent": agent})
                return
            WAITS.inc()
            await asyncio.sleep(RETRY_S)

    async def run(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            self.healthy = True
            for tp, records in batch.items():
                for record in records:
                    try:
                        await self.assign(hb.Reassignment.FromString(record.value), stop)
                    except Exception as exc:
                        self.healthy = False
                        log.warning("assigning failed; trying again", extra={"error": repr(exc)})
                        consumer.seek(tp, record.offset)
                        await asyncio.sleep(1.0)
                        break
                    if stop.is_set():
                        return
                    await consumer.commit({tp: record.offset + 1})


def service_token(settings: Settings) -> str | None:
    """The assigner's own service token, minted with the signing secret this machine has (auth on)."""
    if not settings.auth:
        return None
    from heartbeat_registry.core.tokens import ASSIGNER, mint

    secret = settings.signing_secret()
    if secret is None:
        return None
    return mint(secret, "hbreg-assigner", 7 * 86400.0, role=ASSIGNER)


async def serve(settings: Settings) -> None:
    settings.require("redis_url", "kafka_bootstrap")
    assert settings.redis_url is not None and settings.kafka_bootstrap is not None
    stop = stop_signal()
    names = Names.of(settings)
    await ensure_topics(
        settings.kafka_bootstrap, reassignment_topics(names, settings.topic_partitions, Replication.of(settings))
    )
    client = redis_client.connect(settings, socket_timeout=5.0)
    consumer = AIOKafkaConsumer(
        names.reassignments_topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=names.assigner_group,
        group_instance_id=settings.instance,  # static membership: a restart takes its partitions back at once
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
        assigner = Assigner(settings, client, hb_grpc.TaskServiceStub(channel), service_token(settings))
        cleanup = await health.serve(settings.assigner_metrics_addr, lambda: assigner.healthy)
        log.info("reference assigner running (a reference Role Assignment service)")
        try:
            await assigner.run(consumer, stop)
        finally:
            await consumer.stop()
            await cleanup()
            await client.aclose()
            log.info("reference assigner stopped")
