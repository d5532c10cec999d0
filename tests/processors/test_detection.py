"""Detection acceptance on the real pipeline (Valkey, Kafka, bridge and faust worker processes), with
simulated fleets under controlled timing."""

from __future__ import annotations

import asyncio
import dataclasses
import signal

import pytest
from aiokafka import AIOKafkaProducer

from heartbeat_registry.core import redis_client
from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.views import RegistryEntry
from heartbeat_registry.hbreg import services
from heartbeat_registry.hbreg.simulate import Fleet
from heartbeat_registry.pb import hb
from tests import procs
from tests.kafka_helpers import read_events
from tests.processors.conftest import running_pipeline

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def of_type(events, kind: int) -> list[hb.AgentEvent]:
    return [e for e in events if e.type == kind]


async def events_now(settings: Settings, wait: float = 1.0) -> list[hb.AgentEvent]:
    return await read_events(settings.kafka_bootstrap, Names.of(settings).events_topic, lambda es: False, timeout=wait)


async def test_jittery_fleet_never_stalls(pipeline_settings: Settings, tmp_path) -> None:
    """200 agents every 200 ms +-50% for 60 s: zero stalls; one agent pausing 1.5 s (timeout 2 s): none.
    Positive control in the same fleet: one agent killed halfway gets its stall."""
    settings = dataclasses.replace(pipeline_settings, stall_timeout=2.0)
    async with running_pipeline(settings, tmp_path):
        fleet = Fleet(settings.grpc_addr, [f"j{i:03d}" for i in range(200)], interval=0.2, jitter=0.5)
        await fleet.start()
        await asyncio.sleep(30)
        fleet.pause("j007", 1.5)
        await fleet.kill("j100")  # the control
        await asyncio.sleep(30)
        await fleet.stop()
        events = await events_now(settings)
    assert not fleet.errors
    assert fleet.acknowledged > 200 * 4 * 55
    assert [(e.agent_id, e.reason) for e in of_type(events, hb.STALL)] == [("j100", "silent")]
    assert of_type(events, hb.MASS_SILENCE) == []


async def test_killed_agents_stall_once_within_timeout_and_recover(pipeline_settings: Settings, tmp_path) -> None:
    """50 agents killed mid-task one after another: each yields exactly one `silent` stall no later than
    timeout + 0.5 s after its last beat (p99 over the 50), then one recovery when it returns."""
    settings = dataclasses.replace(pipeline_settings, stall_timeout=2.0, recovery_beats=2)
    async with running_pipeline(settings, tmp_path):
        victims = [f"k{i:02d}" for i in range(50)]
        fleet = Fleet(settings.grpc_addr, victims + [f"bystander{i}" for i in range(50)], interval=0.2, jitter=0.3)
        await fleet.start()
        await asyncio.sleep(3)
        last_beat = {}
        for agent in victims:  # staggered, so they are 50 individual stalls, not one outage
            last_beat[agent] = await fleet.kill(agent)
            await asyncio.sleep(0.12)
        await asyncio.sleep(settings.stall_timeout + 1.5)
        for agent in victims:
            await fleet.revive(agent)
        await asyncio.sleep(2.0)
        await fleet.stop()
        events = await events_now(settings)
    stalls = of_type(events, hb.STALL)
    assert sorted(e.agent_id for e in stalls) == victims, "exactly one stall per killed agent, none for others"
    assert {e.reason for e in stalls} == {"silent"}
    lateness = sorted(e.emitted_at_ms - (e.last_seen_ms + 2000) for e in stalls)
    assert all(e.last_seen_ms >= last_beat[e.agent_id] for e in stalls)
    assert lateness[int(0.99 * (len(lateness) - 1))] <= 500, f"stall later than timeout + 0.5 s: {lateness[-5:]}"
    recoveries = of_type(events, hb.RECOVERY)
    assert sorted(e.agent_id for e in recoveries) == victims
    assert {(e.event_id.rsplit(":", 1)[0]) for e in recoveries} == {(e.event_id.rsplit(":", 1)[0]) for e in stalls}


async def test_hung_and_overdue(pipeline_settings: Settings, tmp_path) -> None:
    settings = dataclasses.replace(pipeline_settings, window_size=2.0, max_task_duration=4.0, hung_cpu=0.05)
    async with running_pipeline(settings, tmp_path):
        fleet = Fleet(settings.grpc_addr, ["hung-1", "busy-1", "long-1"], interval=0.2, jitter=0.2)
        fleet.agents["hung-1"].report(cpu=0.0)
        await fleet.start()
        await asyncio.sleep(3.0)
        fleet.agents["busy-1"].report(task_id="busy-1-next")  # switches tasks: not overdue
        await asyncio.sleep(3.5)
        await fleet.stop()
        events = await events_now(settings)
    stalls = of_type(events, hb.STALL)
    assert [(e.agent_id, e.reason) for e in stalls if e.agent_id != "long-1"] == [("hung-1", "hung")]
    hung = next(e for e in stalls if e.reason == "hung")
    assert hung.figures["cpu_max"] == 0.0 and hung.figures["window_s"] == 2.0
    overdue = [e for e in stalls if e.agent_id == "long-1"]
    assert [(e.reason) for e in overdue] == ["overdue"]
    assert overdue[0].figures["running_s"] > 4.0


