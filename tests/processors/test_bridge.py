"""The bridge between a real Valkey and a real Kafka broker."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import signal
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import OutOfOrderSequenceNumber

from heartbeat_registry.core import redis_client
from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.producers import start_producer
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.topics import ensure_topics, pipeline_topics
from heartbeat_registry.hbreg import services
from heartbeat_registry.pb import hb, hb_grpc
from ingest.server import Ingest
from processors.bridge import Bridge
from tests import procs
from tests.conftest import BOTH_REDIS
from tests.kafka_helpers import columns, eventually, read_records

pytestmark = [pytest.mark.kafka, BOTH_REDIS]


BASE = int(time.time() * 1000) - 600_000  # agent timestamps near the server clock, unique per heartbeat


def batch(start: int, count: int) -> hb.BeatBatchRequest:
    """`count` heartbeats numbered start..start+count-1 (in their timestamps), over 50 agents."""
    return hb.BeatBatchRequest(
        heartbeats=[
            hb.Heartbeat(
                agent_id=f"agent-{n % 50}", task_id="t", status=hb.RUNNING, timestamp=BASE + n, cpu_util=0.5, seq=n
            )
            for n in range(start, start + count)
        ]
    )


def delivered(records: list) -> collections.Counter:
    """How often each heartbeat number reached Kafka."""
    out: collections.Counter = collections.Counter()
    for cols in columns(records):
        out.update(t - BASE for t in cols.timestamp)
    return out


async def run_bridge(settings: Settings, stop: asyncio.Event, consumer: str = "bridge-1") -> Bridge:
    names = Names.of(settings)
    await ensure_topics(settings.kafka_bootstrap, pipeline_topics(names, settings.topic_partitions))
    client = redis_client.connect(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=2)
    await producer.start()
    bridge = Bridge(client, producer, names, settings.topic_partitions, consumer, 0.1, 0.2)
    await bridge.setup()

    async def loop() -> None:
        try:
            await bridge.run(stop)
        finally:
            await producer.stop()
            await client.aclose()

    bridge.task = asyncio.create_task(loop())  # type: ignore[attr-defined]
    return bridge


@contextlib.asynccontextmanager
async def bridge_running(settings: Settings) -> AsyncIterator[Bridge]:
    """A bridge on `settings`, stopped on the way out."""
    stop = asyncio.Event()
    bridge = await run_bridge(settings, stop)
    try:
        yield bridge
    finally:
        stop.set()
        await bridge.task


@contextlib.asynccontextmanager
async def ingest_running(settings: Settings) -> AsyncIterator[Ingest]:
    """An ingest in-process on `settings`, stopped on the way out."""
    ingest = Ingest(settings)
    await ingest.start()
    try:
        yield ingest
    finally:
        await ingest.stop()


@contextlib.asynccontextmanager
async def ingest_and_bridge(settings: Settings) -> AsyncIterator[Bridge]:
    """An ingest in-process and a bridge on `settings`, both stopped on the way out."""
    async with ingest_running(settings), bridge_running(settings) as bridge:
        yield bridge


@pytest.mark.parametrize("shards", [4, 3])
async def test_every_acknowledged_heartbeat_once(pipeline_settings: Settings, shards: int) -> None:
    settings = dataclasses.replace(pipeline_settings, stream_shards=shards)
    names = Names.of(settings)
    async with ingest_and_bridge(settings):
        async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
            stub = hb_grpc.HeartbeatServiceStub(channel)
            for start in range(1, 5001, 500):
                await stub.BeatBatch(batch(start, 500))
        records = await read_records(
            settings.kafka_bootstrap, names.heartbeats_topic, lambda rs: sum(delivered(rs).values()) >= 5000
        )
    counts = delivered(records)
    assert set(counts) == set(range(1, 5001))
    assert set(counts.values()) == {1}, "a heartbeat was delivered twice without a crash"
    for record, cols in zip(records, columns(records), strict=True):
        assert {partition_of(a, settings.topic_partitions) for a in cols.agent_id} <= {record.partition}
        assert cols.watermark_ms > 0
        assert [t - BASE for t in cols.timestamp] == list(cols.seq)  # each heartbeat's own seq rides along


async def test_idle_partitions_get_watermark_ticks(pipeline_settings: Settings) -> None:
    names = Names.of(pipeline_settings)
    async with bridge_running(pipeline_settings):
        records = await read_records(
            pipeline_settings.kafka_bootstrap,
            names.heartbeats_topic,
            lambda rs: {r.partition for r in rs} == set(range(pipeline_settings.topic_partitions)) and len(rs) > 20,
        )
    per_partition = collections.defaultdict(list)
    for record, cols in zip(records, columns(records), strict=True):
        assert not cols.agent_id
        per_partition[record.partition].append(cols.watermark_ms)
    for marks in per_partition.values():
        assert marks == sorted(marks) and marks[-1] > marks[0]


async def test_at_least_once_after_bridge_crash(pipeline_settings: Settings, tmp_path) -> None:
    settings = pipeline_settings
    names = Names.of(settings)
    ingest = Ingest(settings)
    await ingest.start()
    bridge = procs.hbreg(["bridge"], settings, tmp_path / "bridge.log")
    total = 40_000
    try:
        async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
            stub = hb_grpc.HeartbeatServiceStub(channel)
            for n, start in enumerate(range(1, total + 1, 500)):
                await stub.BeatBatch(batch(start, 500))
                if n == 40:
                    procs.stop(bridge, signal.SIGKILL)  # mid-flow: some entries read but not acknowledged
                    bridge = procs.hbreg(["bridge"], settings, tmp_path / "bridge.log")
        records = await read_records(
            settings.kafka_bootstrap, names.heartbeats_topic, lambda rs: len(delivered(rs)) >= total, timeout=60
        )
        client = redis_client.connect(settings)

        async def nothing_pending() -> bool:
            return all([(await client.xpending(s, names.bridge_group))["pending"] == 0 for s in names.streams()])

        await eventually(nothing_pending, timeout=10)
        await client.aclose()
    finally:
        procs.stop(bridge)
        await ingest.stop()
    counts = delivered(records)
    assert set(counts) == set(range(1, total + 1)), "an acknowledged heartbeat never reached Kafka"


async def test_two_bridges_split_the_shards_and_one_takes_over_when_the_other_is_killed(
    pipeline_settings: Settings, tmp_path
) -> None:
    settings = dataclasses.replace(pipeline_settings, bridge_lease=1.5)
    names = Names.of(settings)
    client = redis_client.connect(settings)
    ingest = Ingest(settings)
    await ingest.start()
    bridges = [
        procs.hbreg(
            ["bridge", "--name", f"b{i}"],
            dataclasses.replace(settings, bridge_metrics_addr=f"127.0.0.1:{services.free_port()}"),
            tmp_path / f"bridge{i}.log",
        )
        for i in (1, 2)
    ]

    async def owners() -> list[str]:
        return [(v or b"").decode() for v in [await client.get(names.bridge_lease(s)) for s in range(names.shards)]]

    async def split_evenly() -> bool:
        held = await owners()
        return all(held) and sorted(collections.Counter(o.rsplit("-", 1)[0] for o in held).values()) == [2, 2]

    total = 40_000
    try:
        await eventually(split_evenly, timeout=20)
        async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
            stub = hb_grpc.HeartbeatServiceStub(channel)
            for n, start in enumerate(range(1, total + 1, 500)):
                await stub.BeatBatch(batch(start, 500))
                if n == 40:
                    procs.stop(bridges[0], signal.SIGKILL)  # its shards' leases expire; b2 claims its pending entries

        async def b2_holds_all() -> bool:
            return {o.rsplit("-", 1)[0] for o in await owners()} == {"b2"}

        await eventually(b2_holds_all, timeout=20)
        records = await read_records(
            settings.kafka_bootstrap, names.heartbeats_topic, lambda rs: len(delivered(rs)) >= total, timeout=60
        )

        async def nothing_pending() -> bool:
            return all([(await client.xpending(s, names.bridge_group))["pending"] == 0 for s in names.streams()])

        await eventually(nothing_pending, timeout=10)
    finally:
        for bridge in bridges:
            procs.stop(bridge)
        await ingest.stop()
        await client.aclose()
    assert set(delivered(records)) == set(range(1, total + 1)), "an acknowledged heartbeat never reached Kafka"
    per_partition: dict[int, list[int]] = collections.defaultdict(list)
    for record, cols in zip(records, columns(records), strict=True):
        if cols.watermark_ms:  # 0: none yet (a bridge that just took a shard over forwards its backlog first)
            per_partition[record.partition].append(cols.watermark_ms)
    for marks in per_partition.values():  # one forwarder per partition at a time: its clock never goes back
        assert marks == sorted(marks)


class OutOfStep:
    """A producer whose broker lost its sequence state: every send fails as the broker then answers."""

    def __init__(self) -> None:
        self.stopped = False

    async def send(self, *_: object, **__: object) -> None:
        raise OutOfOrderSequenceNumber()

    async def stop(self) -> None:
        self.stopped = True


async def test_a_producer_out_of_step_is_replaced_and_nothing_is_lost(pipeline_settings: Settings) -> None:
    """Found by the chaos soak: after a Kafka restart with batches in flight, the idempotent producer's every
    send failed with OutOfOrderSequenceNumber and the bridge retried for minutes. It now starts a new
    producer and sends the failed cycle's entries (pending in Redis) with it."""
    settings = pipeline_settings
    names = Names.of(settings)
    await ensure_topics(settings.kafka_bootstrap, pipeline_topics(names, settings.topic_partitions))
    ingest = Ingest(settings)
    await ingest.start()
    client = redis_client.connect(settings)
    made: list[AIOKafkaProducer] = []

    async def make_producer() -> AIOKafkaProducer:
        producer = await start_producer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=2)
        made.append(producer)
        return producer

    broken = OutOfStep()
    bridge = Bridge(client, broken, names, settings.topic_partitions, "bridge-s", 0.1, 0.2, 3.0, make_producer)  # type: ignore[arg-type]
    await bridge.setup()
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
            await hb_grpc.HeartbeatServiceStub(channel).BeatBatch(batch(1, 500))
        records = await read_records(
            settings.kafka_bootstrap, names.heartbeats_topic, lambda rs: sum(delivered(rs).values()) >= 500
        )
    finally:
        stop.set()
        await task
        for producer in made:
            await producer.stop()
        await client.aclose()
        await ingest.stop()
    assert broken.stopped and len(made) == 1, "one new producer, however many shards saw the old one fail"
    assert set(delivered(records)) == set(range(1, 501))


