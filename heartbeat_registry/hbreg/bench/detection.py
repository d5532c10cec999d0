"""`hbreg bench detection`: detection accuracy against the real pipeline.

A fleet (default 1,000 agents, one beat a second with +-30% jitter) runs through the ingest, the bridge,
Kafka and one faust worker (stall timeout 3 s) while the benchmark injects, on a schedule it records:
- kills: an agent falls silent (and returns later): it must get exactly one `silent` stall;
- pauses shorter than the timeout (half of it): they must get none;
- hung tasks: RUNNING with CPU 0: each must get one `hung` stall;
- one pipeline pause: the bridge is stopped (SIGSTOP) for twice the timeout: nobody may be stalled for it.
It prints `false_positives` (stalls nobody earned, or repeated), `false_negatives` (kills or hung tasks
without their stall) and `delay_p50_ms` / `delay_p99_ms`: stall event time (the worker's wall clock when
it sent the event) minus the deadline (last beat + timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import signal
import time
from typing import Any

from heartbeat_registry.core.events import EventReader
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
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

TIMEOUT_S = 3.0
WINDOW_S = 5.0
INTERVAL_S = 1.0
HUNG_AGENTS = 10


@dataclasses.dataclass
class Truth:
    kills: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # agent -> last beat before each kill
    paused: list[str] = dataclasses.field(default_factory=list)
    hung: list[str] = dataclasses.field(default_factory=list)


async def scenario(settings: Settings, agents: int, duration: float, bridge: Any) -> Truth:
    rng = random.Random(42)
    names = [f"fleet-{i:04d}" for i in range(agents)]
    truth = Truth(hung=names[:HUNG_AGENTS])
    candidates = names[HUNG_AGENTS:]
    rng.shuffle(candidates)
    fleet = Fleet(settings.grpc_addr, names, interval=INTERVAL_S, jitter=0.3, seed=7)
    await fleet.start()
    await asyncio.sleep(12)  # every agent has a beat history for phi
    for agent in truth.hung:
        fleet.agents[agent].report(cpu=0.0)
    begin = time.monotonic()
    pause_at = duration / 2
    paused_pipeline = False
    revive: list[tuple[float, str]] = []
    while (elapsed := time.monotonic() - begin) < duration:
        if not paused_pipeline and elapsed >= pause_at:
            paused_pipeline = True
            bridge.send_signal(signal.SIGSTOP)
            await asyncio.sleep(2 * TIMEOUT_S)
            bridge.send_signal(signal.SIGCONT)
            continue
        # no new kills around the pipeline pause: their stalls would be late by the pause itself
        quiet = pause_at - 2 * TIMEOUT_S <= elapsed <= pause_at + 4 * TIMEOUT_S
        if not quiet and candidates:
            agent = candidates.pop()
            if rng.random() < 0.5:
                truth.kills.setdefault(agent, []).append(await fleet.kill(agent))
                revive.append((time.monotonic() + TIMEOUT_S + 3 + rng.uniform(0, 2), agent))
            else:
                truth.paused.append(agent)
                fleet.pause(agent, 0.5 * TIMEOUT_S)
        now = time.monotonic()
        for item in [r for r in revive if r[0] <= now]:
            await fleet.revive(item[1])
            revive.remove(item)
        await asyncio.sleep(0.5)
    for at, agent in sorted(revive):  # every kill stays silent past its deadline
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        await fleet.revive(agent)
    await asyncio.sleep(WINDOW_S + 5)  # the last windows close, the last returns recover
    await fleet.stop()  # STOPPING: the silence after the run is no stall
    return truth


async def read_events(settings: Settings) -> list[hb.AgentEvent]:
    assert settings.kafka_bootstrap is not None
    async with EventReader(settings.kafka_bootstrap, Names.of(settings).events_topic) as reader:
        await reader.seek()
        return await reader.history()


def score(truth: Truth, events: list[hb.AgentEvent], timeout_ms: int) -> dict[str, Any]:
    """Match stall events to the injected faults; everything unmatched is a false positive."""
    open_kills = {a: sorted(ls) for a, ls in truth.kills.items()}
    hung_left = set(truth.hung)
    false_positives = 0
    delays = []
    for event in (e for e in events if e.type == hb.STALL):
        kills = open_kills.get(event.agent_id, [])
        # the beat in flight when the agent was killed may still land: up to one interval later
        match = next((last for last in kills if last <= event.last_seen_ms <= last + 1500), None)
        if event.reason == "silent" and match is not None:
            kills.remove(match)
            delays.append((event.emitted_at_ms - (event.last_seen_ms + timeout_ms)) / 1000)
        elif event.reason == "hung" and event.agent_id in hung_left:
            hung_left.discard(event.agent_id)
        else:
            false_positives += 1
    summary = latency_summary(delays)
    return {
        "false_positives": false_positives,
        "false_negatives": sum(len(ls) for ls in open_kills.values()) + len(hung_left),
        "delay_p50_ms": summary["p50_ms"],
        "delay_p99_ms": summary["p99_ms"],
        "delay_max_ms": round(max(delays) * 1000, 1) if delays else 0.0,
        "kills": sum(len(ls) for ls in truth.kills.values()),
        "pauses": len(truth.paused),
        "hung": len(truth.hung),
        "pipeline_pauses": 1,
        "pipeline_lag_events": sum(1 for e in events if e.type == hb.PIPELINE_LAG),
        "mass_silence_events": sum(1 for e in events if e.type == hb.MASS_SILENCE),
        "recoveries": sum(1 for e in events if e.type == hb.RECOVERY),
    }


def run(agents: int, duration: float, redis_url: str | None, kafka_bootstrap: str | None) -> dict[str, Any]:
    with workdir() as tmp, contextlib.ExitStack() as stack:
        settings = isolated(
            base_settings(stack, tmp, redis_url, kafka_bootstrap),
            "d",
            stall_timeout=TIMEOUT_S,
            window_size=WINDOW_S,
            hung_cpu=0.05,
            lag_alert=TIMEOUT_S / 2,
        )
        running = {c: stack.enter_context(service(settings, c, tmp)) for c in ("ingest", "bridge", "worker")}
        host, _, port = settings.grpc_addr.rpartition(":")
        services.wait_port(host, int(port), 60, "ingest")
        wait_worker(settings.worker_web_addr)
        truth = asyncio.run(scenario(settings, agents, duration, running["bridge"]))
        events = asyncio.run(read_events(settings))
        return {
            "machine": {"cpus": os.cpu_count()},
            "agents": agents,
            "duration_s": duration,
            "timeout_s": TIMEOUT_S,
            **score(truth, events, int(TIMEOUT_S * 1000)),
        }
