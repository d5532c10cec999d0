"""`hbreg tune`: what would detection have done, over a past period of this fleet, with other settings?

The retained heartbeats of the period (and a warm-up before it) are replayed partition by partition in
worker processes (one per core, each its share of the partitions), once per parameter set: the live
settings first, then the grid (`grid.py`). Each stall is labelled false or true from the agents' own
heartbeat counters (`replay.py`). The live settings' stalls are compared with the `stall` events the
workers actually emitted in the period (`agent-events`): the fidelity check.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import multiprocessing
import os
import queue
import statistics
import sys
import time
from typing import Any

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core import redis_client
from heartbeat_registry.core.events import EventReader
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.topics import partition_count
from heartbeat_registry.errors import ConfigError
from heartbeat_registry.hbreg.tune import grid, sources
from heartbeat_registry.hbreg.tune.replay import FALSE, TRUE, UNLABELLED, PartitionReplay, Stall
from heartbeat_registry.pb import hb
from processors.liveness import Rules, rules_of

PROGRESS_EVERY_S = 0.5


@dataclasses.dataclass(frozen=True)
class Period:
    from_ms: int
    to_ms: int
    warmup_ms: int
    label_ms: int  # heartbeats this long after the period still label its stalls


@dataclasses.dataclass
class Job:
    """One worker process's share: its partitions, read and replayed for every parameter set."""

    settings: Settings
    source: str
    partitions: list[int]
    extent: dict[int, tuple[int, int]]  # kafka: partition -> (first offset, end offset)
    period: Period
    rule_sets: list[Rules]


@dataclasses.dataclass
class Outcome:
    stalls: list[list[Stall]]  # per parameter set
    heartbeats: int
    agents: int
    folded: int  # heartbeats folded into each parameter set's states (warm-up included)
    busy_s: float  # from the first record to the last (not the process's start or its Kafka connection)


def replay_job(job: Job, progress: Any) -> Outcome:
    """In a worker process: read this share's records and replay them."""
    return asyncio.run(_replay(job, progress))


async def _replay(job: Job, progress: Any) -> Outcome:
    s, period = job.settings, job.period
    replays = {
        p: PartitionReplay(
            p,
            job.rule_sets,
            int(s.window_size * 1000),
            int(s.window_grace * 1000),
            period.from_ms,
            period.to_ms,
            period.to_ms + period.label_ms,
        )
        for p in job.partitions
    }
    finished: set[int] = set()
    folded, read, reported, last_report = 0, 0, 0, time.monotonic()
    if job.source == "kafka":
        assert s.kafka_bootstrap is not None
        records = sources.kafka_records(
            s.kafka_bootstrap, Names.of(s).heartbeats_topic, job.extent, finished.__contains__
        )
    else:
        records = sources.redis_records(
            s, job.partitions, period.from_ms - period.warmup_ms, period.to_ms + period.label_ms
        )
    first: float | None = None
    async for partition, cols in records:
        if first is None:
            first = time.monotonic()
        if partition in finished:
            continue
        if not replays[partition].feed(cols):
            finished.add(partition)
        folded += len(cols.agent_id)
        read += 1
        if time.monotonic() - last_report > PROGRESS_EVERY_S:
            progress.put(read - reported)
            reported, last_report = read, time.monotonic()
    progress.put(read - reported)
    stalls: list[list[Stall]] = [[] for _ in job.rule_sets]
    for replay in replays.values():
        for mine, theirs in zip(stalls, replay.finish(), strict=True):
            mine.extend(theirs)
    return Outcome(
        stalls,
        sum(r.heartbeats for r in replays.values()),
        sum(len(r.agents) for r in replays.values()),
        folded,
        time.monotonic() - first if first is not None else 0.0,
    )


def summary(params: dict[str, Any], stalls: list[Stall]) -> dict[str, Any]:
    labels = collections.Counter(s.label for s in stalls)
    delays = sorted(s.detected_at_ms - s.last_seen_ms for s in stalls if s.label == TRUE)
    return {
        "params": params,
        "stalls": len(stalls),
        "false_stalls": labels[FALSE],
        "true_stalls": labels[TRUE],
        "unlabelled": labels[UNLABELLED],
        "unresolved": sum(1 for s in stalls if s.unresolved),
        "delay_p50_ms": _quantile(delays, 0.50),
        "delay_p99_ms": _quantile(delays, 0.99),
        "by_reason": dict(collections.Counter(s.reason for s in stalls)),
    }


def _quantile(values: list[int], q: float) -> int | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return round(statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1])


async def live_stalls(settings: Settings, period: Period) -> dict[str, hb.AgentEvent]:
    """The stall events the workers emitted in the period, by event id."""
    assert settings.kafka_bootstrap is not None
    async with EventReader(settings.kafka_bootstrap, Names.of(settings).events_topic) as reader:
        if not await reader.seek(period.from_ms - 300_000, wait=False):
            return {}
        events = await reader.history()
    return {e.event_id: e for e in events if e.type == hb.STALL and period.from_ms <= e.detected_at_ms <= period.to_ms}


