"""The Redis Streams -> Kafka bridge.

Reads every shard stream with a consumer group, regroups heartbeats by Kafka partition (Kafka's own
murmur2 of the agent id, so an agent's beats stay on one partition, in order), produces one
`heartbeats` record per partition batch, and XACKs only after Kafka acknowledged: at-least-once.
Entries left pending by a crashed bridge are read again (same consumer name) or claimed (XAUTOCLAIM).

Every record carries the watermark: the server receive time up to which every heartbeat has been
forwarded. Partitions with nothing to carry still get a record with the watermark alone (a tick) every
`watermark_interval`, so the processors judge silence on the pipeline's clock and close windows on idle
partitions. When the stream shards match the partitions (the default), an entry belongs to exactly one
partition and is forwarded without decoding: protobuf concatenation is a merge of repeated fields.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError, ResponseError

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core import health
from heartbeat_registry.core.columns import select
from heartbeat_registry.core.lifecycle import stop_signal
from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.topics import ensure_topics, pipeline_topics
from heartbeat_registry.pb import hb
from processors import metrics

log = logging.getLogger(__name__)

READ_COUNT = 64  # stream entries per shard per read; each entry holds one group commit of the ingest
MAX_RECORD_BYTES = 512 * 1024
CLAIM_IDLE_MS = 10_000
CLAIM_EVERY_S = 5.0


class Bridge:
    def __init__(
        self,
        client: aioredis.Redis,
        producer: AIOKafkaProducer,
        names: Names,
        partitions: int,
        consumer: str,
        watermark_interval: float,
        watermark_slack: float,
    ) -> None:
        self._redis = client
        self._producer = producer
        self._names = names
        self._partitions = partitions
        self._consumer = consumer
        self._interval_ms = int(watermark_interval * 1000)
        self._slack_ms = int(watermark_slack * 1000)
        self._streams = names.streams()
        self._direct = names.shards == partitions
        self.watermark = 0
        self._last_sent = [0] * partitions  # wall ms of the last record per partition
        self._last_claim = 0.0
        self.healthy = False

    async def setup(self) -> None:
        for stream in self._streams:
            try:
                await self._redis.xgroup_create(stream, self._names.bridge_group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def run(self, stop: asyncio.Event) -> None:
        """Forward until `stop`; a Redis or Kafka error marks the bridge unhealthy and is retried.

        After any error (and at start) what this consumer read but never acknowledged goes first,
        before the watermark moves past it.
        """
        backlog = True
        while not stop.is_set():
            try:
                if backlog:
                    await self._forward_pending()
                    backlog = False
                await self.step()
                self.healthy = True
            except (RedisError, KafkaError, OSError) as exc:
                self.healthy = False
                backlog = True
                log.warning("bridge cycle failed, retrying", extra={"error": repr(exc)})
                await asyncio.sleep(0.5)

    async def _forward_pending(self) -> None:
        while True:
            reply = await self._redis.xreadgroup(
                self._names.bridge_group, self._consumer, {s: "0" for s in self._streams}, count=READ_COUNT
            )
            entries = [(s, e) for s, es in _pairs(reply) for e in es]
            if not entries:
                return
            await self._forward(entries)

    async def step(self) -> None:
        """One read-forward-acknowledge cycle; sends watermark ticks even when nothing was read."""
        if time.monotonic() - self._last_claim > CLAIM_EVERY_S:
            self._last_claim = time.monotonic()
            claimed = await self._claim_abandoned()
            if claimed:
                await self._forward(claimed)
        started = now_ms()
        reply = await self._redis.xreadgroup(
            self._names.bridge_group,
            self._consumer,
            {s: ">" for s in self._streams},
            count=READ_COUNT,
            block=max(1, self._interval_ms),
        )
        entries = [(s, e) for s, es in _pairs(reply) for e in es]
        # A shard that returned fewer than READ_COUNT entries is drained up to `started`; one that
        # returned a full read is known only up to the newest heartbeat read from it.
        progress = started - self._slack_ms
        per_shard: dict[str, int] = defaultdict(int)
        full = {s for s, es in _pairs(reply) if len(es) >= READ_COUNT}
        if full:
            for stream, (_, fields) in entries:
                if stream in full and fields:
                    per_shard[stream] = max(per_shard[stream], int(fields.get(b"r", 0)))
            progress = min([progress, *per_shard.values()])
        self.watermark = max(self.watermark, progress)
        await self._forward(entries)

    async def _claim_abandoned(self) -> list[tuple[str, tuple[bytes, dict]]]:
        out: list[tuple[str, tuple[bytes, dict[bytes, bytes]]]] = []
        for stream in self._streams:
            reply = await self._redis.xautoclaim(
                stream, self._names.bridge_group, self._consumer, CLAIM_IDLE_MS, start_id="0-0", count=READ_COUNT
            )
            claimed = reply[1] if reply else []
            out.extend((stream, e) for e in claimed)
        if out:
            log.warning("claimed entries of a stopped bridge", extra={"entries": len(out)})
        return out

    async def _forward(self, entries: list[tuple[str, tuple[bytes, dict]]]) -> None:
        chunks: dict[int, list[bytes]] = defaultdict(list)
        heartbeats = 0
        for stream, (_, fields) in entries:
            if not fields:  # trimmed away while pending: nothing to forward, only to acknowledge
                continue
            blob = fields[b"b"]
            heartbeats += int(fields.get(b"n", 0))
            if self._direct:
                chunks[self._streams.index(stream)].append(blob)
            else:
                for partition, part in self._split(blob).items():
                    chunks[partition].append(part)
        wall = now_ms()
        tick = hb.HeartbeatColumns(watermark_ms=self.watermark).SerializeToString()
        sends = []
        for partition in range(self._partitions):
            parts = chunks.get(partition)
            if not parts and wall - self._last_sent[partition] < self._interval_ms:
                continue
            for record in _records(parts or [], tick):
                sends.append(await self._producer.send(self._names.heartbeats_topic, record, partition=partition))
            self._last_sent[partition] = wall
        if sends:
            started = time.perf_counter()
            await asyncio.gather(*sends)
            metrics.BRIDGE_SEND.observe(time.perf_counter() - started)
        if entries:
            by_stream: dict[str, list[bytes]] = defaultdict(list)
            for stream, (entry_id, _) in entries:
                by_stream[stream].append(entry_id)
            pipe = self._redis.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                pipe.xack(stream, self._names.bridge_group, *ids)
            await pipe.execute()
            metrics.BRIDGE_FORWARDED.inc(heartbeats)
        metrics.BRIDGE_WATERMARK_AGE.set(max(0, wall - self.watermark) / 1000)

    def _split(self, blob: bytes) -> dict[int, bytes]:
        """Regroup one stream entry by Kafka partition (only when shards and partitions differ)."""
        cols = hb.HeartbeatColumns.FromString(blob)
        index: dict[int, list[int]] = defaultdict(list)
        for i, agent in enumerate(cols.agent_id):
            index[partition_of(agent, self._partitions)].append(i)
        return {partition: select(cols, rows).SerializeToString() for partition, rows in index.items()}


def _pairs(reply: Any) -> list[tuple[str, list[Any]]]:
    """XREADGROUP reply (RESP2): [[stream, [(id, fields), ...]], ...]."""
    return [(stream.decode(), entries) for stream, entries in reply or []]


def _records(parts: list[bytes], tick: bytes) -> list[bytes]:
    """Concatenate serialized columns into records of at most MAX_RECORD_BYTES, each ending in the
    watermark (protobuf merge: repeated fields append, the last scalar wins)."""
    records: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for part in parts:
        if current and size + len(part) > MAX_RECORD_BYTES:
            records.append(b"".join(current) + tick)
            current, size = [], 0
        current.append(part)
        size += len(part)
    records.append(b"".join(current) + tick)
    return records


async def serve(settings: Settings, consumer: str) -> None:
    settings.require("redis_url", "kafka_bootstrap")
    assert settings.redis_url is not None and settings.kafka_bootstrap is not None
    stop = stop_signal()
    names = Names.of(settings)
    await ensure_topics(settings.kafka_bootstrap, pipeline_topics(names, settings.topic_partitions))
    client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        linger_ms=2,
        max_request_size=4 * 1024 * 1024,
        max_batch_size=1024 * 1024,
        request_timeout_ms=15_000,
    )
    await producer.start()
    bridge = Bridge(
        client,
        producer,
        names,
        settings.topic_partitions,
        consumer,
        settings.watermark_interval,
        settings.watermark_slack,
    )
    await bridge.setup()
    cleanup = await health.serve(settings.bridge_metrics_addr, lambda: bridge.healthy)
    log.info("bridge running", extra={"consumer": consumer, "streams": len(names.streams())})
    # A cycle in progress finishes (forward, then XACK) before the loop sees `stop`: nothing half-sent.
    await bridge.run(stop)
    await producer.stop()
    await cleanup()
    await client.aclose()
    log.info("bridge stopped")
