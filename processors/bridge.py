"""The Redis Streams -> Kafka bridge.

Reads every shard stream with a consumer group, regroups heartbeats by Kafka partition (Kafka's own
murmur2 of the agent id, so an agent's beats stay on one partition, in order), produces one
`heartbeats` record per partition batch, and XACKs only after Kafka acknowledged: at-least-once.
Entries left pending by a crashed bridge are read again (same consumer name) or claimed (XAUTOCLAIM).

Every record carries the watermark: the server receive time up to which every heartbeat has been
forwarded. Partitions with nothing to carry still get a record with the watermark alone (a tick) every
`watermark_interval`, so the processors judge silence on the pipeline's clock and close windows on idle
partitions. When the stream shards match the partitions (the default), an entry belongs to exactly one
partition and is forwarded as it is: protobuf concatenation is a merge of repeated fields. Each entry is
still parsed once, to check that it is what the ingest writes: an entry written by anyone else (no field `b`,
bytes that are no HeartbeatColumns, columns of different lengths) is counted, acknowledged and not
forwarded, since merged into a record with genuine entries it would spoil them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError, ResponseError

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core import health, redis_client
from heartbeat_registry.core.columns import COLUMNS, select
from heartbeat_registry.core.lifecycle import stop_signal
from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.producers import start_producer
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.topics import Replication, ensure_topics, pipeline_topics
from heartbeat_registry.pb import hb
from processors import metrics
from processors.shard_leases import ShardLeases

log = logging.getLogger(__name__)

# Entries per shard per read. An entry holds one group commit of the ingest: one heartbeat (a small fleet
# beating one at a time) to thousands (BeatBatch at full rate), so the count follows the entries' size:
# about READ_HEARTBEATS heartbeats a read, between READ_COUNT and MAX_READ_COUNT entries. With a fixed 64
# a backlog of small entries went 64 at a time, one Kafka round trip each (the chaos soak: after a Kafka
# restart the bridges took 5 s to forward the 14 s that waited in Redis; 0.4 s since).
READ_COUNT = 64
MAX_READ_COUNT = 4096
READ_HEARTBEATS = 32_768
MAX_RECORD_BYTES = 512 * 1024
POLL_S = (
    0.01  # a unit of several shards reads without blocking (one blocking read per shard would wait for the slowest)
)

Entry = tuple[str, tuple[bytes, dict[bytes, bytes]]]  # (stream, (entry id, fields))


class LeaseLost(Exception):
    """The unit's lease may have passed to another bridge: stop without forwarding what was read."""


# The idempotent producer's sequence state can go wrong for good (a broker restarted while batches were in
# flight): every later send then fails with one of these (found by the chaos soak: the bridge retried for
# minutes). A new producer, with a new producer id, starts afresh; the failed cycle's entries are pending
# in Redis and are claimed and sent again.
PRODUCER_OUT_OF_STEP = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch, ProducerFenced)