async def test_paused_bridge_raises_pipeline_lag_not_stalls(pipeline_settings: Settings, tmp_path) -> None:
    settings = dataclasses.replace(pipeline_settings, stall_timeout=2.0, lag_alert=2.0)
    async with running_pipeline(settings, tmp_path) as pipeline:
        fleet = Fleet(settings.grpc_addr, [f"p{i:02d}" for i in range(30)], interval=0.3, jitter=0.3)
        await fleet.start()
        await asyncio.sleep(3)
        pipeline.bridge.send_signal(signal.SIGSTOP)
        await asyncio.sleep(3 * settings.stall_timeout)
        pipeline.bridge.send_signal(signal.SIGCONT)
        await asyncio.sleep(2)
        await fleet.kill("p29")  # the control: a real death after the pause is still seen
        await asyncio.sleep(settings.stall_timeout + 2)
        await fleet.stop()
        events = await events_now(settings)
    assert not fleet.errors
    assert [e.agent_id for e in of_type(events, hb.STALL)] == ["p29"] and of_type(events, hb.MASS_SILENCE) == []
    lag = [e for e in events if e.type in (hb.PIPELINE_LAG, hb.PIPELINE_CAUGHT_UP)]
    assert [e.type for e in lag] == [hb.PIPELINE_LAG, hb.PIPELINE_CAUGHT_UP]
    # the ids name the partitions the worker judges (every partition here: it is the only worker)
    owned = "-".join(map(str, range(settings.topic_partitions)))
    assert [e.event_id for e in lag] == [
        f"lag:{owned}:{lag[0].detected_at_ms}",
        f"lag:{owned}:{lag[1].detected_at_ms}:cleared",
    ]


async def test_a_redis_restart_stalls_only_an_agent_that_died_meanwhile(pipeline_settings: Settings, tmp_path) -> None:
    """Valkey down for 4 s under a fleet: nothing is stored, the bridge cannot read, the pipeline clock
    stands still, then jumps. The clients are back within their pushback: no stall, no mass silence, and the
    outage shows as `pipeline_lag`. The control: an agent killed during the outage is stalled."""
    port = services.free_port()
    valkey = procs.valkey(port, tmp_path / "valkey")
    settings = dataclasses.replace(pipeline_settings, redis_url=f"redis://127.0.0.1:{port}", stall_timeout=2.0)
    try:
        async with running_pipeline(settings, tmp_path):
            fleet = Fleet(settings.grpc_addr, [f"v{i:02d}" for i in range(40)], interval=0.2, jitter=0.3)
            await fleet.start()
            await asyncio.sleep(3)
            procs.stop(valkey, signal.SIGKILL)
            await asyncio.sleep(1)
            await fleet.kill("v39")
            await asyncio.sleep(3)
            valkey = procs.valkey(port, tmp_path / "valkey")
            await asyncio.sleep(settings.stall_timeout + 4)
            await fleet.stop()
            events = await events_now(settings)
    finally:
        procs.stop(valkey)
    assert not fleet.errors
    assert [e.agent_id for e in of_type(events, hb.STALL)] == ["v39"] and of_type(events, hb.MASS_SILENCE) == []
    kinds = [e.type for e in events if e.type in (hb.PIPELINE_LAG, hb.PIPELINE_CAUGHT_UP)]
    assert kinds == [hb.PIPELINE_LAG, hb.PIPELINE_CAUGHT_UP]


async def test_cutting_off_most_of_a_partition_is_one_mass_silence(pipeline_settings: Settings, tmp_path) -> None:
    settings = dataclasses.replace(pipeline_settings, topic_partitions=1, stream_shards=1, stall_timeout=2.0)
    async with running_pipeline(settings, tmp_path):
        agents = [f"m{i:03d}" for i in range(200)]
        fleet = Fleet(settings.grpc_addr, agents, interval=0.2, jitter=0.5)
        await fleet.start()
        await asyncio.sleep(3)
        await asyncio.gather(*(fleet.kill(agent) for agent in agents[:160]))
        await asyncio.sleep(settings.stall_timeout + 2)
        await fleet.stop()
        events = await events_now(settings)
    assert of_type(events, hb.STALL) == [], "a mass silence must not become individual stalls"
    mass = of_type(events, hb.MASS_SILENCE)
    assert len(mass) == 1 and sorted(mass[0].agent_ids) == agents[:160]


