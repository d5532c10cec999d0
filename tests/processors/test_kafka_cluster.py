"""Replication: the pipeline on a three-broker KRaft cluster with 3 replicas and min.insync.replicas 2
loses no acknowledged heartbeat when a broker dies under it (SIGKILL, the leader of `heartbeats`
partitions), and keeps going on the two that are left."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from heartbeat_registry.beats import heartbeat, now_ms
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.topics import Replication, ensure_topics, pipeline_topics
from heartbeat_registry.errors import ConfigError
from heartbeat_registry.hbreg import services
from heartbeat_registry.pb import hb, hb_grpc
from tests.kafka_cluster import KafkaCluster, describe
from tests.kafka_helpers import read_events
from tests.processors.conftest import running_pipeline

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

AGENTS = [f"r{i:02d}" for i in range(40)]
QUITTER = "r-quitter"  # stops beating after the kill: its stall is the pipeline's proof of life
BATCH_EVERY_S = 0.1


@pytest.fixture(scope="module")
async def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KafkaCluster]:
    """Three nodes, started only when a test of this module asks (a test that kills one leaves it dead)."""
    if not services.kafka_available():
        pytest.fail(f"the tests need the real Apache Kafka broker, but {services.why_not_kafka()}")
    cluster = KafkaCluster(tmp_path_factory.mktemp("kafka-cluster"), nodes=3)
    try:
        await cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


class Sender:
    """BeatBatch every BATCH_EVERY_S for every agent, each beat with its own seq; keeps which
    (agent, seq) the ingest acknowledged (it replies only once Redis holds them) and when."""

    def __init__(self, stub: hb_grpc.HeartbeatServiceStub) -> None:
        self.stub = stub
        self.seq = 0
        self.acked: dict[tuple[str, int], float] = {}  # (agent, seq) -> monotonic time of the reply
        self.failed = 0
        self.quitter_until = float("inf")  # monotonic time after which the quitter is left out

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.seq += 1
            agents = AGENTS + ([QUITTER] if time.monotonic() < self.quitter_until else [])
            beats = [heartbeat(a, f"{a}-task", hb.RUNNING, 0.5, seq=self.seq) for a in agents]
            try:
                await self.stub.BeatBatch(hb.BeatBatchRequest(heartbeats=beats), timeout=5)
            except grpc.aio.AioRpcError:
                self.failed += 1
            else:
                now = time.monotonic()
                self.acked.update({(a, self.seq): now for a in agents})
            await asyncio.sleep(BATCH_EVERY_S)


async def heartbeats_in_kafka(
    bootstrap: str, topic: str, want: set[tuple[str, int]], timeout: float
) -> tuple[list[tuple[str, int]], int]:
    """Every (agent, seq) in the `heartbeats` records, read from the beginning until all of `want` were
    seen or the timeout (a list: duplicates stay visible), and the longest a heartbeat waited from the
    ingest's receipt to the bridge producing its record (ms; the record's CreateTime)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    seen: list[tuple[str, int]] = []
    slowest = 0
    missing = set(want)
    deadline = time.monotonic() + timeout
    try:
        while missing and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    cols = hb.HeartbeatColumns.FromString(record.value)
                    pairs = list(zip(cols.agent_id, cols.seq, strict=True))
                    seen.extend(pairs)
                    slowest = max([slowest, *(record.timestamp - r for r in cols.received_ms)])
                    missing.difference_update(pairs)
    finally:
        await consumer.stop()
    return seen, slowest