class Bridge:
    """Forwards the shards this bridge holds leases on (processors/shard_leases.py).

    A unit is what one lease covers. When shards and partitions match, a unit is one shard and feeds one
    partition, so bridges split the shards between them. Otherwise every shard feeds every partition and
    one watermark must cover all shards: then there is one unit, all shards, and further bridges stand by.
    Each unit is forwarded by its own task with one XREADGROUP per stream (never one call over several
    streams: on Redis Cluster the shards live on different nodes).
    """

    def __init__(
        self,
        client: Any,
        producer: AIOKafkaProducer,
        names: Names,
        partitions: int,
        consumer: str,
        watermark_interval: float,
        watermark_slack: float,
        lease_ttl: float = 3.0,
        make_producer: Callable[[], Awaitable[AIOKafkaProducer]] | None = None,
    ) -> None:
        self._redis = client
        self.producer = producer
        self._make_producer = make_producer
        self._producer_lock = asyncio.Lock()
        self._names = names
        self._partitions = partitions
        self._interval_ms = int(watermark_interval * 1000)
        self._slack_ms = int(watermark_slack * 1000)
        self._streams = names.streams()
        self._direct = names.shards == partitions
        # one consumer per running bridge: its pending entries are its own until another bridge claims them
        self.consumer = f"{consumer}-{uuid.uuid4().hex[:8]}"
        units = range(names.shards) if self._direct else range(1)
        self._leases = ShardLeases(
            client, names.bridge_members, [names.bridge_lease(u) for u in units], self.consumer, lease_ttl
        )
        self._refresh_s = lease_ttl / 3
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._read_counts: dict[str, int] = {}  # stream -> entries its next read asks for
        self._unit_stops: dict[int, asyncio.Event] = {}
        self._unit_healthy: dict[int, bool] = {}
        self._last_sent = [0] * partitions  # wall ms of the last record per partition
        self._marks = [0] * partitions  # watermark per partition
        self._leases_ok = False

    @property
    def healthy(self) -> bool:
        """Leases renewed, and every unit held forwarding (a bridge holding none is a healthy standby); a
        unit whose task ended on an error it did not expect forwards nothing more, and says so here."""
        units = self._tasks.items()
        return self._leases_ok and all(self._unit_healthy.get(u, False) and not task.done() for u, task in units)

    @property
    def watermark(self) -> int:
        return min(self._marks)

    async def setup(self) -> None:
        for stream in self._streams:
            try:
                await self._redis.xgroup_create(stream, self._names.bridge_group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def run(self, stop: asyncio.Event) -> None:
        """Hold leases and forward the units held until `stop`; then finish the cycles in progress (forward,
        then XACK), hand the leases back and leave."""
        leases = self._leases
        while not stop.is_set():
            try:
                gained, lost, surplus = await leases.refresh()
                self._leases_ok = True
            except (RedisError, OSError) as exc:
                self._leases_ok = False
                log.warning("bridge lease renewal failed", extra={"error": repr(exc)})
                gained, lost, surplus = set(), set(), set()
            for unit in lost:
                log.warning("bridge lost a shard lease", extra={"unit": unit, "consumer": self.consumer})
                await self._stop_unit(unit)
            for unit in surplus:  # handed to a bridge that joined: finish the cycle in progress first
                self._unit_stops[unit].set()
                await self._stop_unit(unit)
                with contextlib.suppress(RedisError, OSError):
                    await leases.release(unit)
            lapsed = self._lapsed(leases.owned - gained)
            if lapsed:
                log.warning("bridge forwards units again after their lease lapsed", extra={"units": sorted(lapsed)})
            for unit in gained | lapsed:
                self._unit_healthy[unit] = False
                self._unit_stops[unit] = asyncio.Event()
                self._tasks[unit] = asyncio.create_task(self._forward_unit(unit, stop), name=f"bridge-unit-{unit}")
            if gained or lost or surplus:
                log.info("bridge shards", extra={"units": sorted(leases.owned), "consumer": self.consumer})
            metrics.BRIDGE_UNITS.set(len(self._tasks))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._refresh_s)
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        with contextlib.suppress(RedisError, OSError):
            await leases.leave()
            await self._forget_consumer()

    def _lapsed(self, held: set[int]) -> set[int]:
        """Units held whose forwarding stopped on its own (LeaseLost): the lease lapsed here, yet the renewal
        that followed held it, since Redis expires the key a little later than this bridge trusts it (found
        by the chaos soak: a partition's clock stood still until the lease changed hands). Not a unit whose
        task failed unexpectedly: that one keeps the bridge unhealthy (`healthy`)."""
        lapsed = set()
        for unit in held:
            task = self._tasks.get(unit)
            if task is not None and task.done() and not task.cancelled() and task.exception() is None:
                lapsed.add(unit)
        return lapsed

    async def _stop_unit(self, unit: int) -> None:
        """Wait for the unit's task once asked to stop; a lost lease cannot wait: its forwarding is
        refused anyway (LeaseLost), so a cycle blocked on Redis or Kafka is cancelled."""
        task = self._tasks.pop(unit, None)
        self._unit_healthy.pop(unit, None)
        asked = self._unit_stops.pop(unit, asyncio.Event())
        if task is not None:
            if not asked.is_set():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _forget_consumer(self) -> None:
        """Drop this bridge's consumer from the groups once nothing is pending on it (the group would
        otherwise keep one consumer per bridge ever started)."""
        for stream in self._streams:
            pending = await self._redis.xpending_range(
                stream, self._names.bridge_group, min="-", max="+", count=1, consumername=self.consumer
            )
            if not pending:
                await self._redis.xgroup_delconsumer(stream, self._names.bridge_group, self.consumer)

    def _unit_streams(self, unit: int) -> list[str]:
        return [self._streams[unit]] if self._direct else self._streams

    def _unit_partitions(self, unit: int) -> list[int]:
        return [unit] if self._direct else list(range(self._partitions))

    async def _forward_unit(self, unit: int, stop: asyncio.Event) -> None:
        """Forward one unit until `stop` or cancellation. First (and after any error) the unit's entries that
        some consumer read but never acknowledged, before the watermark moves past them."""
        backlog = True
        asked = self._unit_stops[unit]
        while not stop.is_set() and not asked.is_set():
            producer = self.producer
            try:
                if backlog:
                    await self._claim_pending(unit)
                    backlog = False
                await self.step(unit)
                self._unit_healthy[unit] = True
            except LeaseLost:
                return
            except PRODUCER_OUT_OF_STEP as exc:
                self._unit_healthy[unit] = False
                backlog = True
                log.warning("kafka producer out of step, starting a new one", extra={"error": repr(exc), "unit": unit})
                await self._renew_producer(producer)
            except (RedisError, KafkaError, OSError) as exc:
                self._unit_healthy[unit] = False
                backlog = True
                log.warning("bridge cycle failed, retrying", extra={"error": repr(exc), "unit": unit})
                await asyncio.sleep(0.5)

    async def _renew_producer(self, failed: AIOKafkaProducer) -> None:
        """Replace `failed` with a new producer, once however many units saw it fail."""
        async with self._producer_lock:
            if self.producer is not failed or self._make_producer is None:
                return
            try:
                self.producer = await self._make_producer()
            except (KafkaError, OSError) as exc:  # the next failed cycle tries again
                log.warning("could not start a new kafka producer", extra={"error": repr(exc)})
                await asyncio.sleep(0.5)
                return
        with contextlib.suppress(Exception):  # what it still holds is pending in Redis: sent again
            await asyncio.wait_for(failed.stop(), 5.0)

    async def _claim_pending(self, unit: int) -> None:
        """Take over every entry pending in the group on the unit's streams (a stopped bridge's, or ours
        from a failed cycle) and forward it."""
        claimed = 0
        for stream in self._unit_streams(unit):
            cursor = "0-0"
            while True:
                reply = await self._redis.xautoclaim(
                    stream, self._names.bridge_group, self.consumer, 0, start_id=cursor, count=READ_COUNT
                )
                cursor, entries = reply[0], reply[1]
                if entries:
                    claimed += len(entries)
                    await self._forward(unit, [(stream, e) for e in entries], None)
                if cursor in (b"0-0", "0-0"):
                    break
        if claimed:
            log.warning("claimed unacknowledged entries", extra={"entries": claimed, "unit": unit})

    async def step(self, unit: int) -> None:
        """One read-forward-acknowledge cycle of a unit; sends watermark ticks even when nothing was read."""
        streams = self._unit_streams(unit)
        group, consumer = self._names.bridge_group, self.consumer
        counts = {s: self._read_counts.get(s, READ_COUNT) for s in streams}
        started = now_ms()
        if len(streams) == 1:
            reply = await self._redis.xreadgroup(
                group, consumer, {streams[0]: ">"}, count=counts[streams[0]], block=max(1, self._interval_ms)
            )
            reads = _pairs(reply) or [(streams[0], [])]
        else:
            replies = await asyncio.gather(
                *(self._redis.xreadgroup(group, consumer, {s: ">"}, count=counts[s]) for s in streams)
            )
            reads = [pair for reply in replies for pair in _pairs(reply)]
            if not any(es for _, es in reads):
                await asyncio.sleep(POLL_S)
        # A stream that returned fewer entries than asked for is drained up to `started`; one that
        # returned a full read is known only up to the newest heartbeat read from it.
        progress = started - self._slack_ms
        for stream, es in reads:
            if len(es) >= counts[stream]:
                progress = min(progress, max((_received(f) for _, f in es if f), default=0))
            self._read_counts[stream] = read_count(es)
        entries = [(s, e) for s, es in reads for e in es]
        # in the same records as this cycle's watermark, so the workers fold them in before it passes them
        entries += await self._stragglers(streams)
        await self._forward(unit, entries, progress)

    async def _stragglers(self, streams: list[str]) -> list[Entry]:
        """Entries another bridge of the group read from `streams` but never acknowledged, claimed for
        this one. A bridge that lost its lease (paused past it, say) can still read once more before it
        notices and stops; what it read is then pending under its name, and this bridge's reads no longer
        return it (found by the chaos soak: one acknowledged heartbeat never reached Kafka). One XPENDING
        summary per stream and cycle, in one round trip; claims only when another consumer holds entries."""
        group = self._names.bridge_group
        out: list[Entry] = []
        pipe = self._redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xpending(stream, group)
        for stream, summary in zip(streams, await pipe.execute(), strict=True):
            for holder in summary.get("consumers") or []:
                name = holder["name"].decode() if isinstance(holder["name"], bytes) else holder["name"]
                if name == self.consumer or not int(holder["pending"]):
                    continue
                rows = await self._redis.xpending_range(
                    stream, group, min="-", max="+", count=10_000, consumername=name
                )
                ids = [row["message_id"] for row in rows]
                if ids:
                    claimed = await self._redis.xclaim(stream, group, self.consumer, 0, ids)
                    out.extend((stream, entry) for entry in claimed)
                    log.warning("claimed entries another bridge read", extra={"entries": len(claimed), "from": name})
        return out

    async def _forward(self, unit: int, entries: list[Entry], progress: int | None) -> None:
        """Produce `entries` (and ticks for the unit's quiet partitions), then XACK them. `progress`: how far
        the unit's streams are now forwarded, None for claimed entries (they move no watermark)."""
        if not self._leases.holds(unit):
            raise LeaseLost
        partitions = self._unit_partitions(unit)
        if progress is not None:
            for p in partitions:
                self._marks[p] = max(self._marks[p], progress)
        chunks: dict[int, list[bytes]] = defaultdict(list)
        heartbeats = 0
        for stream, (entry_id, fields) in entries:
            if not fields:  # trimmed away while pending: nothing to forward, only to acknowledge
                continue
            cols = _columns(stream, entry_id, fields)
            if cols is None:  # acknowledged with the others below
                continue
            heartbeats += len(cols.agent_id)
            if self._direct:
                chunks[unit].append(fields[b"b"])
            else:
                for partition, part in self._split(cols).items():
                    chunks[partition].append(part)
        wall = now_ms()
        sends = []
        for partition in partitions:
            parts = chunks.get(partition)
            # claimed entries carry no watermark: this bridge's own may be older than the one the
            # previous holder already sent for the partition (0 is "none" to the workers)
            mark = self._marks[partition] if progress is not None else 0
            if not parts and (not mark or wall - self._last_sent[partition] < self._interval_ms):
                continue
            tick = hb.HeartbeatColumns(watermark_ms=mark).SerializeToString()
            for record in _records(parts or [], tick):
                sends.append(await self.producer.send(self._names.heartbeats_topic, record, partition=partition))
            self._last_sent[partition] = wall
        if sends:
            started = time.perf_counter()
            await asyncio.gather(*sends)
            metrics.BRIDGE_SEND.observe(time.perf_counter() - started)
        if entries:
            by_stream: dict[str, list[bytes]] = defaultdict(list)
            for stream, (entry_id, _) in entries:
                by_stream[stream].append(entry_id)
            group = self._names.bridge_group
            await asyncio.gather(*(self._redis.xack(s, group, *ids) for s, ids in by_stream.items()))
            metrics.BRIDGE_FORWARDED.inc(heartbeats)
        metrics.BRIDGE_WATERMARK_AGE.set(max(0, wall - self.watermark) / 1000)

    def _split(self, cols: hb.HeartbeatColumns) -> dict[int, bytes]:
        """Regroup one stream entry by Kafka partition (only when shards and partitions differ)."""
        index: dict[int, list[int]] = defaultdict(list)
        for i, agent in enumerate(cols.agent_id):
            index[partition_of(agent, self._partitions)].append(i)
        return {partition: select(cols, rows).SerializeToString() for partition, rows in index.items()}