def fidelity(replayed: list[Stall], live: dict[str, hb.AgentEvent]) -> list[dict[str, Any]]:
    """What differs between the live settings' replay and the workers' own stall events."""
    mine = {s.event_id: s for s in replayed}
    out: list[dict[str, Any]] = []
    for event_id in sorted(mine.keys() - live.keys()):
        s = mine[event_id]
        out.append({"event_id": event_id, "agent_id": s.agent_id, "detected_at_ms": s.detected_at_ms, "in": "replay"})
    for event_id in sorted(live.keys() - mine.keys()):
        e = live[event_id]
        out.append({"event_id": event_id, "agent_id": e.agent_id, "detected_at_ms": e.detected_at_ms, "in": "live"})
    return out


async def _extent(settings: Settings, period: Period) -> tuple[list[int], dict[int, tuple[int, int]]]:
    assert settings.kafka_bootstrap is not None
    topic = Names.of(settings).heartbeats_topic
    count = await partition_count(settings.kafka_bootstrap, topic)
    if not count:
        raise ConfigError(f"no topic {topic!r} on {settings.kafka_bootstrap}: nothing was recorded there")
    partitions = list(range(count))
    return partitions, await sources.kafka_extent(
        settings.kafka_bootstrap, topic, partitions, period.from_ms - period.warmup_ms
    )


def tune(
    settings: Settings,
    period: Period,
    specs: list[str],
    source: str = "kafka",
    processes: int | None = None,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Replay the period for the live settings and every parameter set of the grid `specs`; the JSON."""
    sets = grid.parse(specs)
    settings.require("kafka_bootstrap", *(("redis_url",) if source == "redis" else ()))
    if period.to_ms <= period.from_ms:
        raise ConfigError(f"the period is empty: from {period.from_ms} to {period.to_ms}")
    if period.from_ms > now_ms():
        raise ConfigError("the period starts in the future")
    varied = list(dict.fromkeys(name for params in sets for name in params))
    live_params = {name: getattr(settings, name) for name in varied}
    sets = [params for params in sets if {**live_params, **params} != live_params]  # the live row stands for it
    all_settings = [settings] + [grid.settings_for(settings, params) for params in sets]
    rule_sets = [rules_of(s) for s in all_settings]
    partitions, extent = asyncio.run(_extent(settings, period))
    if source == "kafka":
        partitions = sorted(extent)
    total = sum(end - start for start, end in extent.values()) if source == "kafka" else None
    count = max(1, min(processes or os.cpu_count() or 1, len(partitions) or 1))
    shares = [partitions[i::count] for i in range(count)]
    jobs = [
        Job(settings, source, share, {p: extent[p] for p in share if p in extent}, period, rule_sets)
        for share in shares
        if share
    ]
    started = time.monotonic()
    outcomes = _run(jobs, total, sys.stderr.isatty() if show_progress is None else show_progress)
    seconds = time.monotonic() - started
    per_set: list[list[Stall]] = [[] for _ in rule_sets]
    for outcome in outcomes:
        for mine, theirs in zip(per_set, outcome.stalls, strict=True):
            mine.extend(theirs)
    live_events = asyncio.run(live_stalls(settings, period))
    differences = fidelity(per_set[0], live_events)
    folded = sum(o.folded for o in outcomes)
    busy = sum(o.busy_s for o in outcomes)
    live = summary(live_params, per_set[0]) | {
        "settings": grid.describe(settings),
        "live_events": len(live_events),
        "matches_live_events": not differences,
        "differences": differences[:200],
        "stall_list": [dataclasses.asdict(s) for s in sorted(per_set[0], key=lambda s: s.detected_at_ms)],
    }
    results = [summary(live_params, per_set[0]) | {"live": True}]
    results += [summary(params, stalls) | {"live": False} for params, stalls in zip(sets, per_set[1:], strict=True)]
    results.sort(key=lambda r: (r["false_stalls"], r["delay_p99_ms"] if r["delay_p99_ms"] is not None else 0))
    return {
        "heartbeats": sum(o.heartbeats for o in outcomes),
        "agents": sum(o.agents for o in outcomes),
        "period": {
            "from_ms": period.from_ms,
            "to_ms": period.to_ms,
            "warmup_s": period.warmup_ms / 1000,
            "source": source,
        },
        "live": live,
        "results": results,
        "replay": {
            "seconds": round(seconds, 2),
            "processes": len(jobs),
            "parameter_sets": len(rule_sets),
            "heartbeats_read": folded,
            # each process's replay, from its first record to its last, over the processes: one core each
            "heartbeats_per_s_per_set_per_core": round(folded * len(rule_sets) / busy) if busy > 0 else None,
        },
    }


def keep_report(settings: Settings, page: str) -> None:
    """The latest report, where the query API serves it (`/reports/tune`, linked from the dashboard)."""
    assert settings.redis_url is not None
    client = redis_client.connect_sync(settings)
    try:
        client.set(Names.of(settings).tune_report, page)
    finally:
        client.close()


def _run(jobs: list[Job], total: int | None, show_progress: bool) -> list[Outcome]:
    """The jobs in worker processes (spawned: no state of this process leaks into them), with a progress
    bar on a terminal."""
    if not jobs:
        return []
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, concurrent.futures.ProcessPoolExecutor(len(jobs), mp_context=context) as pool:
        progress = manager.Queue()
        futures = [pool.submit(replay_job, job, progress) for job in jobs]
        bar = None
        if show_progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit=" records", file=sys.stderr, leave=False)
        while not all(f.done() for f in futures):
            try:
                step = progress.get(timeout=0.2)
            except queue.Empty:
                continue
            if bar is not None:
                bar.update(step)
        if bar is not None:
            bar.close()
        return [f.result() for f in futures]
