"""The reassignment sink as a process on the real broker and Valkey: exactly one Reassignment per stall
episode, whatever is repeated, killed or raced."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import signal

import pytest

from heartbeat_registry.core import redis_client
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.tasks import TaskStore
from heartbeat_registry.core.views import ALIVE, RECOVERED, STALLED, AgentView
from heartbeat_registry.hbreg import services
from heartbeat_registry.pb import hb
from tests import procs
from tests.sinks.conftest import reassignments, send_events, stall, start_sink, topics

pytestmark = pytest.mark.kafka


async def test_a_stall_event_three_times_is_one_reassignment_within_a_second(
    pipeline_settings: Settings, tmp_path
) -> None:
    await topics(pipeline_settings)
    sink = await start_sink(pipeline_settings, tmp_path / "reassign.log")
    try:
        first = stall("a1", "job-1")
        await send_events(pipeline_settings, [first, first, stall("a2", "job-2"), first])
        found = await reassignments(pipeline_settings, until=2, timeout=20, settle=2.0)
    finally:
        procs.stop(sink)
    by_task = {r.task_id: r for r in found}
    assert sorted(r.task_id for r in found) == ["job-1", "job-2"], found
    r1 = by_task["job-1"]
    assert (r1.from_agent_id, r1.epoch, r1.reason, r1.stall_event_id) == ("a1", 1, "silent", first.event_id)
    assert r1.emitted_at_ms - first.emitted_at_ms < 1000, "reassignment later than 1 s after its stall event"


async def test_killed_at_any_point_and_restarted_the_sink_publishes_each_exactly_once(
    pipeline_settings: Settings, tmp_path
) -> None:
    settings = dataclasses.replace(pipeline_settings, reassign_rate=100_000.0, reassign_burst=100_000.0)
    await topics(settings)
    stalls = [stall(f"k{i:04d}", f"job-k{i:04d}") for i in range(3000)]
    await send_events(settings, stalls)
    log = tmp_path / "reassign.log"
    for _ in range(3):  # killed three times mid-way (between a decision and its commit, most likely)
        sink = await start_sink(settings, log)
        await asyncio.sleep(0.4)
        procs.stop(sink, signal.SIGKILL)
    sink = await start_sink(settings, log)
    try:
        found = await reassignments(settings, until=len(stalls), timeout=90, settle=3.0)
    finally:
        procs.stop(sink)
    counts = collections.Counter((r.task_id, r.epoch) for r in found)
    assert len(counts) == len(stalls), f"{len(stalls) - len(counts)} stalls without their reassignment"
    assert set(counts.values()) == {1}, [k for k, n in counts.items() if n > 1][:10]
    assert {epoch for _, epoch in counts} == {1}


async def test_two_replicas_racing_with_one_killed_give_one_each(pipeline_settings: Settings, tmp_path) -> None:
    settings = dataclasses.replace(pipeline_settings, reassign_rate=100_000.0, reassign_burst=100_000.0)
    await topics(settings)
    other = dataclasses.replace(settings, reassign_metrics_addr=f"127.0.0.1:{services.free_port()}")
    first = await start_sink(settings, tmp_path / "reassign-1.log")
    second = await start_sink(other, tmp_path / "reassign-2.log")
    sent = []
    try:
        for round_ in range(30):  # stalls keep coming while one replica dies and the other takes over
            batch = [stall(f"r{round_:02d}-{i:03d}", f"job-r{round_:02d}-{i:03d}") for i in range(50)]
            sent.extend(batch)
            await send_events(settings, batch)
            if round_ == 5:
                procs.stop(first, signal.SIGKILL)
            await asyncio.sleep(0.5)
        # the survivor gets the dead one's partitions after the session timeout (10 s)
        found = await reassignments(settings, until=len(sent), timeout=60, settle=3.0)
    finally:
        procs.stop(first)
        procs.stop(second)
    counts = collections.Counter(r.task_id for r in found)
    assert len(counts) == len(sent), f"{len(sent) - len(counts)} stalls without their reassignment"
    assert set(counts.values()) == {1}, [k for k, n in counts.items() if n > 1][:10]


async def test_policy_and_rate_limit(pipeline_settings: Settings, tmp_path) -> None:
    """Only the configured reasons reassign, a stall without a task reassigns nothing, and the excess over
    the rate waits its turn instead of being dropped."""
    settings = dataclasses.replace(pipeline_settings, reassign_on=("silent",), reassign_rate=20.0, reassign_burst=5.0)
    await topics(settings)
    sink = await start_sink(settings, tmp_path / "reassign.log")
    try:
        events = [stall(f"p{i:02d}", f"job-p{i:02d}") for i in range(40)]
        events += [stall("h1", "job-h1", reason="hung"), stall("n1", "")]
        await send_events(settings, events)
        started = asyncio.get_running_loop().time()
        found = await reassignments(settings, until=40, timeout=30, settle=2.0)
        took = asyncio.get_running_loop().time() - started
    finally:
        procs.stop(sink)
    assert sorted(r.task_id for r in found) == sorted(f"job-p{i:02d}" for i in range(40))
    assert took >= (40 - 5) / 20 * 0.8, f"40 reassignments at 20/s (burst 5) took only {took:.2f} s"
    assert {r.reason for r in found} == {"silent"} and all(r.from_agent_id != "h1" for r in found)


async def test_only_an_agent_the_worker_counts_back_keeps_its_task(pipeline_settings: Settings, tmp_path) -> None:
    """The sink reads the worker's view of each stalled agent: one back `alive` on its task keeps it; one
    with a newer beat the worker folded into the same stall (a killed agent's last beat stored late, or
    one beat before dying again) loses it, since no second stall event would ever come (the chaos soak
    lost a task this way when a single newer beat in the registry counted as recovery)."""
    await topics(pipeline_settings)
    names = Names.of(pipeline_settings)
    client = redis_client.connect(pipeline_settings)
    try:
        states = {"back": ALIVE, "late": STALLED, "again": RECOVERED}
        for agent, state in states.items():
            view = AgentView(f"job-{agent}", hb.RUNNING, 0.5, 1500, state, "", 1500, 1000.0, 50.0)
            key = names.query_agents_of(agent, pipeline_settings.topic_partitions)
            await client.hset(key, agent, view.encode())
        sink = await start_sink(pipeline_settings, tmp_path / "reassign.log")
        try:
            await send_events(pipeline_settings, [stall(agent, f"job-{agent}", last_seen=1000) for agent in states])
            found = await reassignments(pipeline_settings, until=2, timeout=20, settle=2.0)
        finally:
            procs.stop(sink)
        history = await TaskStore(client, names).history("job-back")
    finally:
        await client.aclose()
    assert sorted(r.task_id for r in found) == ["job-again", "job-late"], found
    assert any("recovered: silent stall" in str(h.get("why")) for h in history), history


def test_the_contract_message_has_its_fields() -> None:
    fields = {f.name: f.number for f in hb.Reassignment.DESCRIPTOR.fields}
    assert fields == {
        "task_id": 1,
        "from_agent_id": 2,
        "epoch": 3,
        "reason": 4,
        "stall_event_id": 5,
        "detected_at_ms": 6,
        "emitted_at_ms": 7,
    }