def _columns(stream: str, entry_id: bytes, fields: dict[bytes, bytes]) -> hb.HeartbeatColumns | None:
    """The entry's heartbeats, or None (counted, logged with the entry's id) for an entry the ingest did
    not write: no field `b`, `b` no HeartbeatColumns or with columns of different lengths, `n` or `r` no
    whole number."""
    blob = fields.get(b"b")
    if blob is None:
        why = "no field b"
    else:
        try:
            cols = hb.HeartbeatColumns.FromString(blob)
        except DecodeError:
            why = "b is no HeartbeatColumns"
        else:
            if len({len(getattr(cols, name)) for name in COLUMNS}) > 1:
                why = "b has columns of different lengths"
            elif not all(fields.get(name, b"0").isdigit() for name in (b"n", b"r")):
                why = "n or r is no whole number"
            else:
                return cols
    metrics.BRIDGE_UNDECODABLE.inc()
    log.warning(
        "skipped a stream entry that is no packed heartbeats",
        extra={"stream": stream, "entry": entry_id.decode() if isinstance(entry_id, bytes) else entry_id, "why": why},
    )
    return None


def _received(fields: dict[bytes, bytes]) -> int:
    """The entry's newest receive time, 0 where it has none (a foreign entry: it moves no watermark)."""
    raw = fields.get(b"r", b"0")
    return int(raw) if raw.isdigit() else 0


