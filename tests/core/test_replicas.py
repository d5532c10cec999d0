"""`hbreg up --replicas`: two of every process, one of each killed mid-run; nothing acknowledged is lost and
no stall event or reassignment repeats (real Valkey, Kafka, Alertmanager and processes)."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import time

import grpc
import pytest

from heartbeat_registry.beats import now_ms
from heartbeat_registry.pb import hb, hb_grpc
from tests.core.test_up import up_env_on
from tests.kafka_helpers import columns, read_events, read_records

pytestmark = pytest.mark.kafka

REPLICATED = ("ingest", "bridge", "worker", "query", "reassign", "alerter")
AGENTS = 40
KILLED_AGENTS = 5  # agents that stop beating (the positive control: each must stall once, and only once)


class Fleet:
    """Agents beating every 0.5 s with unary calls over two connections (so both ingest replicas serve);
    a call that fails is retried on the other connection. Records every acknowledged (agent, seq)."""

    def __init__(self, addr: str) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.aio.insecure_channel(addr, options=options) for _ in range(2)]
        self.stubs = [hb_grpc.HeartbeatServiceStub(c) for c in self.channels]
        self.acked: set[tuple[str, int]] = set()
        self.failures = 0
        self.silenced: set[str] = set()

    async def agent(self, n: int, stop: asyncio.Event) -> None:
        agent = f"rep-{n:03d}"
        seq = 0
        await asyncio.sleep(random.random() * 0.5)
        while not stop.is_set() and agent not in self.silenced:
            seq += 1
            beat = hb.Heartbeat(
                agent_id=agent, task_id=f"task-{n:03d}", status=hb.RUNNING, timestamp=now_ms(), cpu_util=0.5, seq=seq
            )
            for attempt in range(20):
                try:
                    await self.stubs[(n + attempt) % 2].Beat(beat, timeout=2)
                    self.acked.add((agent, seq))
                    break
                except grpc.aio.AioRpcError:
                    self.failures += 1
                    await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def test_two_replicas_of_every_process_survive_killing_one_of_each(
    tmp_path, valkey_url: str, kafka_bootstrap: str, prefix: str
) -> None:
    env = up_env_on(
        tmp_path,
        valkey_url,
        kafka_bootstrap,
        prefix,
        HBREG_TOPIC_PARTITIONS="4",
        HBREG_STREAM_SHARDS="4",
        HBREG_STALL_TIMEOUT="2",
        HBREG_AUTH="off",
        HBREG_ASSIGNER="off",  # orphaned tasks stay orphaned: any second reassignment would be a duplicate
    )
    state_file = tmp_path / "state" / "state.json"
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115 - closed after the process ends
    replicas = ",".join(f"{name}=2" for name in REPLICATED)
    up = subprocess.Popen(
        [sys.executable, "-m", "heartbeat_registry", "up", "--replicas", replicas],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    stop = asyncio.Event()
    fleet = Fleet(env["HBREG_GRPC_ADDR"])
    agents: list[asyncio.Task] = []
    try:
        started = time.monotonic()
        while not state_file.exists():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() - started < 90, "hbreg up took more than 90 s"
            await asyncio.sleep(0.2)
        state = json.loads(state_file.read_text())
        assert {f"{name}.{i}" for name in REPLICATED for i in (1, 2)} <= set(state["processes"])
        assert state["replicas"] == {**{n: 2 for n in REPLICATED}, "assigner": 1}

        agents = [asyncio.create_task(fleet.agent(n, stop)) for n in range(AGENTS)]
        await asyncio.sleep(10)  # the workers' group settles, every agent is known
        for name in REPLICATED:
            os.kill(state["processes"][f"{name}.1"], signal.SIGKILL)
        await asyncio.sleep(20)  # rebalances, lease take-over, restarts
        fleet.silenced = {f"rep-{n:03d}" for n in range(KILLED_AGENTS)}
        silenced_at = now_ms()

        events_topic = prefix + "-agent-events"

        def all_stalled(events: list[hb.AgentEvent]) -> bool:
            return {e.agent_id for e in events if e.type == hb.STALL} >= fleet.silenced

        events = await read_events(kafka_bootstrap, events_topic, all_stalled, timeout=60)
        await asyncio.sleep(5)  # a repeated event or a false stall would come now
        events = await read_events(kafka_bootstrap, events_topic, lambda _: False, timeout=1)
        reassignments = [
            hb.Reassignment.FromString(r.value)
            for r in await read_records(
                kafka_bootstrap, prefix + "-task-reassignments", lambda rs: len(rs) >= KILLED_AGENTS, timeout=30
            )
        ]
        restarted = json.loads(state_file.read_text())["processes"]
    finally:
        stop.set()
        await asyncio.gather(*agents, return_exceptions=True)
        await fleet.close()
        up.send_signal(signal.SIGTERM)
        try:
            code = up.wait(60)
        finally:
            log.close()
    output = (tmp_path / "up.log").read_text()
    assert code == 0, output[-3000:]
    for name in REPLICATED:
        assert f"{name}.1 exited with code -9; restarting it" in output
        assert restarted[f"{name}.1"] != state["processes"][f"{name}.1"]

    stalls = [e for e in events if e.type == hb.STALL]
    assert sorted(e.agent_id for e in stalls) == sorted(fleet.silenced), "a false stall, or a silenced agent missed"
    assert all(e.detected_at_ms >= silenced_at for e in stalls)
    ids = [e.event_id for e in events]
    assert len(ids) == len(set(ids)), "an event was emitted twice"
    per_task = collections.Counter(r.task_id for r in reassignments)
    assert set(per_task) == {f"task-{n:03d}" for n in range(KILLED_AGENTS)}
    assert set(per_task.values()) == {1}, f"a task was reassigned twice: {per_task}"

    delivered = {
        (agent, seq)
        for cols in columns(await read_records(kafka_bootstrap, prefix + "-heartbeats", lambda _: False, timeout=5))
        for agent, seq in zip(cols.agent_id, cols.seq, strict=True)
    }
    lost = fleet.acked - delivered
    assert fleet.acked and not lost, f"{len(lost)} acknowledged heartbeats never reached Kafka"
