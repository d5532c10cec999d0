"""`hbreg chaos`: start everything, run the fleet and the schedule, collect the history, judge it.

The soak runs with HBREG_REDIS_DURABLE on (an acknowledged heartbeat is fsynced before its ack) and
keeps every stream entry and window row for the whole run, so each acknowledged heartbeat can be looked
up afterwards in Redis, in Kafka and in its window.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import logging
import pathlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core import redis_client
from heartbeat_registry.core.events import EventReader
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.topics import partition_count
from heartbeat_registry.hbreg.bench.common import isolated
from heartbeat_registry.hbreg.bench.common import workdir as bench_workdir
from heartbeat_registry.hbreg.chaos import faults as schedule
from heartbeat_registry.hbreg.chaos import verdict
from heartbeat_registry.hbreg.chaos.fleet import JITTER, AgentFaults, SoakFleet, agent_faults
from heartbeat_registry.hbreg.chaos.probes import Probes
from heartbeat_registry.hbreg.chaos.system import REPLICAS, System
from heartbeat_registry.pb import hb
from ingest.server import GC_THRESHOLDS

INTERVAL_S = 1.0
STALL_TIMEOUT_S = 5.0
GOALS = {
    "availability": 0.999,
    "max_recovery_s": 5.0,
    "acked_lost": 0,
    "false_stalls": 0,
    "missed_stalls": 0,
    "duplicate_events": 0,
    "duplicate_reassignments": 0,
    "lost_tasks": 0,
    "unfenced_overlaps": 0,
    "unresolved_alerts": 0,
    "unfired_alerts": 0,
}


def soak_settings(state_dir: pathlib.Path, duration_s: float) -> Settings:
    kept = duration_s + 900.0
    return isolated(
        Settings(state_dir=state_dir),
        "chaos",
        stall_timeout=STALL_TIMEOUT_S,
        redis_durable=True,
        stream_retention=kept,
        window_retention=kept,
        # a restarted Alertmanager learns the firing alerts within this (and the test's run stays short)
        alert_resend=5.0,
    )


async def inject(fault: schedule.Fault, system: System) -> None:
    fault.start_ms = now_ms()
    if fault.kind == "kill":
        await system.kill(fault.target)
    elif fault.kind == "pause":
        await system.pause(fault.target, fault.duration_s)
    elif fault.kind == "valkey_restart":
        await system.kill("valkey")  # SIGKILL: the append-only file is fsynced before every reply
    elif fault.kind == "kafka_restart":
        await system.kill("kafka", signal.SIGTERM)  # a broker's controlled restart
    else:
        await system.toxiproxy.inject(fault.target, fault.kind)
        await asyncio.sleep(fault.duration_s)
        await system.toxiproxy.heal(fault.target, fault.kind)
    fault.end_ms = now_ms()


async def _stored_beats(settings: Settings) -> tuple[dict[tuple[str, int], int], dict[str, list[tuple[int, str]]]]:
    """(agent, seq) of every heartbeat in the Redis streams -> the receive time of its first copy (an agent
    sends a beat again to the other ingest when the first did not answer: both may have stored it); task
    -> (receive time, agent) RUNNING on it."""
    client: Any = redis_client.connect(settings)
    seen: dict[tuple[str, int], int] = {}
    running: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    try:
        for stream in Names.of(settings).streams():
            after = "-"
            while entries := await client.xrange(stream, min=after, count=5000):
                for _, fields in entries:
                    cols = hb.HeartbeatColumns.FromString(fields[b"b"])
                    for agent, seq, received in zip(cols.agent_id, cols.seq, cols.received_ms, strict=True):
                        seen.setdefault((agent, seq), received)
                    for agent, task, status, at in zip(
                        cols.agent_id, cols.task_id, cols.status, cols.received_ms, strict=True
                    ):
                        if task and status == hb.RUNNING:
                            running[task].append((at, agent))
                after = "(" + entries[-1][0].decode()
    finally:
        await client.aclose()
    return seen, {task: sorted(beats) for task, beats in running.items()}


async def _topic(bootstrap: str, topic: str, decode: Callable[[bytes], Any], committed: bool = False) -> list[Any]:
    """Every record of `topic`, decoded (read_committed where `committed`)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed" if committed else "read_uncommitted",
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(await partition_count(bootstrap, topic))]
        if not partitions:
            return []
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        out: list[Any] = []

        async def behind() -> bool:
            return any([await consumer.position(tp) < end for tp, end in ends.items()])

        while await behind():
            for records in (await consumer.getmany(timeout_ms=1000, max_records=10000)).values():
                out.extend(decode(r.value) for r in records if r.value)
        return out
    finally:
        await consumer.stop()


