"""`hbreg bench scale`: a large fleet end to end through host relays, for minutes, on this machine.

The fleet (default 100,000 agents at one beat every 10 s) beats through `Relay` cores (one per simulated
host, `--relays`, in the benchmark's process): each agent's call is answered by its host's relay, which
sends the ingest one BeatBatch per flush, as `hbreg relay` does on a real host. The per-agent gRPC call to
the relay is not simulated: on a real fleet it is paid on the agents' own hosts, not here. Everything
central runs as real processes: Valkey, Kafka, the ingest, the bridge, a faust worker and the
reassignment sink.

A sample of agents (`--kills`) falls silent at random times; each must get exactly one stall event, within
the stall timeout (3 intervals) + 0.5 s of its last heartbeat. Every other stall is false. It prints:
`sent`, `accepted`, `refused` (by status code), `false_stalls`, `missed_stalls`,
`detection_delay_p99_ms`, the relays' round trip (`relay_rtt_ms`), `rss_mb` (per process, at the start
of the measured period and at its end; `rss_mb_every_60s` in between) and `cpu_s_per_1k_hb` (CPU seconds
each process spent per 1,000 heartbeats), plus Redis bytes per agent and per retained heartbeat and Kafka
bytes per heartbeat: the figures docs/scaling.md sizes deployments from.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import pathlib
import random
import time
from typing import Any

import psutil

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core import redis_client
from heartbeat_registry.core.events import EventReader
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.hbreg import services
from heartbeat_registry.hbreg.bench.common import (
    embedded_kafka,
    embedded_valkey,
    isolated,
    latency_summary,
    service,
    wait_worker,
    workdir,
)
from heartbeat_registry.pb import hb
from heartbeat_registry.relay import Relay, RelayRefused

TICK_S = 0.01
AGENTS_PER_RELAY = 10_000
RELAY_FLUSH_S = 0.01
SLACK_MS = 500  # the allowance past the stall timeout
RETENTION_S = 300.0
WINDOW_INTERVALS = 6  # beats per window row
SERIES_S = 60.0  # RSS is sampled this often during the measured period


class Fleet:
    """Agents on a fixed phase within the interval (agent i at i/agents of it), each beating through its
    host's relay. Records what was sent, acknowledged and refused, and each agent's last acknowledged
    receive time (a silenced agent's stall is measured from it)."""

    def __init__(self, agents: int, interval: float, relays: list[Relay]) -> None:
        self.ids = [f"scale-{i:06d}" for i in range(agents)]
        self.interval = interval
        self.relays = relays
        self.slots = max(1, int(interval / TICK_S))
        self.buckets: list[list[int]] = [[] for _ in range(self.slots)]
        for i in range(agents):
            self.buckets[i * self.slots // agents].append(i)
        self.seq = [0] * agents
        self.last_received = [0] * agents
        self.silenced: dict[int, int] = {}  # agent index -> wall ms when it fell silent
        self.sent = 0
        self.accepted = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self.rtt_s: list[float] = []

    async def beat(self, i: int) -> None:
        self.seq[i] += 1
        beat = hb.Heartbeat(
            agent_id=self.ids[i],
            task_id=f"task-{i:06d}",
            status=hb.RUNNING,
            timestamp=now_ms(),
            cpu_util=0.3,
            seq=self.seq[i],
        )
        self.sent += 1
        started = time.monotonic()
        try:
            reply = await self.relays[i % len(self.relays)].submit(beat)
        except RelayRefused as exc:
            self.refused[exc.code.name] += 1
            return
        self.accepted += 1
        self.last_received[i] = reply.received_ms
        if len(self.rtt_s) < 2_000_000:
            self.rtt_s.append(time.monotonic() - started)

    async def run(self, until: float, kills: list[tuple[float, int]]) -> None:
        """Beat on schedule until the monotonic time `until`, silencing agents at their kill times."""
        kills = sorted(kills)
        pending: set[asyncio.Task[None]] = set()
        begin = time.monotonic()
        tick = 0
        while (now := time.monotonic()) < until:
            while kills and kills[0][0] <= now:
                self.silenced[kills.pop(0)[1]] = now_ms()
            for i in self.buckets[tick % self.slots]:
                if i not in self.silenced:
                    task = asyncio.create_task(self.beat(i))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
            tick += 1
            await asyncio.sleep(max(0.0, begin + tick * TICK_S - time.monotonic()))
        await asyncio.gather(*pending)


class Sampler:
    """RSS and CPU time of the central processes, at the start of the measured period and at its end, and
    RSS every SERIES_S in between: whether memory levels off once retention is reached shows only there."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.start: dict[str, tuple[float, float]] = {}
        self.end: dict[str, tuple[float, float]] = {}
        self.series: dict[str, list[float]] = collections.defaultdict(list)

    async def follow(self) -> None:
        """RSS every SERIES_S until cancelled (psutil reads /proc: quick, but not on the loop)."""
        while True:
            await asyncio.sleep(SERIES_S)
            for name, (rss, _) in (await asyncio.to_thread(self._sample)).items():
                self.series[name].append(round(rss, 1))

    def _sample(self) -> dict[str, tuple[float, float]]:
        out = {}
        for name, proc in self.procs.items():
            with contextlib.suppress(psutil.Error):
                # the ingest may be several processes under one parent; the load process's children are
                # the services themselves, counted on their own
                family = [proc] if proc.pid == os.getpid() else [proc, *proc.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in family) / 2**20
                cpu = sum(sum(p.cpu_times()[:2]) for p in family)
                out[name] = (rss, cpu)
        return out

    def mark_start(self) -> None:
        self.start = self._sample()

    def mark_end(self) -> None:
        self.end = self._sample()


def _kafka_bytes(data: pathlib.Path, topic: str) -> int:
    return sum(f.stat().st_size for d in (data / "kafka" / "logs").glob(f"{topic}-*") for f in d.glob("*.log"))


async def _events(settings: Settings) -> list[hb.AgentEvent]:
    assert settings.kafka_bootstrap is not None
    async with EventReader(settings.kafka_bootstrap, Names.of(settings).events_topic) as reader:
        await reader.seek()
        return await reader.history()


async def _drive(
    settings: Settings, agents: int, interval: float, duration: float, relays: int, kills: int, sampler: Sampler
) -> tuple[Fleet, dict[str, Any]]:
    cores = [Relay(settings.grpc_addr, flush=RELAY_FLUSH_S, max_batch=5000) for _ in range(relays)]
    for relay in cores:
        await relay.start()
    try:
        return await _measure(settings, agents, interval, duration, kills, sampler, cores)
    finally:  # also when SIGTERM cancels the run
        for relay in cores:
            await relay.close()


async def _measure(
    settings: Settings, agents: int, interval: float, duration: float, kills: int, sampler: Sampler, cores: list[Relay]
) -> tuple[Fleet, dict[str, Any]]:
    fleet = Fleet(agents, interval, cores)
    timeout = settings.stall_timeout
    begin = time.monotonic()
    end = begin + duration
    rng = random.Random(42)
    # silenced between four intervals in (every agent has a beat history) and the timeout before the end
    first, last = begin + 4 * interval, end - timeout - 10
    chosen = rng.sample(range(agents), min(kills, agents)) if last > first else []
    schedule = [(rng.uniform(first, last), i) for i in chosen]
    # measured from when every agent beat twice and the first windows closed: what grows after that grows
    warm = asyncio.create_task(asyncio.sleep(max(2 * interval, min(60.0, duration / 10))))
    run = asyncio.create_task(fleet.run(end, schedule))
    await warm
    sampler.mark_start()
    follow = asyncio.create_task(sampler.follow())
    client = redis_client.connect(settings)
    redis_start = (await client.info("memory"))["used_memory"]
    sent_start, started_ms = fleet.sent, now_ms()
    try:
        await run
    finally:
        follow.cancel()
    sampler.mark_end()
    measured = {
        "heartbeats": fleet.sent - sent_start,
        "seconds": (now_ms() - started_ms) / 1000,
        "redis_used_start": redis_start,
        "redis_used_end": (await client.info("memory"))["used_memory"],
    }
    names = Names.of(settings)
    for what, key_of in (("registry_bytes", names.latest), ("stream_bytes", names.stream)):
        measured[what] = sum([await client.memory_usage(key_of(s), samples=0) or 0 for s in range(names.shards)])
    rows = row_bytes = 0
    async for key in client.scan_iter(match=f"{names.key_prefix}:q:win:*", count=1000):
        rows += await client.hlen(key)
        row_bytes += await client.memory_usage(key, samples=0) or 0
    measured["window_rows"], measured["window_row_bytes"] = rows, row_bytes
    await client.aclose()
    return fleet, measured


def score(fleet: Fleet, events: list[hb.AgentEvent], timeout_s: float) -> dict[str, Any]:
    silenced = {fleet.ids[i]: i for i in fleet.silenced}
    stalls = [e for e in events if e.type == hb.STALL]
    stalled: collections.Counter[str] = collections.Counter(e.agent_id for e in stalls)
    delays = []
    for event in stalls:
        i = silenced.get(event.agent_id)
        if i is not None and stalled[event.agent_id] == 1:
            delays.append((event.emitted_at_ms - fleet.last_received[i]) / 1000)
    delay = latency_summary(delays)
    return {
        "silenced": len(silenced),
        "false_stalls": sum(n for agent, n in stalled.items() if agent not in silenced)
        + sum(n - 1 for agent, n in stalled.items() if agent in silenced and n > 1),
        "missed_stalls": sum(1 for agent in silenced if not stalled[agent]),
        "detection_delay_p50_ms": delay["p50_ms"],
        "detection_delay_p99_ms": delay["p99_ms"],
        "detection_delay_max_ms": round(max(delays) * 1000, 1) if delays else 0.0,
        "detection_delay_goal_ms": int(timeout_s * 1000) + SLACK_MS,
        "pipeline_lag_events": sum(1 for e in events if e.type == hb.PIPELINE_LAG),
        "mass_silence_events": sum(1 for e in events if e.type == hb.MASS_SILENCE),
    }


def run(
    agents: int,
    interval: float,
    duration: float,
    relays: int | None,
    kills: int,
) -> dict[str, Any]:
    relays = relays or max(1, math.ceil(agents / AGENTS_PER_RELAY))
    timeout = 3 * interval
    with workdir() as tmp, contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(embedded_valkey(tmp))
        kafka = stack.enter_context(embedded_kafka(tmp))
        base = Settings(redis_url=redis_url, kafka_bootstrap=kafka, state_dir=tmp / "state")
        settings = isolated(
            base,
            "s",
            stall_timeout=timeout,
            # a window per agent should hold several beats: at one beat every 10 s, 10 s windows would
            # write one row per heartbeat (the worker's and the query store's main cost at this scale)
            window_size=WINDOW_INTERVALS * interval,
            max_batch=5000,
            # retained for 5 minutes, so Redis reaches its steady size within a 10-minute run
            stream_retention=RETENTION_S,
            window_retention=RETENTION_S,
            reassign_rate=1000.0,
            reassign_burst=1000.0,
            assigner=False,
        )
        running = {
            c: stack.enter_context(service(settings, c, tmp)) for c in ("ingest", "bridge", "worker", "reassign")
        }
        host, _, port = settings.grpc_addr.rpartition(":")
        services.wait_port(host, int(port), 60, "ingest")
        wait_worker(settings.worker_web_addr)
        pids = {name: proc.pid for name, proc in running.items()}
        pids["valkey"] = _listener(int(redis_url.rpartition(":")[2]))
        pids["kafka"] = _listener(int(kafka.rpartition(":")[2]))
        pids["load (agents + relays)"] = os.getpid()
        sampler = Sampler(pids)
        fleet, measured = asyncio.run(_drive(settings, agents, interval, duration, relays, kills, sampler))
        time.sleep(2)  # the last events reach Kafka
        events = asyncio.run(_events(settings))
        heartbeats = measured["heartbeats"]
        rate = heartbeats / measured["seconds"]
        kafka_bytes = _kafka_bytes(tmp, Names.of(settings).heartbeats_topic)
        rtt = latency_summary(fleet.rtt_s)
        return {
            "machine": {"cpus": os.cpu_count()},
            "agents": agents,
            "interval_s": interval,
            "duration_s": duration,
            "relays": relays,
            "relay_flush_ms": RELAY_FLUSH_S * 1000,
            "stall_timeout_s": timeout,
            "retention_s": RETENTION_S,
            "window_s": WINDOW_INTERVALS * interval,
            "sent": fleet.sent,
            "accepted": fleet.accepted,
            "refused": dict(fleet.refused),
            "hb_per_s": round(rate, 1),
            **score(fleet, events, timeout),
            "relay_rtt_ms": rtt,
            "rss_mb": {
                name: {"start": round(sampler.start[name][0], 1), "end": round(sampler.end[name][0], 1)}
                for name in sampler.end
                if name in sampler.start
            },
            f"rss_mb_every_{SERIES_S:g}s": dict(sampler.series),
            "cpu_s_per_1k_hb": {
                name: round((sampler.end[name][1] - sampler.start[name][1]) / (heartbeats / 1000), 4)
                for name in sampler.end
                if name in sampler.start and heartbeats
            },
            "redis_bytes_per_agent": round(measured["registry_bytes"] / agents, 1),
            # the streams hold the last HBREG_STREAM_RETENTION of heartbeats (trimmed by MINID on every write)
            "redis_bytes_per_retained_heartbeat": round(
                measured["stream_bytes"] / max(1.0, rate * min(RETENTION_S, duration)), 1
            ),
            "redis_bytes_per_window_row": round(measured["window_row_bytes"] / max(1, measured["window_rows"]), 1),
            "redis_used_mb": {
                "start": round(measured["redis_used_start"] / 2**20, 1),
                "end": round(measured["redis_used_end"] / 2**20, 1),
            },
            "kafka_bytes_per_heartbeat": round(kafka_bytes / max(1, fleet.accepted), 1),
        }


def _listener(port: int) -> int:
    """The pid of the process listening on `port` (the embedded Valkey and Kafka)."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise RuntimeError(f"nothing listens on port {port}")