async def test_entries_another_bridge_read_and_left_are_forwarded(pipeline_settings: Settings) -> None:
    """Found by the chaos soak: a bridge that lost its lease (paused past it) read once more before it
    noticed; what it read stayed pending under its name, and the holder's reads never returned it, so an
    acknowledged heartbeat never reached Kafka. The holder now claims such entries every cycle."""
    settings = pipeline_settings
    names = Names.of(settings)
    client = redis_client.connect(settings)
    stolen = 0
    stealing = True

    async def steal(stream: str) -> None:  # a bridge that lost the shard: it reads, and never acknowledges
        nonlocal stolen
        while stealing:
            # blocked like the holder, so Redis hands new entries to either of the two
            reply = await client.xreadgroup(names.bridge_group, "gone-bridge", {stream: ">"}, count=1, block=50)
            stolen += sum(len(entries) for _, entries in reply or [])

    try:
        async with ingest_and_bridge(settings):
            thief = asyncio.gather(*(steal(stream) for stream in names.streams()))
            async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
                stub = hb_grpc.HeartbeatServiceStub(channel)
                for start in range(1, 2001, 100):
                    await stub.BeatBatch(batch(start, 100))
                    await asyncio.sleep(0.02)
            stealing = False
            await thief
            records = await read_records(
                settings.kafka_bootstrap, names.heartbeats_topic, lambda rs: set(delivered(rs)) >= set(range(1, 2001))
            )
    finally:
        stealing = False
        await client.aclose()
    assert stolen > 0, "positive control: the other consumer took entries the holder's reads then skipped"
    assert set(delivered(records)) == set(range(1, 2001))