async def test_worker_killed_mid_run_loses_and_repeats_no_event(pipeline_settings: Settings, tmp_path) -> None:
    settings = dataclasses.replace(pipeline_settings, stall_timeout=2.0, recovery_beats=2)
    async with running_pipeline(settings, tmp_path, workers=2) as pipeline:
        agents = [f"w{i:02d}" for i in range(40)]
        fleet = Fleet(settings.grpc_addr, agents, interval=0.2, jitter=0.3)
        await fleet.start()
        await asyncio.sleep(3)
        victims = agents[::4]  # spread over every partition
        for agent in victims:
            await fleet.kill(agent)
            await asyncio.sleep(0.15)
        await asyncio.sleep(1.0)
        procs.stop(pipeline.workers[0], signal.SIGKILL)  # mid-run: some stalls emitted, some not yet
        # the survivor takes over after the session timeout (10 s) and a group join, then replays
        await asyncio.sleep(settings.stall_timeout + 20)
        for agent in victims:
            await fleet.revive(agent)
        await asyncio.sleep(4)
        await fleet.stop()
        events = await events_now(settings, wait=2)
    stalls = of_type(events, hb.STALL)
    recoveries = of_type(events, hb.RECOVERY)
    assert sorted(e.agent_id for e in stalls) == sorted(victims), "an event was lost or repeated"
    assert sorted(e.agent_id for e in recoveries) == sorted(victims)
    assert len({e.event_id for e in stalls}) == len(stalls)


async def test_a_successor_does_not_send_again_a_stall_its_predecessor_sent(
    pipeline_settings: Settings, tmp_path
) -> None:
    """A worker sends a record's events before the snapshot that records them; killed in between, its
    successor restores the older snapshot and judges the same episode again, with the same event id.
    Staged exactly (the real window is a produce request wide): the worker is killed while every agent is
    alive, two agents die, and one's stall is put on `agent-events` as the dead worker would have sent it
    (its id: the agent and its last receive time). The successor sends the other's stall (the positive
    control) and not that one again."""
    settings = dataclasses.replace(pipeline_settings, stall_timeout=2.0)
    names = Names.of(settings)
    async with running_pipeline(settings, tmp_path) as pipeline:
        fleet = Fleet(settings.grpc_addr, [f"s{i:02d}" for i in range(40)], interval=0.2, jitter=0.3)
        await fleet.start()
        await asyncio.sleep(3)
        worker = pipeline.workers.pop()
        procs.stop(worker, signal.SIGKILL)
        await fleet.kill("s01")
        await fleet.kill("s02")
        await asyncio.sleep(0.5)  # a beat in flight lands
        redis = redis_client.connect(settings)
        raw = await redis.hget(names.latest(partition_of("s01", settings.stream_shards)), "s01")
        await redis.aclose()
        last_seen = RegistryEntry.decode("s01", raw).last_seen_ms
        staged = hb.AgentEvent(
            type=hb.STALL,
            agent_id="s01",
            reason="silent",
            last_seen_ms=last_seen,
            event_id=f"s01:{last_seen}:stall",
            partition=partition_of("s01", settings.topic_partitions),
            figures={"staged": 1.0},
        )
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(names.events_topic, staged.SerializeToString(), key=b"s01")
        finally:
            await producer.stop()
        await pipeline.add_worker()  # after the dead one's session timeout (10 s)

        def judged(events: list[hb.AgentEvent]) -> bool:
            return any(e.agent_id == "s02" for e in of_type(events, hb.STALL))

        await read_events(settings.kafka_bootstrap, names.events_topic, judged, timeout=30)
        await asyncio.sleep(2)
        await fleet.stop()
        events = await events_now(settings)
    stalls = of_type(events, hb.STALL)
    assert sorted(e.agent_id for e in stalls) == ["s01", "s02"], "s02 stalled once, s01 only by the staged event"
    assert [e.figures["staged"] for e in stalls if e.agent_id == "s01"] == [1.0]
    log = (tmp_path / "worker0.log").read_text()
    assert "not sent again: the previous owner sent it" in log and staged.event_id in log


async def test_workers_joining_and_leaving_stall_nobody(pipeline_settings: Settings, tmp_path) -> None:
    """Every rebalance hands partitions over mid-window (faust seeks back, may deliver records from before
    the seek, discards what it had fetched): no agent of a steadily beating fleet is ever stalled. Positive
    control: one agent killed at the last rebalance is stalled exactly once."""
    settings = dataclasses.replace(pipeline_settings, stall_timeout=2.0, window_size=2.0)
    async with running_pipeline(settings, tmp_path) as pipeline:
        fleet = Fleet(settings.grpc_addr, [f"r{i:02d}" for i in range(40)], interval=0.2, jitter=0.3)
        await fleet.start()
        await asyncio.sleep(3)
        for leave in (signal.SIGTERM, signal.SIGKILL, signal.SIGTERM):
            worker = await pipeline.add_worker()
            await asyncio.sleep(2)
            procs.stop(worker, leave)
            pipeline.workers.remove(worker)
            if leave == signal.SIGKILL:
                await fleet.kill("r39")  # the control: dies while its partition may be changing hands
            # a killed worker's partitions move after the session timeout (10 s)
            await asyncio.sleep(14 if leave == signal.SIGKILL else 3)
        await fleet.stop()
        events = await events_now(settings)
    assert not fleet.errors
    assert [e.agent_id for e in of_type(events, hb.STALL)] == ["r39"] and of_type(events, hb.MASS_SILENCE) == []