def read_count(entries: list[Any]) -> int:
    """How many entries the next read of a stream asks for, after reading `entries` from it."""
    if not entries:
        return READ_COUNT
    beats = 0
    for _, fields in entries:
        try:
            beats += max(1, int(fields.get(b"n", 1)))
        except (AttributeError, TypeError, ValueError):  # trimmed, or not the ingest's: `_columns` counts it
            beats += 1
    return max(READ_COUNT, min(MAX_READ_COUNT, READ_HEARTBEATS * len(entries) // beats))


def _pairs(reply: Any) -> list[tuple[str, list[Any]]]:
    """XREADGROUP reply (RESP2): [[stream, [(id, fields), ...]], ...]."""
    return [(stream.decode() if isinstance(stream, bytes) else stream, entries) for stream, entries in reply or []]


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
    await ensure_topics(
        settings.kafka_bootstrap, pipeline_topics(names, settings.topic_partitions, Replication.of(settings))
    )
    client = redis_client.connect(settings, socket_timeout=5.0, socket_connect_timeout=2.0)
    make_producer = functools.partial(
        start_producer,  # acks=all, idempotent
        bootstrap_servers=settings.kafka_bootstrap,
        linger_ms=2,
        max_request_size=4 * 1024 * 1024,
        max_batch_size=1024 * 1024,
        request_timeout_ms=15_000,
    )
    producer = await make_producer()
    bridge = Bridge(
        client,
        producer,
        names,
        settings.topic_partitions,
        consumer,
        settings.watermark_interval,
        settings.watermark_slack,
        settings.bridge_lease,
        make_producer,
    )
    await bridge.setup()
    cleanup = await health.serve(settings.bridge_metrics_addr, lambda: bridge.healthy)
    log.info("bridge running", extra={"consumer": bridge.consumer, "streams": len(names.streams())})
    # A cycle in progress finishes (forward, then XACK) before the loop sees `stop`: nothing half-sent.
    await bridge.run(stop)
    await bridge.producer.stop()
    await cleanup()
    await client.aclose()
    log.info("bridge stopped")
