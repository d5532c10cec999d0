"""The faust worker as a process, on the real broker: fresh topics, misshapen topics, poison records, a
quiet topic with work left, and the hooks of processors/faust_adapter.py taking effect."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.request

import faust
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.topics import ensure_topics, pipeline_topics
from heartbeat_registry.errors import ConfigError
from heartbeat_registry.hbreg.bench.common import metric, wait_worker
from heartbeat_registry.pb import hb
from processors.faust_adapter import FETCH_MAX_WAIT_MS, seek_back
from tests import procs
from tests.kafka_helpers import committed_and_end, eventually

pytestmark = pytest.mark.kafka


def columns(beats: list[tuple[str, int]], watermark: int) -> bytes:
    return hb.HeartbeatColumns(
        agent_id=[a for a, _ in beats],
        task_id=["t"] * len(beats),
        status=[hb.RUNNING] * len(beats),
        timestamp=[r for _, r in beats],
        cpu_util=[0.5] * len(beats),
        progress=[float("nan")] * len(beats),
        received_ms=[r for _, r in beats],
        watermark_ms=watermark,
    ).SerializeToString()


async def produce(settings: Settings, records: list[tuple[int, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        topic = Names.of(settings).heartbeats_topic
        await asyncio.gather(*[await producer.send(topic, value, partition=p) for p, value in records])
    finally:
        await producer.stop()


def healthz(settings: Settings) -> dict:
    with urllib.request.urlopen(f"http://{settings.worker_web_addr}/healthz", timeout=5) as response:
        return json.load(response)


async def last_value(settings: Settings, topic: str, key: bytes) -> dict | None:
    """The newest value of `key` in a changelog topic."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    found = None
    try:
        ends = await consumer.end_offsets(list(consumer.assignment()) or [TopicPartition(topic, 0)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                for record in records:
                    if record.key is not None and key in record.key:
                        found = json.loads(record.value)
            if all([await consumer.position(tp) >= end for tp, end in ends.items()]):
                break
    finally:
        await consumer.stop()
    return found


async def test_fresh_topics_work_at_once_every_time(pipeline_settings: Settings, tmp_path) -> None:
    """On brand-new topics (none of them, changelogs included, exist), three times over: the worker
    creates them, joins, folds a record in, and never crashes its agent on the way."""
    for run in range(3):
        settings = dataclasses.replace(
            pipeline_settings,
            key_prefix=f"{pipeline_settings.key_prefix}f{run}",
            topic_prefix=f"{pipeline_settings.topic_prefix}f{run}-",
        )
        log = tmp_path / f"worker{run}.log"
        worker = procs.hbreg(["worker"], settings, log)
        try:
            await asyncio.to_thread(wait_worker, settings.worker_web_addr, worker, 60)
            now = int(time.time() * 1000)
            await produce(
                settings, [(partition_of("fresh", settings.topic_partitions), columns([("fresh", now)], now))]
            )
            addr = settings.worker_web_addr
            await eventually(lambda addr=addr: metric(addr, "hbreg_worker_heartbeats_total") >= 1, 20)
            assert healthz(settings)["ok"] is True
        finally:
            procs.stop(worker)
        text = log.read_text()
        assert "PartitionsMismatch" not in text and "crashed" not in text.lower(), text[-3000:]
        assert "level=error" not in text, [line for line in text.splitlines() if "level=error" in line]


async def test_a_misshapen_topic_is_refused_in_one_line(pipeline_settings: Settings, tmp_path) -> None:
    """A changelog made with the wrong partition count: the worker does not start (exit 2, one line)."""
    names = Names.of(pipeline_settings)
    changelog = f"{names.processors_app_id}-snapshots-changelog"
    admin = AIOKafkaAdminClient(bootstrap_servers=pipeline_settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(changelog, 1, 1)])
    finally:
        await admin.close()
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "heartbeat_registry", "worker"],
        env={**os.environ, **pipeline_settings.child_env()},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hbreg: Kafka topic") and changelog in last and "1 partitions" in last, last