async def min_insync(bootstrap: str, topics: list[str]) -> dict[str, str]:
    """topic -> its `min.insync.replicas`, as the brokers report it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        resources = [ConfigResource(ConfigResourceType.TOPIC, t, {"min.insync.replicas": None}) for t in topics]
        responses = await admin.describe_configs(resources)
    finally:
        await admin.close()
    found = {}
    for response in responses:
        for _, _, _, topic, entries in response.resources:
            for name, value, *_ in entries:
                if name == "min.insync.replicas":
                    found[topic] = value
    return found


async def topic_names(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        return list(await admin.list_topics())
    finally:
        await admin.close()


async def test_a_killed_broker_loses_no_acknowledged_heartbeat(
    settings: Settings, kafka_cluster: KafkaCluster, tmp_path
) -> None:
    settings = dataclasses.replace(
        settings,
        kafka_bootstrap=kafka_cluster.bootstrap,
        topic_partitions=4,
        stream_shards=4,
        stall_timeout=2.0,
        kafka_replication_factor=3,
        kafka_min_insync_replicas=2,
    )
    names = Names.of(settings)
    await ensure_topics(settings.kafka_bootstrap, pipeline_topics(names, 4, Replication.of(settings)))
    async with running_pipeline(settings, tmp_path) as pipeline:
        sender = Sender(pipeline.stub)
        stop = asyncio.Event()
        sending = asyncio.create_task(sender.run(stop))
        try:
            await asyncio.sleep(6)
            before = (await describe(kafka_cluster.bootstrap, [names.heartbeats_topic]))[names.heartbeats_topic]
            led = collections.Counter(p["leader"] for p in before)
            victim = led.most_common(1)[0][0]  # the leader of the most `heartbeats` partitions
            kafka_cluster.kill(victim)
            killed_at, killed_ms = time.monotonic(), now_ms()
            survivors = kafka_cluster.bootstrap_of(kafka_cluster.alive())
            sender.quitter_until = killed_at + 3
            await asyncio.sleep(12)
        finally:
            stop.set()
            await sending
        events = await read_events(
            survivors,
            names.events_topic,
            lambda es: any(e.type == hb.STALL and e.agent_id == QUITTER for e in es),
            timeout=45,
        )
        seen, slowest = await heartbeats_in_kafka(survivors, names.heartbeats_topic, set(sender.acked), timeout=45)
        after = await describe(survivors, [names.heartbeats_topic])
        ours = [t for t in await topic_names(survivors) if t.startswith(settings.topic_prefix)]
        shapes = await describe(survivors, ours)
        configs = await min_insync(survivors, ours)
        worker_alive = pipeline.workers[0].poll() is None
        bridge_alive = pipeline.bridge.poll() is None

    # the fault happened: the victim led partitions and is out of every ISR now, its leadership moved
    assert led[victim] >= 1 and victim not in kafka_cluster.alive()
    moved = after[names.heartbeats_topic]
    assert all(p["leader"] != victim and victim not in p["isr"] for p in moved), moved
    # every topic the registry made (ours and faust's changelogs; no leader-election topic) has 3
    # replicas and carries min.insync.replicas=2
    assert any("changelog" in t for t in ours) and not any("__assignor" in t for t in ours), ours
    assert all(len(p["replicas"]) == 3 for parts in shapes.values() for p in parts), shapes
    assert {t: configs.get(t) for t in ours} == {t: "2" for t in ours}
    # zero lost: every heartbeat the ingest acknowledged is in `heartbeats`, also those sent after the kill
    found = set(seen)
    missing = sorted(set(sender.acked) - found)
    after_kill = [k for k, at in sender.acked.items() if at > killed_at]
    assert len(after_kill) > 1000, f"only {len(after_kill)} heartbeats acknowledged after the kill"
    assert not missing, f"{len(missing)} of {len(sender.acked)} acknowledged heartbeats lost: {missing[:10]}"
    # the pipeline kept going: the quitter, silent only after the kill, was judged stalled
    stalls = [e for e in events if e.type == hb.STALL and e.agent_id == QUITTER]
    assert stalls, f"no stall of {QUITTER} after the kill; events: {[(e.type, e.agent_id) for e in events][:10]}"
    assert stalls[0].last_seen_ms > killed_ms
    assert worker_alive and bridge_alive
    print(
        f"\nkilled node {victim} (led {led[victim]} of {len(before)} partitions); acknowledged "
        f"{len(sender.acked)} ({len(after_kill)} after the kill), {sender.failed} batches refused; "
        f"in Kafka: {len(seen)} ({len(seen) - len(found)} duplicates), the slowest produced {slowest / 1000:.1f} s "
        f"after the ingest received it; {QUITTER}'s stall emitted "
        f"{(stalls[0].emitted_at_ms - stalls[0].last_seen_ms) / 1000:.1f} s after its last beat, "
        f"{(stalls[0].emitted_at_ms - killed_ms) / 1000:.1f} s after the kill"
    )


async def test_more_replicas_than_brokers_is_a_config_error(pipeline_settings: Settings) -> None:
    names = Names.of(pipeline_settings)
    bootstrap = pipeline_settings.kafka_bootstrap
    assert bootstrap is not None
    with pytest.raises(ConfigError) as err:
        await ensure_topics(bootstrap, pipeline_topics(names, 1, Replication(replicas=3, min_insync=2)))
    assert str(err.value).startswith("HBREG_KAFKA_REPLICATION_FACTOR=3 is more than the brokers")
    await ensure_topics(bootstrap, pipeline_topics(names, 1, Replication(replicas=1)))  # the control


async def test_an_existing_topic_with_other_replicas_is_used_with_a_warning(
    pipeline_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    names = Names.of(pipeline_settings)
    bootstrap = pipeline_settings.kafka_bootstrap
    assert bootstrap is not None
    await ensure_topics(bootstrap, pipeline_topics(names, 1))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # the control: same shape, no warning
    await ensure_topics(bootstrap, pipeline_topics(names, 1, Replication(replicas=3, min_insync=2)))
    warned = {r.topic for r in caplog.records if r.levelname == "WARNING"}  # type: ignore[attr-defined]
    assert warned == {names.heartbeats_topic, names.events_topic}
