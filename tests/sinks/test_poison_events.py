"""Poison on `agent-events`: records that are no AgentEvent the sinks can act on, put on the topic ahead of
a genuine stall. The reassignment sink and the Alertmanager sink (real processes, on the session's Kafka and
Valkey, with a real Alertmanager) each count them, skip them, stay up, and still act on the stall."""

from __future__ import annotations

import asyncio
import math

import pytest
from aiokafka import AIOKafkaProducer

from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.hbreg.bench.common import metric
from heartbeat_registry.pb import hb
from tests import procs
from tests.kafka_helpers import eventually
from tests.sinks.conftest import healthy, reassignments, send_events, stall, start_sink, topics
from tests.sinks.test_alerts import alert_settings, alertmanagers

pytestmark = pytest.mark.kafka

AGENT, TASK = "poisoned-neighbour", "job-after-the-poison"
# (what it is, key, value): every one on the genuine stall's partition, ahead of it
POISON: list[tuple[str, bytes | None, bytes | None]] = [
    ("random bytes", b"p-bytes", b"\xff\xfe\xfd not a protobuf"),
    ("an empty value", b"p-empty", b""),
    ("a tombstone (no value)", b"p-tombstone", None),
    ("no key, and an AgentEvent cut short", None, b"\x12\x10cut short"),
    (
        "a HeartbeatColumns (a `heartbeats` record on the wrong topic)",
        b"p-columns",
        hb.HeartbeatColumns(
            agent_id=["a"], task_id=["t"], status=[hb.RUNNING], timestamp=[1], cpu_util=[0.5], watermark_ms=2
        ).SerializeToString(),
    ),
    (
        "a Heartbeat (no event type)",
        b"p-heartbeat",
        hb.Heartbeat(agent_id="a", task_id="t", status=hb.RUNNING, timestamp=1, cpu_util=0.5).SerializeToString(),
    ),
]
# AgentEvents that parse, but one sink cannot act on (and the other can, or ignores them):
NAN_EXPIRY = hb.AgentEvent(  # the reassignment sink cannot expire epoch NaN (the alerts ignore expiries)
    type=hb.ASSIGNMENT_EXPIRED,
    agent_id=AGENT,
    task_id="job-x",
    event_id="expire:job-x:nan",
    reason="assignment_expired",
    figures={"epoch": math.nan},
)
FAR_FUTURE = hb.AgentEvent(  # no RFC 3339 time for Alertmanager (a stall without a task reassigns nothing)
    type=hb.STALL,
    agent_id="from-the-year-146-million",
    reason="silent",
    detected_at_ms=2**62,
    emitted_at_ms=2**62,
    event_id="from-the-year-146-million:1:stall",
)


async def produce_poison(settings: Settings) -> None:
    partition = partition_of(AGENT, settings.topic_partitions)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        topic = Names.of(settings).events_topic
        records = [(key, value) for _, key, value in POISON]
        records += [(AGENT.encode(), e.SerializeToString()) for e in (NAN_EXPIRY, FAR_FUTURE)]
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key, partition=partition)
    finally:
        await producer.stop()


async def test_poison_records_are_counted_and_skipped_and_the_stall_after_them_still_acted_on(
    pipeline_settings: Settings, tmp_path
) -> None:
    with alertmanagers(tmp_path, pipeline_settings.http_addr) as members:
        settings = alert_settings(pipeline_settings, members)
        await topics(settings)
        await produce_poison(settings)
        genuine = stall(AGENT, TASK)
        await send_events(settings, [genuine])  # after the poison, on the same partition
        reassign = await start_sink(settings, tmp_path / "reassign.log")
        alerter = await start_sink(settings, tmp_path / "alerter.log", "alerter")
        try:
            # the positive controls: the stall behind the poison reassigns its task and fires its alert
            found = await reassignments(settings, until=1, timeout=30)
            assert [(r.task_id, r.from_agent_id, r.stall_event_id) for r in found] == [
                (TASK, AGENT, genuine.event_id)
            ], found
            await eventually(lambda: members[0].active("AgentStalled", agent_id=AGENT), 15, every=0.2)
            assert [a["labels"]["agent_id"] for a in members[0].active("AgentStalled")] == [AGENT]

            reassign_poison = metric(settings.reassign_metrics_addr, "hbreg_reassign_undecodable_records_total")
            assert reassign_poison == len(POISON) + 1, "each poison record (and the NaN expiry) once"
            alerts_poison = metric(settings.alerts_metrics_addr, "hbreg_alerts_undecodable_records_total")
            assert alerts_poison == len(POISON) + 1, "each poison record (and the far-future stall) once"
            for proc, addr in ((reassign, settings.reassign_metrics_addr), (alerter, settings.alerts_metrics_addr)):
                assert proc.poll() is None and await asyncio.to_thread(healthy, addr)
        finally:
            procs.stop(reassign)
            procs.stop(alerter)
    for name in ("reassign", "alerter"):
        text = (tmp_path / f"{name}.log").read_text()
        skipped = [line for line in text.splitlines() if "level=warning" in line and "no AgentEvent" in line]
        assert len(skipped) == len(POISON) + 1, text[-3000:]
        assert all(" partition=" in line and " offset=" in line for line in skipped), skipped