async def test_a_quiet_topic_still_completes_window_rows_and_commits(pipeline_settings: Settings, tmp_path) -> None:
    """A backlog whose last record closes many windows at once, then nothing more (bridge stopped, end
    of a backlog): the rows of every closed window are written and every offset is committed anyway
    (the worker ticks the quiet partition itself), with an undecodable record in the middle skipped."""
    settings = dataclasses.replace(pipeline_settings, topic_partitions=1, stream_shards=1, window_size=2.0)
    agents = [f"q{i:04d}" for i in range(2500)]  # 3 chunks of rows per window: more than one record writes
    start = int(time.time() * 1000) - 60_000
    records = []
    for t in range(0, 12_000, 1000):  # six 2 s windows, one beat per agent per second
        records.append((0, columns([(a, start + t + i % 1000) for i, a in enumerate(agents)], start + t - 200)))
    records.insert(3, (0, b"\xff\xffnot a protobuf"))
    final = start + 30_000
    records.append((0, hb.HeartbeatColumns(watermark_ms=final).SerializeToString()))  # closes them all
    await ensure_topics(settings.kafka_bootstrap, pipeline_topics(Names.of(settings), 1))
    await produce(settings, records)
    worker = procs.hbreg(["worker"], settings, tmp_path / "worker.log")
    try:
        await asyncio.to_thread(wait_worker, settings.worker_web_addr, worker, 60)

        async def all_committed() -> bool:
            committed, end = await committed_and_end(settings, 0)
            return committed == end

        await eventually(all_committed, 30, every=0.5)
        assert metric(settings.worker_web_addr, "hbreg_worker_undecodable_records_total") == 1
        assert metric(settings.worker_web_addr, "hbreg_worker_heartbeats_total") == len(agents) * 12
        assert metric(settings.worker_web_addr, "hbreg_worker_self_ticks_total") >= 1
    finally:
        procs.stop(worker)
    meta = await last_value(settings, f"{Names.of(settings).processors_app_id}-snapshots-changelog", b'"p0"')
    last_window_end = (start + 11_999) // 2000 * 2000 + 2000
    assert meta is not None and meta["closed_until"] >= last_window_end, meta


async def test_hooks_take_effect(pipeline_settings: Settings, tmp_path) -> None:
    """Hook 1: the running consumer's fetcher waits 100 ms (the worker logs what it reads back). Hook 3:
    the committed offsets the worker acts on are the broker's."""
    log = tmp_path / "worker.log"
    worker = procs.hbreg(["worker"], pipeline_settings, log)
    try:
        await asyncio.to_thread(wait_worker, pipeline_settings.worker_web_addr, worker, 60)
        now = int(time.time() * 1000)
        await produce(pipeline_settings, [(p, columns([], now)) for p in range(pipeline_settings.topic_partitions)])
        await eventually(lambda: "faust hooks in effect" in log.read_text(), 20)
        line = next(line for line in log.read_text().splitlines() if "faust hooks in effect" in line)
        assert f"fetch_max_wait_ms={FETCH_MAX_WAIT_MS}" in line, line

        async def offsets_agree() -> bool:
            reported = healthz(pipeline_settings)["committed"]
            broker = {str(p): (await committed_and_end(pipeline_settings, p))[0] for p in range(4)}
            return bool(reported) and all(v is not None for v in reported.values()) and reported == broker

        await eventually(offsets_agree, 20, every=0.5)
    finally:
        procs.stop(worker)


