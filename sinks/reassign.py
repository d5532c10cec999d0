"""The reassignment sink (`hbreg reassign`): a stall of (agent, task) fences the agent off the task,
orphans the task with the next epoch and publishes one `Reassignment` on Kafka `task-reassignments`
(keyed by task) for the Role Assignment service.

Exactly one reassignment per stall episode, whatever is repeated:
- the Redis side is idempotent on the event id (core/tasks.py): the same event again changes nothing;
- the Kafka side is transactional, one transactional producer per `agent-events` partition (its id
  names the partition, so a new owner of the partition fences the old one's producer): the
  Reassignment records and the consumer offsets of the events that caused them commit together;
- an event redelivered from the same position (its transaction never committed) publishes the
  reassignment the Redis side already decided; the same event id from another position (a duplicate)
  publishes nothing.
Consumers read `task-reassignments` with isolation.level=read_committed. On a broker without
transactions (the Tansu fallback) the sink says so and publishes at least once instead; consumers then
deduplicate on (task_id, epoch).

Also: the policy (reasons, rate limit, recovered agents: sinks/reassign_policy.py); assignments not taken
up by HBREG_ASSIGN_TIMEOUT (the replica that owns partition 0 finds them and sends an
`ASSIGNMENT_EXPIRED` event through `agent-events`, so that they take the same exactly-once path).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiolimiter import AsyncLimiter
from prometheus_client import Counter, Gauge, Histogram

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core import health, redis_client
from heartbeat_registry.core.events import sink_event
from heartbeat_registry.core.lifecycle import stop_signal
from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.producers import pace_metadata_updates, start_producer
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.tasks import ORPHANED, Outcome, TaskStore
from heartbeat_registry.core.topics import Replication, ensure_topics, pipeline_topics, reassignment_topics
from heartbeat_registry.core.views import AgentView
from heartbeat_registry.pb import hb
from sinks import reassign_policy

log = logging.getLogger(__name__)

REASSIGNED = Counter("hbreg_reassign_reassignments_total", "Reassignments published", ["reason"])
NOT_REASSIGNED = Counter("hbreg_reassign_skipped_total", "Stalls that reassigned nothing, by cause", ["cause"])
DUPLICATES = Counter("hbreg_reassign_duplicates_total", "Stall events already applied (duplicates suppressed)")
HELD = Counter("hbreg_reassign_held_by_mass_silence_total", "Agents held by a mass silence (no reassignment)")
RATE_LIMITED = Counter("hbreg_reassign_rate_limited_total", "Reassignments that waited for the rate limit")
LATENCY = Histogram(
    "hbreg_reassign_latency_seconds",
    "Stall event emitted -> Reassignment decided",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
UNDECODABLE = Counter(
    "hbreg_reassign_undecodable_records_total",
    "agent-events records that are no AgentEvent the sink can act on, counted and skipped",
)
ORPHANED_NOW = Gauge("hbreg_reassign_orphaned_tasks", "Tasks waiting for a new owner")
OLDEST_ORPHAN = Gauge("hbreg_reassign_oldest_orphan_seconds", "Age of the oldest orphaned task")
BATCH = 200
REDIS_CONNECTIONS = 64
EXPIRY_EVERY_S = 0.5


def position(record: Any) -> str:
    return f"{record.topic}:{record.partition}:{record.offset}"


def unusable(event: hb.AgentEvent) -> str | None:
    """Why the sink cannot act on `event` (an expiry without a whole epoch), or None."""
    epoch = event.figures.get("epoch", 0.0)
    if event.type == hb.ASSIGNMENT_EXPIRED and not (math.isfinite(epoch) and 0 <= epoch == int(epoch) < 2**63):
        return f"an assignment expiry with epoch {epoch}"
    return None


def agent_event(record: Any) -> hb.AgentEvent | None:
    return sink_event(record, UNDECODABLE, log, unusable)


class Producers(ConsumerRebalanceListener):
    """One transactional producer per owned `agent-events` partition, started when it is assigned (which
    fences a previous owner's producer) and stopped when revoked, never in the middle of a batch."""

    def __init__(self, settings: Settings, names: Names) -> None:
        self.settings = settings
        self.names = names
        self.by_partition: dict[int, AIOKafkaProducer] = {}
        self.transactional = True
        self.lock = asyncio.Lock()

    def _new(self, partition: int) -> AIOKafkaProducer:
        common: dict[str, Any] = {
            "bootstrap_servers": self.settings.kafka_bootstrap,
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": 2,
        }
        if self.transactional:
            common["transactional_id"] = f"{self.names.reassign_group}-{partition}"
        return pace_metadata_updates(AIOKafkaProducer(**common))

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        async with self.lock:
            for tp in assigned:
                if tp.partition in self.by_partition:
                    continue
                producer = self._new(tp.partition)
                try:
                    await producer.start()
                except KafkaError as exc:
                    if not self.transactional:
                        raise
                    log.warning(
                        "the broker has no transactions: publishing at least once (consumers "
                        "deduplicate on task_id and epoch)",
                        extra={"error": repr(exc)},
                    )
                    self.transactional = False
                    await producer.stop()
                    producer = self._new(tp.partition)
                    await producer.start()
                self.by_partition[tp.partition] = producer

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        async with self.lock:  # waits for the batch in hand to commit
            for tp in revoked:
                producer = self.by_partition.pop(tp.partition, None)
                if producer is not None:
                    await producer.stop()

    async def stop(self) -> None:
        async with self.lock:
            for producer in self.by_partition.values():
                await producer.stop()
            self.by_partition.clear()


class ReassignSink:
    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self.settings = settings
        self.names = Names.of(settings)
        self.redis = client
        self.store = TaskStore(client, self.names)
        self.producers = Producers(settings, self.names)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=self.names.reassign_group,
            group_instance_id=settings.instance,  # static membership: a restart takes its partitions back at once
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=BATCH,
        )
        self.limiter = AsyncLimiter(settings.reassign_burst, settings.reassign_burst / settings.reassign_rate)
        self.hung_cpu = settings.hung_cpu
        self.healthy = False
        self._requested: dict[tuple[str, int], float] = {}  # expiries asked for, not yet seen done

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.subscribe([self.names.events_topic], listener=self.producers)

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.producers.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume, decide, publish and commit until `stop`; a batch that fails is aborted and read again."""
        expiry = asyncio.create_task(self._expire_loop(stop))
        try:
            while not stop.is_set():
                batch = await self.consumer.getmany(timeout_ms=200, max_records=BATCH)
                self.healthy = True
                for tp, records in batch.items():
                    async with self.producers.lock:
                        producer = self.producers.by_partition.get(tp.partition)
                        if producer is None:  # revoked meanwhile: its new owner reads these again
                            continue
                        try:
                            await self._batch(tp, records, producer)
                        except Exception as exc:
                            self.healthy = False
                            log.warning(
                                "reassignment batch failed, reading it again",
                                extra={"partition": tp.partition, "offset": records[0].offset, "error": repr(exc)},
                            )
                            self.consumer.seek(tp, records[0].offset)
                            await asyncio.sleep(0.5)
        finally:
            expiry.cancel()
            await asyncio.gather(expiry, return_exceptions=True)

    async def _batch(self, tp: TopicPartition, records: list[Any], producer: AIOKafkaProducer) -> None:
        """The records of one partition: decisions, their Reassignments and the offsets, in one
        transaction. The first stall of each task in the batch is decided in one pipelined round trip to
        Redis; repeats of a task and expiries follow one by one (their order matters, and they are rare)."""
        events = []
        for record in records:
            event = agent_event(record)
            if event is not None:
                events.append((event, position(record)))
        firsts: list[tuple[hb.AgentEvent, str]] = []
        later: list[tuple[hb.AgentEvent, str]] = []
        for event, at in events:
            if event.type == hb.MASS_SILENCE:
                HELD.inc(len(event.agent_ids))
            elif event.type == hb.STALL:
                skip = reassign_policy.skip_reason(event, self.settings.reassign_on)
                if skip is not None:
                    await self._skip(event, skip)
                elif event.task_id in {e.task_id for e, _ in firsts}:
                    later.append((event, at))
                else:
                    firsts.append((event, at))
            elif event.type == hb.ASSIGNMENT_EXPIRED:
                later.append((event, at))
        firsts = await self._not_recovered(firsts)
        outcomes = await self.store.orphan_many(
            [(e.task_id, e.agent_id, e.reason, e.event_id, at, e.last_seen_ms) for e, at in firsts]
        )
        decided = [self._reassignment(e, o, e.reason) for (e, _), o in zip(firsts, outcomes, strict=True)]
        for event, at in later:
            if event.type == hb.ASSIGNMENT_EXPIRED:
                outcome = await self.store.expire(event.task_id, int(event.figures["epoch"]), event.event_id, at)
                decided.append(self._reassignment(event, outcome, "assignment_expired"))
            elif await self._not_recovered([(event, at)]):
                outcome = (
                    await self.store.orphan_many(
                        [(event.task_id, event.agent_id, event.reason, event.event_id, at, event.last_seen_ms)]
                    )
                )[0]
                decided.append(self._reassignment(event, outcome, event.reason))
        await self._publish(tp, records, producer, [r for r in decided if r is not None])

    async def _publish(
        self, tp: TopicPartition, records: list[Any], producer: AIOKafkaProducer, decided: list[hb.Reassignment]
    ) -> None:
        """The Reassignments and the offsets after `records`, together (or at least once, without transactions)."""
        offsets = {tp: records[-1].offset + 1}
        transactional = self.producers.transactional
        if transactional:
            await producer.begin_transaction()
        try:
            sends = [
                await producer.send(self.names.reassignments_topic, r.SerializeToString(), key=r.task_id.encode())
                for r in decided
            ]
            await asyncio.gather(*sends)
            if transactional:
                await producer.send_offsets_to_transaction(offsets, self.names.reassign_group)
                await producer.commit_transaction()
        except BaseException:
            if transactional:
                await producer.abort_transaction()
            raise
        if not transactional:
            await self.consumer.commit(offsets)
        for r in decided:
            REASSIGNED.labels(r.reason).inc()

    async def _not_recovered(self, stalls: list[tuple[hb.AgentEvent, str]]) -> list[tuple[hb.AgentEvent, str]]:
        """The stalls to carry out: each waits its turn under the rate limit, and those whose agent is back
        on the task by then are skipped (the worker's view of it is read after the wait)."""
        for _ in stalls:
            if not self.limiter.has_capacity():
                RATE_LIMITED.inc()
            await self.limiter.acquire()
        views = await self._views([e for e, _ in stalls])
        out = []
        for event, at in stalls:
            if reassign_policy.recovered(event, views.get(event.agent_id), self.hung_cpu):
                await self._skip(event, reassign_policy.RECOVERED)
            else:
                out.append((event, at))
        return out

    async def _skip(self, event: hb.AgentEvent, cause: str) -> None:
        """Counted by cause, and kept in the task's history."""
        NOT_REASSIGNED.labels(cause).inc()
        if event.task_id:
            await self.store.note(event.task_id, event.agent_id, f"{cause}: {event.reason} stall", event.last_seen_ms)

    async def _views(self, stalls: list[hb.AgentEvent]) -> dict[str, AgentView]:
        """The workers' published views of the stalled agents (processors/publish.py)."""
        if not stalls:
            return {}
        partitions = self.settings.topic_partitions
        pipe = self.redis.pipeline(transaction=False)
        for event in stalls:
            pipe.hget(self.names.query_agents_of(event.agent_id, partitions), event.agent_id)
        return {
            e.agent_id: AgentView.decode(raw)
            for e, raw in zip(stalls, await pipe.execute(), strict=True)
            if raw is not None
        }

    def _reassignment(self, event: hb.AgentEvent, outcome: Outcome, reason: str) -> hb.Reassignment | None:
        """The Reassignment an outcome publishes (applied, or redone after a redelivery), else None."""
        if outcome.outcome == "duplicate":
            DUPLICATES.inc()
            return None
        if outcome.outcome not in ("applied", "redo"):
            NOT_REASSIGNED.labels(outcome.outcome).inc()
            return None
        now = now_ms()
        if event.emitted_at_ms:
            LATENCY.observe(max(0, now - event.emitted_at_ms) / 1000)
        return hb.Reassignment(
            task_id=event.task_id,
            from_agent_id=outcome.agent,
            epoch=outcome.epoch,
            reason=reason,
            stall_event_id=event.event_id,
            detected_at_ms=event.detected_at_ms,
            emitted_at_ms=now,
        )

    async def _expire_loop(self, stop: asyncio.Event) -> None:
        """On the replica that owns partition 0: assignments past their deadline become ASSIGNMENT_EXPIRED
        events (the orphaned-task gauges are kept there too)."""
        producer = await start_producer(bootstrap_servers=self.settings.kafka_bootstrap)
        try:
            while not stop.is_set():
                await asyncio.sleep(EXPIRY_EVERY_S)
                if 0 not in self.producers.by_partition:
                    continue
                try:
                    await self._expire_due(producer)
                    await self._gauges()
                except Exception as exc:  # tried again on the next tick
                    log.warning("checking assignment deadlines failed", extra={"error": repr(exc)})
        finally:
            await producer.stop()

    async def _expire_due(self, producer: AIOKafkaProducer) -> None:
        now = now_ms()
        self._requested = {k: t for k, t in self._requested.items() if now - t < 10_000}
        for task_id, epoch, assignee in await self.store.expired(now):
            if (task_id, epoch) in self._requested:
                continue
            self._requested[(task_id, epoch)] = now
            event = hb.AgentEvent(
                type=hb.ASSIGNMENT_EXPIRED,
                agent_id=assignee,
                task_id=task_id,
                reason="assignment_expired",
                detected_at_ms=now,
                emitted_at_ms=now,
                event_id=f"expire:{task_id}:{epoch}",
                partition=partition_of(assignee, self.settings.topic_partitions),
                figures={"epoch": epoch},
            )
            await producer.send_and_wait(
                self.names.events_topic, event.SerializeToString(), key=assignee.encode(), partition=event.partition
            )

    async def _gauges(self) -> None:
        orphans = await self.store.in_state(ORPHANED)
        ORPHANED_NOW.set(len(orphans))
        OLDEST_ORPHAN.set((now_ms() - orphans[0][1]) / 1000 if orphans else 0)


async def serve(settings: Settings) -> None:
    settings.require("redis_url", "kafka_bootstrap")
    assert settings.redis_url is not None and settings.kafka_bootstrap is not None
    stop = stop_signal()
    names = Names.of(settings)
    await ensure_topics(
        settings.kafka_bootstrap,
        pipeline_topics(names, settings.topic_partitions, Replication.of(settings))
        + reassignment_topics(names, settings.topic_partitions, Replication.of(settings)),
    )
    client = redis_client.connect(settings, socket_timeout=5.0, max_connections=REDIS_CONNECTIONS)
    sink = ReassignSink(settings, client)
    await sink.start()
    cleanup = await health.serve(settings.reassign_metrics_addr, lambda: sink.healthy)
    log.info(
        "reassignment sink running",
        extra={"reasons": ",".join(settings.reassign_on) or "none", "rate": settings.reassign_rate},
    )
    try:
        await sink.run(stop)  # a batch in hand commits before the loop sees `stop`
    finally:
        await sink.stop()
        await cleanup()
        await client.aclose()
        log.info("reassignment sink stopped")