async def test_a_unit_whose_lease_lapsed_here_but_was_renewed_is_forwarded_again(pipeline_settings: Settings) -> None:
    """Found by the chaos soak (a partition's clock stood still for 14 s): a bridge slowed past its lease's
    local deadline stops the unit's forwarding (LeaseLost), but its next renewal can still succeed (Redis
    expires the key a little later than the bridge trusts it). The unit stayed held, with nothing
    forwarding it. The bridge now starts its forwarding again."""
    settings = pipeline_settings
    names = Names.of(settings)
    async with ingest_and_bridge(settings) as bridge:
        await eventually(lambda: len(bridge._leases.owned) == names.shards and bridge.healthy, 10)
        lapsed = 0
        before = bridge._tasks[lapsed]
        bridge._leases._deadline[lapsed] = time.monotonic() - 1  # as after a pause of its loop
        await eventually(lambda: before.done(), 5)  # positive control: the unit stopped on its own
        async with grpc.aio.insecure_channel(settings.grpc_addr) as channel:
            await hb_grpc.HeartbeatServiceStub(channel).BeatBatch(batch(1, 500))
        records = await read_records(
            settings.kafka_bootstrap,
            names.heartbeats_topic,
            lambda rs: set(delivered(rs)) >= set(range(1, 501)),
            timeout=15,
        )
        # healthy once the cycle that forwarded them returns (its XACK follows the records to Kafka)
        await eventually(lambda: bridge._tasks[lapsed] is not before and bridge.healthy, 5)
    assert set(delivered(records)) == set(range(1, 501))


async def test_a_backlog_of_small_entries_is_forwarded_in_a_few_reads(pipeline_settings: Settings) -> None:
    """One agent beating one heartbeat at a time leaves one stream entry per heartbeat; 1,000 of them wait
    for a bridge (as after a Kafka restart). It reads them by heartbeats, not 64 entries at a time with a
    Kafka round trip each (the chaos soak: 5 s to forward the 14 s that waited)."""
    names = Names.of(pipeline_settings)
    async with ingest_running(pipeline_settings):
        async with grpc.aio.insecure_channel(pipeline_settings.grpc_addr) as channel:
            stub = hb_grpc.HeartbeatServiceStub(channel)
            for n in range(1, 1001):
                beat = hb.Heartbeat(agent_id="agent-0", task_id="t", status=hb.RUNNING, timestamp=BASE + n, seq=n)
                await stub.Beat(beat)
        async with bridge_running(pipeline_settings):
            records = await read_records(
                pipeline_settings.kafka_bootstrap,
                names.heartbeats_topic,
                lambda rs: sum(delivered(rs).values()) >= 1000,
            )
    assert set(delivered(records)) == set(range(1, 1001))
    carrying = [record for record, cols in zip(records, columns(records), strict=True) if cols.agent_id]
    assert len(carrying) <= 3, f"1,000 one-heartbeat entries took {len(carrying)} reads"
