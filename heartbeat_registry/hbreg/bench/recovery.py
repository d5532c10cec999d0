"""`hbreg bench recovery`: how fast stalled work gets moving again.

- `sink_reassignments_per_s`: one reassignment sink working off a backlog of stall events (distinct
  agents and tasks, rate limit out of the way), from its first committed Reassignment to the last.
- live, through the whole system (ingest, bridge, worker, reassignment sink, reference assigner as
  processes; agents on the client library, idle ones taking assignments): owners killed one by one, and
  - `stall_to_reassignment_p50_ms` / `_p99_ms`: the stall event's emission -> its Reassignment's;
  - `death_to_running_p50_ms` / `_p99_ms`: the owner's death -> the new owner's RUNNING beat made it the
    owner (the task's history).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
import urllib.request
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core.events import EventReader
from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.topics import ensure_topics, pipeline_topics, reassignment_topics
from heartbeat_registry.hbreg import services
from heartbeat_registry.hbreg.bench.common import (
    base_settings,
    isolated,
    latency_summary,
    service,
    wait_worker,
    workdir,
)
from heartbeat_registry.hbreg.simulate import Fleet
from heartbeat_registry.pb import hb

TIMEOUT_S = 2.0
OWNERS = 100
IDLE = 100


async def _committed_reassignments(settings: Settings, until: int, timeout: float) -> list[hb.Reassignment]:
    assert settings.kafka_bootstrap is not None
    consumer = AIOKafkaConsumer(
        Names.of(settings).reassignments_topic,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    found: list[hb.Reassignment] = []
    deadline = time.monotonic() + timeout
    try:
        while len(found) < until and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200, max_records=10_000)).values():
                found.extend(hb.Reassignment.FromString(r.value) for r in records)
    finally:
        await consumer.stop()
    return found


async def sink_rate(settings: Settings, stalls: int, log_dir: Any) -> float:
    assert settings.kafka_bootstrap is not None
    names = Names.of(settings)
    partitions = settings.topic_partitions
    await ensure_topics(
        settings.kafka_bootstrap, pipeline_topics(names, partitions) + reassignment_topics(names, partitions)
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=10)
    await producer.start()
    try:
        now = now_ms()
        sends = []
        for i in range(stalls):
            agent = f"b{i:06d}"
            event = hb.AgentEvent(
                type=hb.STALL,
                agent_id=agent,
                task_id=f"{agent}-task",
                reason="silent",
                last_seen_ms=now - 3000,
                detected_at_ms=now,
                emitted_at_ms=now,
                event_id=f"{agent}:{now - 3000}:stall",
            )
            sends.append(
                await producer.send(
                    names.events_topic,
                    event.SerializeToString(),
                    key=agent.encode(),
                    partition=partition_of(agent, partitions),
                )
            )
        await asyncio.gather(*sends)
    finally:
        await producer.stop()
    with service(settings, "reassign", log_dir):
        first = await _committed_reassignments(settings, 1, 120)
        assert first, "the sink published nothing"
        started = time.monotonic()
        found = await _committed_reassignments(settings, stalls, 600)
        took = time.monotonic() - started
    if len({r.task_id for r in found}) != stalls:
        raise RuntimeError(f"{stalls} stalls gave {len(found)} reassignments ({len({r.task_id for r in found})} tasks)")
    return stalls / took


def _task(settings: Settings, task: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{settings.http_addr}/api/tasks/{task}", timeout=10) as response:
        return dict(json.load(response))


async def live(settings: Settings, kills: int, log_dir: Any) -> dict[str, Any]:
    assert settings.kafka_bootstrap is not None
    with contextlib.ExitStack() as stack:
        for command in ("ingest", "bridge", "worker", "query", "reassign", "assigner"):
            stack.enter_context(service(settings, command, log_dir))
        for addr in (settings.grpc_addr, settings.http_addr, settings.reassign_metrics_addr):
            host, _, port = addr.rpartition(":")
            services.wait_port(host, int(port), 60, addr)
        await asyncio.to_thread(wait_worker, settings.worker_web_addr)
        agents = [f"o{i:03d}" for i in range(OWNERS)] + [f"i{i:03d}" for i in range(IDLE)]
        tasks = {a: (f"{a}-task" if a.startswith("o") else "") for a in agents}
        fleet = Fleet(settings.grpc_addr, agents, interval=0.5, jitter=0.2, seed=5, task_of=tasks.__getitem__)
        await fleet.start()
        died: dict[str, float] = {}
        try:
            await asyncio.sleep(8)
            rng = random.Random(9)
            for victim in rng.sample(agents[:OWNERS], kills):
                await fleet.kill(victim)
                died[tasks[victim]] = time.time() * 1000
                await asyncio.sleep(rng.uniform(0.1, 0.5))
            deadline = time.monotonic() + 60
            state: dict[str, dict[str, Any]] = {}
            while time.monotonic() < deadline:
                state = {t: await asyncio.to_thread(_task, settings, t) for t in died}
                if all(s["state"] == "running" and s["epoch"] >= 1 for s in state.values()):
                    break
                await asyncio.sleep(0.5)
        finally:
            await fleet.stop()
        reassigned = await _committed_reassignments(settings, kills, 10)
        async with EventReader(settings.kafka_bootstrap, Names.of(settings).events_topic) as reader:
            await reader.seek()
            stalls = {e.event_id: e for e in await reader.history() if e.type == hb.STALL}
    to_reassignment = [
        (r.emitted_at_ms - stalls[r.stall_event_id].emitted_at_ms) / 1000
        for r in reassigned
        if r.stall_event_id in stalls
    ]
    to_running = [
        (next(c["at_ms"] for c in s["history"] if c["what"] == "running" and c["epoch"] >= 1) - died[t]) / 1000
        for t, s in state.items()
        if s["state"] == "running" and s["epoch"] >= 1
    ]
    first, second = latency_summary(to_reassignment), latency_summary(to_running)
    return {
        "kills": kills,
        "tasks_running_again": len(to_running),
        "stall_to_reassignment_p50_ms": first["p50_ms"],
        "stall_to_reassignment_p99_ms": first["p99_ms"],
        "death_to_running_p50_ms": second["p50_ms"],
        "death_to_running_p99_ms": second["p99_ms"],
        "stall_timeout_s": TIMEOUT_S,
    }


def run(stalls: int, kills: int, redis_url: str | None, kafka_bootstrap: str | None) -> dict[str, Any]:
    with workdir() as tmp, contextlib.ExitStack() as stack:
        base = base_settings(stack, tmp, redis_url, kafka_bootstrap)
        results: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "backlog_stalls": stalls}
        fast = isolated(base, "r", reassign_rate=1e9, reassign_burst=1e9)
        results["sink_reassignments_per_s"] = round(asyncio.run(sink_rate(fast, stalls, tmp)), 1)
        live_settings = isolated(base, "v", stall_timeout=TIMEOUT_S, reassign_rate=1000.0, reassign_burst=1000.0)
        results.update(asyncio.run(live(live_settings, kills, tmp)))
        return results
