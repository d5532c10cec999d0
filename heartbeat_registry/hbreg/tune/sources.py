"""Where `hbreg tune` reads the retained heartbeats, per Kafka partition of `heartbeats`, oldest first,
without ever joining a consumer group or committing anything.

- **kafka** (default): the `heartbeats` records themselves, from the offsets of the start time
  (`offsets_for_times`) to the end offsets at the start of the run: the very records the workers folded,
  watermarks and all, so the replay sees the pipeline clock they saw.
- **redis**: the Redis streams (retained `HBREG_STREAM_RETENTION`), merged across shards in entry order
  and regrouped by partition as the bridge does; the bridge's watermark is rebuilt from the entries' receive
  times, a tick every `HBREG_WATERMARK_INTERVAL` behind by `HBREG_WATERMARK_SLACK`. Close to what the workers
  saw, not identical: use it when Kafka's retention is shorter than the period.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf.message import DecodeError

from heartbeat_registry.core import redis_client
from heartbeat_registry.core.columns import select
from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.pb import hb

Record = tuple[int, hb.HeartbeatColumns]  # (partition, its columns with the watermark)
REDIS_PAGE = 2000


def decode(value: bytes | None) -> hb.HeartbeatColumns:
    """A record as the worker reads it: one that is no HeartbeatColumns counts as an empty record."""
    try:
        return hb.HeartbeatColumns.FromString(value or b"")
    except DecodeError:
        return hb.HeartbeatColumns()


async def kafka_extent(bootstrap: str, topic: str, partitions: list[int], from_ms: int) -> dict[int, tuple[int, int]]:
    """partition -> (first offset at or after `from_ms`, end offset now); partitions with nothing to read
    are left out."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        starts = await consumer.offsets_for_times({tp: from_ms for tp in tps})
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    out = {}
    for tp in tps:
        found = starts.get(tp)
        if found is not None and found.offset < ends[tp]:
            out[tp.partition] = (found.offset, ends[tp])
    return out


async def kafka_records(
    bootstrap: str, topic: str, extent: dict[int, tuple[int, int]], done: Callable[[int], bool]
) -> AsyncIterator[Record]:
    """The records of `extent`'s partitions in offset order (interleaved across partitions), until a
    partition's end offset or `done(partition)`."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    try:
        active = {TopicPartition(topic, p): end for p, (_, end) in extent.items()}
        consumer.assign(list(active))
        for tp in active:
            consumer.seek(tp, extent[tp.partition][0])
        while active:
            batches = await consumer.getmany(*active, timeout_ms=1000, max_records=5000)
            for tp, records in batches.items():
                end = active.get(tp)
                if end is None:
                    continue
                for record in records:
                    if record.offset >= end or done(tp.partition):
                        del active[tp]
                        break
                    yield tp.partition, decode(record.value)
                else:
                    if await consumer.position(tp) >= end:
                        del active[tp]
                if tp not in active:
                    consumer.pause(tp)
    finally:
        await consumer.stop()


async def redis_records(settings: Settings, partitions: list[int], from_ms: int, to_ms: int) -> AsyncIterator[Record]:
    """The stream entries received from `from_ms` to `to_ms`, as records of `partitions`."""
    assert settings.redis_url is not None
    names = Names.of(settings)
    client = redis_client.connect(settings)
    wanted = set(partitions)
    interval = int(settings.watermark_interval * 1000)
    slack = int(settings.watermark_slack * 1000)
    try:
        shards = [_entries(client, names.stream(s), from_ms, to_ms) for s in range(names.shards)]
        watermark = from_ms - slack
        pending: dict[int, list[hb.HeartbeatColumns]] = defaultdict(list)
        async for received, blob in _merge(shards):
            # ticks up to this entry's time: the clock moves on between heartbeats as the bridge's does
            while received - slack > watermark + interval:
                watermark += interval
                for partition in partitions:
                    yield partition, _record(pending.pop(partition, []), watermark)
            cols = hb.HeartbeatColumns.FromString(blob)
            index: dict[int, list[int]] = defaultdict(list)
            for i, agent in enumerate(cols.agent_id):
                index[partition_of(agent, settings.topic_partitions)].append(i)
            for partition, rows in index.items():
                if partition in wanted:
                    pending[partition].append(select(cols, rows))
        for partition in partitions:
            yield partition, _record(pending.pop(partition, []), watermark + interval)
    finally:
        await client.aclose()


def _record(parts: list[hb.HeartbeatColumns], watermark: int) -> hb.HeartbeatColumns:
    record = hb.HeartbeatColumns()
    for part in parts:
        record.MergeFrom(part)
    record.watermark_ms = watermark
    return record


async def _entries(client: aioredis.Redis, stream: str, from_ms: int, to_ms: int) -> AsyncIterator[tuple[int, bytes]]:
    """(receive time, columns) of one shard's entries in the period, oldest first, a page at a time."""
    start = f"{from_ms}-0"
    while True:
        page: Any = await client.xrange(stream, min=start, max=f"{to_ms}-99999999", count=REDIS_PAGE)
        for entry_id, fields in page:
            if fields.get(b"b"):
                yield int(fields.get(b"r", entry_id.split(b"-")[0])), fields[b"b"]
        if len(page) < REDIS_PAGE:
            return
        last = page[-1][0].decode()
        start = "(" + last


async def _merge(shards: list[AsyncIterator[tuple[int, bytes]]]) -> AsyncIterator[tuple[int, bytes]]:
    """The shards' entries in receive-time order."""
    heap: list[tuple[int, int, bytes]] = []
    for i, shard in enumerate(shards):
        first = await anext(shard, None)
        if first is not None:
            heapq.heappush(heap, (first[0], i, first[1]))
    while heap:
        received, i, blob = heapq.heappop(heap)
        yield received, blob
        following = await anext(shards[i], None)
        if following is not None:
            heapq.heappush(heap, (following[0], i, following[1]))
