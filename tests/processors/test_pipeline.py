"""The whole pipeline on real parts: ingest -> Valkey -> bridge -> Kafka -> faust worker -> agent-events."""

from __future__ import annotations

import asyncio
import time

import pytest

from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.pb import hb
from tests.conftest import BOTH_REDIS
from tests.kafka_helpers import read_events

pytestmark = [pytest.mark.kafka, BOTH_REDIS]


def beat(agent: str, status: int = hb.RUNNING) -> hb.Heartbeat:
    return hb.Heartbeat(
        agent_id=agent, task_id=f"{agent}-task", status=status, timestamp=int(time.time() * 1000), cpu_util=0.5
    )


async def beat_for(stub, agent: str, seconds: float, interval: float = 0.2, status: int = hb.RUNNING) -> int:
    """Beat for `seconds`; returns the server receive time of the last beat."""
    last = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        last = (await stub.Beat(beat(agent, status))).received_ms
        await asyncio.sleep(interval)
    return last


async def test_silent_agent_stalls_once_then_recovers(pipeline, pipeline_settings: Settings) -> None:
    settings = pipeline_settings
    stub = pipeline
    topic = Names.of(settings).events_topic
    steady = asyncio.create_task(beat_for(stub, "steady", 9.0))
    last = await beat_for(stub, "silent", 2.0)
    silent_at = time.time()
    events = await read_events(
        settings.kafka_bootstrap,
        topic,
        lambda es: any(e.type == hb.STALL for e in es),
        timeout=settings.stall_timeout + 5,
    )
    seen_at = time.time()
    stalls = [e for e in events if e.type == hb.STALL]
    assert [(e.agent_id, e.reason, e.last_seen_ms) for e in stalls] == [("silent", "silent", last)]
    stall = stalls[0]
    assert stall.task_id == "silent-task"
    assert stall.detected_at_ms >= last + settings.stall_timeout * 1000
    assert stall.emitted_at_ms - last <= (settings.stall_timeout + 1.0) * 1000, "stall not within timeout + 1 s"
    assert seen_at - silent_at < settings.stall_timeout + 2.0

    await asyncio.sleep(2.0)  # still silent: no second stall for the same episode
    back = await beat_for(stub, "silent", 1.0)
    await stub.Beat(beat("silent", hb.STOPPING))  # leaves on purpose: its silence now is no stall
    await steady
    await stub.Beat(beat("steady", hb.STOPPING))
    events = await read_events(
        settings.kafka_bootstrap, topic, lambda es: any(e.type == hb.RECOVERY for e in es), timeout=10
    )
    await asyncio.sleep(1.0)
    events = await read_events(settings.kafka_bootstrap, topic, lambda es: len(es) >= len(events), timeout=5)
    kinds = [(e.type, e.agent_id) for e in events]
    assert kinds == [(hb.STALL, "silent"), (hb.RECOVERY, "silent")], kinds
    recovery = events[1]
    assert recovery.last_seen_ms <= back and recovery.event_id.startswith(f"silent:{last}:")


async def test_agent_that_leaves_is_not_stalled(pipeline, pipeline_settings: Settings) -> None:
    """A leaver's silence is no stall, while a control agent that falls silent the same way without saying
    STOPPING is stalled in the same run."""
    stub = pipeline
    await asyncio.gather(beat_for(stub, "leaver", 1.0), beat_for(stub, "control", 1.0))
    await stub.Beat(beat("leaver", hb.STOPPING))
    await beat_for(stub, "keeper", pipeline_settings.stall_timeout + 2.0)
    events = await read_events(
        pipeline_settings.kafka_bootstrap, Names.of(pipeline_settings).events_topic, lambda es: False, timeout=2
    )
    assert [(e.type, e.agent_id) for e in events] == [(hb.STALL, "control")]
