"""Reading what the pipeline wrote to Kafka, for assertions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer

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


async def read_events(bootstrap: str, topic: str, done: Callable[[list], bool], timeout: float = 30.0) -> list[hb.AgentEvent]:
    records = await read_records(bootstrap, topic, lambda rs: done([hb.AgentEvent.FromString(r.value) for r in rs]), timeout)
    return [hb.AgentEvent.FromString(r.value) for r in records]


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
