"""Reading the `agent-events` topic without a consumer group: `hbreg events`, the query API's recent
events, a worker that gains partitions (`event_ids_since`), the benchmarks and the tests all read it
through `EventReader`, which never disturbs the sinks' consumer groups (it assigns partitions itself and
commits nothing).

History is read up to the end offsets seen at start and returned in time order (the topic is ordered
only per partition); what follows is returned as it arrives. A record that is not an `AgentEvent` is
counted and skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf.message import DecodeError
from prometheus_client import Counter

from heartbeat_registry.core.topics import partition_count
from heartbeat_registry.pb import hb

log = logging.getLogger(__name__)
HISTORY_MS = 24 * 3600 * 1000  # what `hbreg events` and the query API show of the past
UNDECODABLE = Counter("hbreg_events_undecodable_total", "agent-events records that are no AgentEvent, skipped")


def sink_event(
    record: Any,
    skipped: Counter,
    logger: logging.Logger,
    unusable: Callable[[hb.AgentEvent], str | None],
) -> hb.AgentEvent | None:
    """A consuming sink's view of an `agent-events` record: its AgentEvent, or None, counted in `skipped`
    and logged with its position, for bytes that do not parse, no value, no event type (an empty value,
    another message) or what `unusable` names a reason for. Retrying such a record would hold up every
    event behind it on the partition, forever."""
    try:
        event = hb.AgentEvent.FromString(record.value)
    except (DecodeError, TypeError):  # TypeError: a record without a value
        why: str | None = "not an AgentEvent"
    else:
        why = "no event type" if event.type == hb.EVENT_TYPE_UNSPECIFIED else unusable(event)
        if why is None:
            return event
    skipped.inc()
    logger.warning(
        "skipped an agent-events record that is no AgentEvent the sink can use",
        extra={"partition": record.partition, "offset": record.offset, "why": why},
    )
    return None


def time_order(events: Iterable[hb.AgentEvent]) -> list[hb.AgentEvent]:
    return sorted(events, key=lambda e: (e.detected_at_ms, e.emitted_at_ms))


class EventReader:
    def __init__(self, bootstrap: str, topic: str) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        self._partitions: list[TopicPartition] = []

    async def __aenter__(self) -> EventReader:
        try:
            await self._consumer.start()
        except BaseException:
            await self._consumer.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def seek(
        self, since_ms: int | None = None, *, wait: bool = True, offsets: dict[int, int] | None = None
    ) -> bool:
        """Position at the first event at or after `since_ms` (None: the topic's beginning), or at
        `offsets` (partition -> next offset, as `positions()` gave them) where given. Waits for the topic
        to exist when `wait` (the worker may create it moments from now), else returns False."""
        while not (count := await partition_count(self._bootstrap, self._topic)):
            if not wait:
                return False
            await asyncio.sleep(0.5)
        consumer = self._consumer
        self._partitions = [TopicPartition(self._topic, p) for p in range(count)]
        consumer.assign(self._partitions)
        if since_ms is None:
            await consumer.seek_to_beginning(*self._partitions)
            return True
        known = offsets or {}
        found = await consumer.offsets_for_times({tp: since_ms for tp in self._partitions if tp.partition not in known})
        for tp in self._partitions:
            at = found.get(tp)
            if tp.partition in known:
                consumer.seek(tp, known[tp.partition])
            elif at is None:
                await consumer.seek_to_end(tp)
            else:
                consumer.seek(tp, at.offset)
        return True

    async def positions(self) -> dict[int, int]:
        """partition -> the offset of the next event this reader would return."""
        return {tp.partition: await self._consumer.position(tp) for tp in self._partitions}

    async def history(self) -> list[hb.AgentEvent]:
        """Every event from the position up to the end offsets as of now, in time order."""
        consumer = self._consumer
        ends = await consumer.end_offsets(self._partitions)
        events: list[hb.AgentEvent] = []
        while True:
            positions = {tp: await consumer.position(tp) for tp in self._partitions}
            if all(positions[tp] >= end for tp, end in ends.items()):
                return time_order(events)
            events.extend(await self.fetch())

    async def fetch(self, timeout_ms: int = 500) -> list[hb.AgentEvent]:
        """What arrived since the last call (waiting up to `timeout_ms` for something), in arrival order."""
        out = []
        for records in (await self._consumer.getmany(timeout_ms=timeout_ms)).values():
            for record in records:
                try:
                    out.append(hb.AgentEvent.FromString(record.value))
                except (DecodeError, TypeError):  # TypeError: a record without a value
                    UNDECODABLE.inc()
                    log.warning(
                        "skipped a record that is no AgentEvent",
                        extra={"partition": record.partition, "offset": record.offset},
                    )
        return out


async def event_ids_since(bootstrap: str, topic: str, since_ms: int) -> set[str]:
    """The ids of every event sent at or after `since_ms` (the records' create time), up to now: what a
    worker taking over a partition checks its own judgements against (processors/app.py)."""
    async with EventReader(bootstrap, topic) as reader:
        if not await reader.seek(since_ms, wait=False):
            return set()
        return {event.event_id for event in await reader.history()}
