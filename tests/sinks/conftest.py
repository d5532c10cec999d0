"""Helpers for the sinks' tests: events into `agent-events`, records out of `task-reassignments`, and the
sinks as real processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.topics import ensure_topics, pipeline_topics, reassignment_topics
from heartbeat_registry.pb import hb
from tests import procs


def stall(agent: str, task: str, last_seen: int = 1000, reason: str = "silent") -> hb.AgentEvent:
    now = now_ms()
    return hb.AgentEvent(
        type=hb.STALL,
        agent_id=agent,
        task_id=task,
        reason=reason,
        last_seen_ms=last_seen,
        detected_at_ms=now,
        emitted_at_ms=now,
        event_id=f"{agent}:{last_seen}:stall",
    )


async def topics(settings: Settings) -> None:
    names = Names.of(settings)
    partitions = settings.topic_partitions
    await ensure_topics(
        settings.kafka_bootstrap, pipeline_topics(names, partitions) + reassignment_topics(names, partitions)
    )


async def send_events(settings: Settings, events: Sequence[hb.AgentEvent]) -> None:
    """Into `agent-events` as the workers send them: keyed by agent, on the agent's partition."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5)
    await producer.start()
    try:
        topic = Names.of(settings).events_topic
        sends = [
            await producer.send(
                topic,
                e.SerializeToString(),
                key=e.agent_id.encode(),
                partition=partition_of(e.agent_id, settings.topic_partitions),
            )
            for e in events
        ]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def reassignments(settings: Settings, until: int, timeout: float, settle: float = 1.0) -> list[hb.Reassignment]:
    """Every committed record of `task-reassignments`, until there are `until` (then `settle` seconds
    more, so that extra ones would show) or the timeout."""
    consumer = AIOKafkaConsumer(
        Names.of(settings).reassignments_topic,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    found: list[hb.Reassignment] = []
    deadline = time.monotonic() + timeout
    settled = None
    try:
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                found.extend(hb.Reassignment.FromString(r.value) for r in records)
            if len(found) >= until:
                settled = settled or time.monotonic() + settle
                if time.monotonic() >= settled:
                    break
    finally:
        await consumer.stop()
    return found


def healthy(addr: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{addr}/healthz", timeout=2) as response:
            return bool(json.load(response)["ok"])
    except OSError:
        return False


async def start_sink(settings: Settings, log, command: str = "reassign") -> subprocess.Popen:
    """`hbreg reassign` (or `assigner`, `alerter`) as a process; returns once it answers healthy."""
    proc = procs.hbreg([command], settings, log)
    addr = {
        "reassign": settings.reassign_metrics_addr,
        "assigner": settings.assigner_metrics_addr,
        "alerter": settings.alerts_metrics_addr,
    }[command]
    deadline = time.monotonic() + 60
    try:
        while not healthy(addr):
            assert proc.poll() is None, f"{command} exited with {proc.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"{command} not healthy within 60 s"
            await asyncio.sleep(0.2)
    except BaseException:
        procs.stop(proc)
        raise
    return proc