async def test_seek_back_rewinds_partitions_with_nothing_committed(pipeline_settings: Settings) -> None:
    """Hook 2 on a real consumer: after reading ahead, a partition with nothing committed goes back to its
    beginning (aiokafka alone leaves it where the fetch got to), one with a commit goes to the commit."""
    names = Names.of(pipeline_settings)
    await ensure_topics(pipeline_settings.kafka_bootstrap, pipeline_topics(names, 2))
    await produce(pipeline_settings, [(p, b"x") for p in (0, 1) for _ in range(5)])
    consumer = AIOKafkaConsumer(
        bootstrap_servers=pipeline_settings.kafka_bootstrap,
        group_id=f"{names.topic_prefix}seek",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        tps = [TopicPartition(names.heartbeats_topic, p) for p in (0, 1)]
        consumer.assign(tps)
        await eventually(lambda: consumer.getmany(timeout_ms=200), 10)  # reads ahead
        await consumer.commit({tps[1]: 3})
        for tp in tps:
            consumer.seek(tp, 5)
        committed = await seek_back(consumer)
        assert committed == {tps[0]: None, tps[1]: 3}
        assert [await consumer.position(tp) for tp in tps] == [0, 3]
    finally:
        await consumer.stop()


_apps: list[faust.App] = []


def worker_app(settings: Settings) -> faust.App:
    """The worker's app in-process, made once per test session: faust registers its Prometheus metrics
    in the process's registry, so a second app would fail to."""
    if not _apps:
        from processors.app import create_app

        _apps.append(create_app(settings)[0])
    return _apps[0]


def test_untested_library_versions_are_refused_in_one_line(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from processors import faust_adapter

    found = {"faust-streaming": "0.16.0", "aiokafka": "0.14.0"}
    monkeypatch.setattr(faust_adapter.metadata, "version", found.__getitem__)
    with pytest.raises(ConfigError) as err:
        faust_adapter.verify(allow_untested=False)
    message = str(err.value)
    assert "\n" not in message and "faust-streaming 0.16.0 (verified: 0.15.3)" in message
    assert "HBREG_ALLOW_UNTESTED_VERSIONS" in message
    faust_adapter.verify(allow_untested=True)  # starts, loudly
    assert any(r.levelname == "ERROR" and "UNTESTED" in r.getMessage() for r in caplog.records)


async def test_the_table_manager_starts_without_faust_s_one_second_sleep(
    pipeline_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hook 4: the worker's table manager registers the changelogs and starts recovery at once; faust's own
    sleeps a second first (the positive control), which every worker (re)start waited out."""
    from faust import tables

    from processors import faust_adapter

    manager = worker_app(pipeline_settings).tables
    assert isinstance(manager, faust_adapter.TableManager)
    steps: list[str] = []

    async def sleep(seconds: float) -> None:
        steps.append(f"sleep {seconds}")

    async def update_channels() -> None:
        steps.append("channels")

    async def start_recovery() -> None:
        steps.append("recovery")

    monkeypatch.setattr(manager, "sleep", sleep)
    monkeypatch.setattr(manager, "_update_channels", update_channels)
    monkeypatch.setattr(manager.recovery, "start", start_recovery)
    await manager.on_start()
    assert steps == ["channels", "recovery"]
    steps.clear()
    await tables.TableManager.on_start(manager)
    assert steps == ["sleep 1.0", "channels", "recovery"]


async def test_only_the_worker_s_own_acknowledgements_count(
    pipeline_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hook 6: faust's stream acknowledges the records it skips during a rebalance, which the worker never
    saw; the consumer takes an acknowledgement only for a record the worker released (its windows
    written). faust's own consumer takes any (the positive control)."""
    from faust.transport.drivers import aiokafka as driver
    from faust.types.tuples import TP, Message

    from processors import faust_adapter

    app = worker_app(pipeline_settings)
    consumer = faust_adapter.consumer(app)
    monkeypatch.setattr(app.topics, "acks_enabled_for", lambda topic: True)  # as once the agent subscribed
    topic = "heartbeats"

    def record(offset: int) -> Message:
        return Message(topic, 0, offset, 0.0, 0, None, b"", b"", None)

    assert driver.Consumer.ack(consumer, record(0))
    assert not consumer.ack(record(1))  # skipped by faust's stream
    released = record(1)
    consumer.release(released)
    assert consumer.ack(released)
    assert sorted(consumer._acked[TP(topic, 0)]) == [0, 1]
