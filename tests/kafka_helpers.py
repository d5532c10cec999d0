"""Reading what the pipeline wrote to Kafka, for assertions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition

from heartbeat_registry.core.events import EventReader, time_order
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.pb import hb


async def read_records(bootstrap: str, topic: str, done: Callable[[list], bool], timeout: float = 30.0) -> list:
    """All records of `topic` from the beginning, until `done(records)` or the timeout."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    records: list = []
    deadline = time.monotonic() + timeout
    try:
        while not done(records) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for part in batch.values():
                records.extend(part)
    finally:
        await consumer.stop()
    return records


def columns(records: list) -> list[hb.HeartbeatColumns]:
    return [hb.HeartbeatColumns.FromString(r.value) for r in records]


def heartbeat_count(records: list) -> int:
    return sum(len(c.agent_id) for c in columns(records))


async def read_events(
    bootstrap: str, topic: str, done: Callable[[list[hb.AgentEvent]], bool], timeout: float = 30.0
) -> list[hb.AgentEvent]:
    """Every `agent-events` record from the beginning, in time order, until `done(events)` or the timeout."""
    deadline = time.monotonic() + timeout
    async with EventReader(bootstrap, topic) as reader:
        await reader.seek()
        events = await reader.history()
        while not done(events) and time.monotonic() < deadline:
            events = time_order(events + await reader.fetch(200))
    return events


async def eventually(check: Callable[[], object], timeout: float, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result or time.monotonic() > deadline:
            assert result, "condition not met in time"
            return
        await asyncio.sleep(every)


async def committed_and_end(settings: Settings, partition: int) -> tuple[int | None, int]:
    """The processors' committed offset of a `heartbeats` partition, and its end offset."""
    tp = TopicPartition(Names.of(settings).heartbeats_topic, partition)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        group_id=Names.of(settings).processors_app_id,
    )
    await consumer.start()
    try:
        return await consumer.committed(tp), (await consumer.end_offsets([tp]))[tp]
    finally:
        await consumer.stop()