def _kafka_beats(values: list[hb.HeartbeatColumns]) -> set[tuple[str, int]]:
    return {pair for cols in values for pair in zip(cols.agent_id, cols.seq, strict=True)}


async def _valkey_latency(settings: Settings) -> dict[str, dict[str, int]]:
    """Valkey's own latency monitor (`LATENCY LATEST`, since its last restart): the slowest fsync, fork,
    command... over the threshold system.py sets, to tell a stall of Redis from one of the ingest."""
    client: Any = redis_client.connect(settings)
    try:
        rows = await client.execute_command("LATENCY", "LATEST")
    finally:
        await client.aclose()
    return {
        (row[0].decode() if isinstance(row[0], bytes) else row[0]): {"last_ms": int(row[2]), "max_ms": int(row[3])}
        for row in rows
    }


async def _http(session: aiohttp.ClientSession, url: str) -> Any:
    for attempt in range(5):
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return await response.json()
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.5 * (attempt + 1))
    raise RuntimeError(f"GET {url} failed five times")


async def _windows(settings: Settings, agents: list[str], since_ms: int) -> dict[str, dict[int, dict]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        limit = asyncio.Semaphore(16)

        async def one(agent: str) -> tuple[str, dict[int, dict]]:
            async with limit:
                body = await _http(session, f"http://{settings.http_addr}/api/windows?agent={agent}&from={since_ms}")
            return agent, {row["window_start_ms"]: row for row in body["windows"]}

        return dict(await asyncio.gather(*(one(a) for a in agents)))


async def _tasks(settings: Settings, tasks: list[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(running tasks by id, the records of `tasks`)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        running = await _http(session, f"http://{settings.http_addr}/api/tasks?state=running&limit=100000")
        limit = asyncio.Semaphore(16)

        async def one(task: str) -> tuple[str, dict]:
            async with limit:
                return task, await _http(session, f"http://{settings.http_addr}/api/tasks/{task}")

        records = dict(await asyncio.gather(*(one(t) for t in tasks)))
    return {t["task_id"]: t for t in running["tasks"]}, records


async def _active_alerts(settings: Settings) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        found = await _http(session, f"{settings.alertmanager_url}/api/v2/alerts?active=true")
    return list(found)


@dataclasses.dataclass
class History:
    """Everything a soak recorded and collected, for `judge`."""

    fleet: SoakFleet
    troubles: AgentFaults
    plan: list[schedule.Fault]
    crashes: list[dict[str, Any]]
    window_ms: int
    events: list[hb.AgentEvent]
    alerts: list[dict[str, Any]]
    running: dict[str, dict]  # task -> its record, for the tasks running at the end
    tasks: dict[str, dict]  # task -> its record (history included), for every task the fleet started with
    windows: dict[str, dict[int, dict]]
    stored: dict[tuple[str, int], int]  # (agent, seq) -> receive time of its first stored copy
    running_beats: dict[str, list[tuple[int, str]]]
    kafka: set[tuple[str, int]]
    reassignments: list[hb.Reassignment]
    valkey_latency: dict[str, dict[str, int]]
    run_until: float  # monotonic: the end of the run (the fleet beats on while the history is collected)


async def soak(duration_s: float, agents: int, seed: int, workdir: pathlib.Path, say: Callable[[str], None]) -> History:
    settings = soak_settings(workdir / "state", duration_s)
    plan = schedule.plan(seed, duration_s, REPLICAS)
    system = System(settings, workdir)
    client_log = logging.getLogger("heartbeat_registry.client")
    say(f"hbreg chaos: seed {seed}, {len(plan)} faults over {duration_s:.0f} s, {agents} agents; starting")
    # SIGTERM cancels the soak where it waits, so the finally blocks stop the fleet and every process (a
    # Python-level handler's SystemExit can land in a gRPC callback of the fleet and be lost: it was)
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        await system.start()
        settings = system.settings
        assert settings.kafka_bootstrap is not None
        names = Names.of(settings)
        probes = Probes(system)
        fleet = SoakFleet(system.ingest_addrs, agents, INTERVAL_S, seed)
        client_log.addFilter(fleet.recorder.client_warning)  # failed calls kept per agent, not printed
        last_s = duration_s - schedule.COOLDOWN_S - 2 * STALL_TIMEOUT_S
        troubles = agent_faults(fleet.ids, list(fleet.tasks), seed, schedule.WARMUP_S / 2, last_s, STALL_TIMEOUT_S)
        recoveries: list[asyncio.Task[None]] = []
        started_ms = now_ms()
        started = time.monotonic()
        await fleet.start()
        # The fleet's objects live for the whole run: out of the collector's sight, as in the ingest (full
        # collections of this process had stopped the 2,000 agents' event loop for 11 s in 5 minutes).
        gc.freeze()
        agent_job = asyncio.create_task(fleet.run_faults(troubles, started))
        loop_timer = asyncio.create_task(fleet.recorder.time_loop())
        try:
            for fault in plan:
                await asyncio.sleep(max(0.0, started + fault.at_s - time.monotonic()))
                say(f"hbreg chaos: {time.monotonic() - started:6.1f} s  {fault.kind} {fault.target}")
                await inject(fault, system)
                recoveries.append(asyncio.create_task(_measure(probes, fault)))
            await asyncio.sleep(max(0.0, started + duration_s - time.monotonic()))
            await asyncio.gather(*recoveries)
            say("hbreg chaos: collecting the history")
            events = await _read_events(settings)
            alerts = await _active_alerts(settings)
            running, tasks = await _tasks(settings, list(fleet.tasks.values()))
            valkey_latency = await _valkey_latency(settings)
        finally:
            agent_job.cancel()
            loop_timer.cancel()
            client_log.removeFilter(fleet.recorder.client_warning)
            await fleet.stop()
            await probes.close()
        # the last windows close and are written (the pipeline clock goes on without the fleet)
        await asyncio.sleep(2 * settings.window_size + settings.window_grace + 5.0)
        windows = await _windows(settings, fleet.ids, started_ms)
        stored, running_beats = await _stored_beats(settings)
        kafka = _kafka_beats(
            await _topic(settings.kafka_bootstrap, names.heartbeats_topic, hb.HeartbeatColumns.FromString)
        )
        reassignments = await _topic(
            settings.kafka_bootstrap, names.reassignments_topic, hb.Reassignment.FromString, committed=True
        )
    finally:
        await system.stop()
    return History(
        fleet,
        troubles,
        plan,
        system.crashes,
        int(settings.window_size * 1000),
        events,
        alerts,
        running,
        tasks,
        windows,
        stored,
        running_beats,
        kafka,
        reassignments,
        valkey_latency,
        started + duration_s,
    )


async def _measure(probes: Probes, fault: schedule.Fault) -> None:
    fault.recovery_s = await probes.recovery(fault)


def judge(history: History, duration_s: float, seed: int) -> dict[str, Any]:
    fleet, troubles = history.fleet, history.troubles
    agents = {a: r for a, r in fleet.recorder.agents.items() if a in set(fleet.ids)}
    acked = verdict.acknowledged(agents)
    lost_redis = len(acked.difference(history.stored))
    lost_kafka = len(acked - history.kafka)
    lost_windows, windows_checked = verdict.window_losses(agents, history.windows, history.window_ms, history.stored)
    killed = set(troubles.killed)
    blame = verdict.blamer(history.plan)
    offset_ms = fleet.recorder.wall_offset * 1000
    detection = verdict.detection(history.events, set(fleet.ids), killed, set(troubles.hung), blame)
    verdict.beats_around(agents, detection["false_stall_details"], fleet.recorder)
    # every task runs at the end, and not on a killed agent
    lost_tasks = sorted(
        t for t in fleet.tasks.values() if t not in history.running or history.running[t].get("owner") in killed
    )
    overlaps = {
        task: found
        for task, record in history.tasks.items()
        if (found := verdict.two_unfenced_owners(history.running_beats.get(task, []), record.get("history", [])))
    }
    recoveries = [f.recovery_s for f in history.plan]
    available = verdict.availability(
        agents,
        INTERVAL_S,
        JITTER,
        lambda at: blame(int(at * 1000 + offset_ms)),
        fleet.recorder.wall_offset,
        history.run_until,
    )
    out: dict[str, Any] = {
        "seed": seed,
        "duration_s": duration_s,
        "agents": len(fleet.ids),
        "interval_s": INTERVAL_S,
        "stall_timeout_s": STALL_TIMEOUT_S,
        **available,
        "acked": len(acked),
        "acked_lost": lost_redis + lost_kafka + lost_windows,
        "acked_lost_by_stage": {"redis": lost_redis, "kafka": lost_kafka, "windows": lost_windows},
        "windows_checked": windows_checked,
        "unmatched_replies": fleet.recorder.unmatched,
        "failed_calls": verdict.failed_calls(agents, fleet.recorder.failures, blame),
        "fleet_loop_lag": verdict.loop_lag(fleet.recorder, history.run_until),
        **detection,
        "killed_agents": len(killed),
        "hung_agents": len(troubles.hung),
        "paused_agents": len(troubles.paused),
        "duplicate_reassignments": verdict.duplicate_reassignments(history.reassignments),
        "reassignments": len(history.reassignments),
        "reassignments_by_reason": verdict.reasons(history.reassignments),
        "lost_tasks": len(lost_tasks),
        "lost_task_ids": lost_tasks[:20],
        # what the registry says happened to them (owners, epochs, offers), to find the cause
        "lost_task_records": {t: history.tasks.get(t) for t in lost_tasks[:5]},
        "unfenced_overlaps": len(overlaps),
        **verdict.alerts(history.events, history.alerts),
        # each fault with the heartbeats missed under it
        "faults": [{**f.summary(), "missed": available["missed_by_fault"].get(f.label, 0)} for f in history.plan],
        "max_recovery_s": None
        if any(r is None for r in recoveries)
        else round(max((r for r in recoveries if r is not None), default=0.0), 2),
        "crashes": history.crashes,
        "valkey_latency": history.valkey_latency,
    }
    out["goals"] = GOALS
    out["failed_goals"] = failed_goals(out)
    return out


def failed_goals(result: dict[str, Any]) -> list[str]:
    failed = []
    for key, goal in GOALS.items():
        value = result.get(key)
        if key == "availability":
            ok = value is not None and value >= goal
        elif key == "max_recovery_s":
            ok = value is not None and value <= goal
        else:
            ok = value == goal
        if not ok:
            failed.append(f"{key}: {value} (goal {'>=' if key == 'availability' else '<='} {goal})")
    return failed


async def _read_events(settings: Settings) -> list[hb.AgentEvent]:
    async with EventReader(settings.kafka_bootstrap or "", Names.of(settings).events_topic) as reader:
        await reader.seek()
        return await reader.history()


def run(duration_s: float, agents: int, seed: int, keep: str | None = None) -> dict[str, Any]:
    """The soak, judged. Progress goes to stderr; the logs of every process stay in `keep` if given."""

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with contextlib.ExitStack() as stack:
        if keep:
            workdir = pathlib.Path(keep)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = stack.enter_context(bench_workdir())
        pauses: list[float] = []  # full collections of this process: the fleet's event loop stops meanwhile
        began = [0.0]

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if info["generation"] == 2:
                if phase == "start":
                    began[0] = time.perf_counter()
                else:
                    pauses.append(time.perf_counter() - began[0])

        gc.callbacks.append(on_gc)
        gc.set_threshold(*GC_THRESHOLDS)
        try:
            history = asyncio.run(soak(duration_s, agents, seed, workdir, say))
        except asyncio.CancelledError:
            say("hbreg chaos: stopped by SIGTERM; every process it started is stopped")
            sys.exit(143)
        finally:
            gc.callbacks.remove(on_gc)
        result = judge(history, duration_s, seed)
        result["fleet_full_gc"] = {
            "count": len(pauses),
            "total_s": round(sum(pauses), 2),
            "max_ms": round(max(pauses, default=0.0) * 1000, 1),
        }
        result["logs"] = str(workdir / "logs") if keep else keep_logs(result, workdir / "logs")
        return result


def keep_logs(result: dict[str, Any], logs: pathlib.Path) -> str | None:
    """A copy of every process's log, in a new temporary folder, when the run broke a promise other than
    availability (which this machine's cores bound): such a run is rare and its logs are all there is to
    find the cause by (a run whose pipeline stopped for good went without them). None otherwise; the
    data (Valkey's, Kafka's) goes with the working folder either way."""
    if all(goal.startswith("availability") for goal in result["failed_goals"]):
        return None
    kept = tempfile.mkdtemp(prefix="hbreg-chaos-logs-")
    shutil.copytree(logs, kept, dirs_exist_ok=True)
    return kept


def text(result: dict[str, Any]) -> str:
    """The result for a terminal: the figures, each fault's recovery, and the goals missed."""
    lines = [
        f"seed {result['seed']}, {result['duration_s']:.0f} s, {result['agents']} agents",
        f"availability           {result['availability']:.4%} of {result['heartbeats_due']} heartbeats due",
        f"acknowledged lost      {result['acked_lost']} {result['acked_lost_by_stage']}",
        f"false / missed stalls  {result['false_stalls']} / {result['missed_stalls']}",
        f"duplicate events       {result['duplicate_events']}",
        f"duplicate reassigns    {result['duplicate_reassignments']} of {result['reassignments']}",
        f"lost tasks             {result['lost_tasks']}",
        f"unfenced overlaps      {result['unfenced_overlaps']}",
        f"alerts unresolved      {result['unresolved_alerts']}, unfired {result['unfired_alerts']}",
        f"max recovery           {result['max_recovery_s']} s",
        "faults:",
        *(
            f"  {f['at_s']:7.1f} s  {f['kind']:<15} {f['target']:<16} recovery {f['recovery_s']} s"
            for f in result["faults"]
        ),
    ]
    if result["crashes"]:
        lines.append(f"crashes: {result['crashes']}")
    if result.get("logs"):
        lines.append(f"logs: {result['logs']}")
    lines.append(
        "goals: " + ("all met" if not result["failed_goals"] else "MISSED " + "; ".join(result["failed_goals"]))
    )
    return "\n".join(lines)
