"""What the dashboard is pushed, over one Server-Sent Events stream per page (`GET /api/stream`).

One broadcaster per query process reads the state every TICK_S and sends every page only what changed:
- `snapshot` (on connect): the agents (names once, then rows by index), the recent event log, the
  pipeline's health and the last hour of the timeline;
- `agents`: changed rows (and new agents); `events`: new entries of the event log (stalls, recoveries,
  mass silences, pipeline lag, reassignments and new owners, alerts raised and resolved, notifications
  Alertmanager delivered); `health` every few seconds; `timeline` every TIMELINE_S.
A page whose queue overflows (it reads too slowly) is dropped; it reconnects and gets a snapshot. The
state is always read from Redis and Kafka, never kept only here, so any query replica can serve any page.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from typing import Any

import orjson
from prometheus_client import Gauge, Histogram

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core.tasks import ASSIGNED, ORPHANED, RUNNING
from heartbeat_registry.core.views import STATES
from sinks.web.eventlog import EventLog
from sinks.web.pipeline_health import PipelineHealth
from sinks.web.queries import Query

log = logging.getLogger(__name__)
TICKS = Histogram(
    "hbreg_dashboard_tick_seconds",
    "Time to read the state and push the changes to the open pages",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
PAGES = Gauge("hbreg_dashboard_pages", "Dashboard pages connected to the live stream")
AGENTS = Gauge("hbreg_dashboard_agents", "Agents by state, as the dashboard's header counts them", ["state"])
TICK_S = 0.5
IDLE_TICK_S = 10.0  # with no page open: only the timeline is sampled
HEALTH_S = 2.0
TIMELINE_S = 10.0
TIMELINE_MS = 3600 * 1000
EVENTS_KEPT = 500
QUEUE = 64
# a row of the fleet table: agent index, state, status, task, epoch, cpu, last seen, phi, reason, since, progress
ROW_FIELDS = (
    "state",
    "status",
    "task_id",
    "epoch",
    "cpu_util",
    "last_seen_ms",
    "phi",
    "reason",
    "state_since_ms",
    "progress",
)


def _message(kind: str, body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps({"t": kind, **body}) + b"\n\n"


class Live:
    def __init__(self, query: Query, events: EventLog, health: PipelineHealth) -> None:
        self.query = query
        self.events = events
        self.health = health
        self.pages: set[asyncio.Queue[bytes]] = set()
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.rows: dict[str, tuple[Any, ...]] = {}
        self.log: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_KEPT)
        self.timeline: list[list[int]] = []
        self._events_seen = 0  # entries of the EventLog already turned into log items
        self._tasks: dict[str, tuple[str, str, int]] = {}  # task -> (state, owner, epoch)
        self._alerts: dict[str, bool] = {}  # alert key -> firing
        self._notified_ms = 0
        self._next_health = 0.0
        self._next_timeline = 0.0
        self._primed = False
        self._page_opened = asyncio.Event()
        self.tick_seconds: collections.deque[float] = collections.deque(maxlen=1000)  # recent, for benchmarks

    # --- pages --------------------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=QUEUE)
        self.pages.add(queue)
        self._page_opened.set()
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes]) -> None:
        self.pages.discard(queue)

    def snapshot(self) -> bytes:
        return _message(
            "snapshot",
            {
                "names": self.names,
                "rows": [[self.index[a], *row] for a, row in self.rows.items()],
                "fields": ROW_FIELDS,
                "events": list(self.log),
                "health": self.health.latest,
                "timeline": self.timeline,
                "orphaned": self.orphaned(),
                "states": STATES,
                "now": now_ms(),
            },
        )

    def orphaned(self, limit: int = 200) -> list[str]:
        return [task for task, (state, _, _) in self._tasks.items() if state == ORPHANED][:limit]

    def _send(self, kind: str, body: dict[str, Any]) -> None:
        message = _message(kind, body)
        for queue in list(self.pages):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:  # too slow: dropped; it reconnects and gets a snapshot
                self._end(queue)

    def close(self) -> None:
        """Ends every open stream, so that the server stops without waiting on them."""
        for queue in list(self.pages):
            self._end(queue)

    def _end(self, queue: asyncio.Queue[bytes]) -> None:
        self.pages.discard(queue)
        while not queue.empty():  # what it has not read yet is replaced by the snapshot on reconnect
            queue.get_nowait()
        queue.put_nowait(b"")  # tells its stream to end

    # --- the broadcaster ----------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.tick()
            except Exception as exc:  # Redis or Kafka away: the pages keep what they have
                log.warning("live update failed", extra={"error": repr(exc)})
            self.tick_seconds.append(time.monotonic() - started)
            TICKS.observe(self.tick_seconds[-1])
            PAGES.set(len(self.pages))
            pause = TICK_S if self.pages or not self._primed else IDLE_TICK_S
            self._page_opened.clear()
            # A page opening ends an idle pause at once. asyncio.timeout, not wait_for: on Python 3.11
            # wait_for swallows a cancel that comes as the page opens, and the loop never stopped.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, pause - (time.monotonic() - started))):
                    await self._page_opened.wait()

    async def tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_timeline or self.pages:
            await self._agents()
        items = self._new_events() + await self._task_changes() + await self._alert_changes()
        items.sort(key=lambda item: item["at"])
        if items:
            self.log.extend(items)
            if self._primed:
                self._send("events", {"items": items})
        if now >= self._next_health:
            self._next_health = now + HEALTH_S
            health = await self.health.read(await self.query.clocks())
            health["tune_report"] = bool(await self.query.redis.exists(self.query.names.tune_report))
            self._send("health", {"health": health, "orphaned": self.orphaned()})
        if now >= self._next_timeline:
            self._next_timeline = now + TIMELINE_S
            await self._timeline()
        self._primed = True

    async def _agents(self) -> None:
        epochs = {task: epoch for task, (_, _, epoch) in self._tasks.items()}
        changed, added = [], []
        seen = set()
        for agent in await self.query.agents():
            name = agent["agent_id"]
            seen.add(name)
            agent["epoch"] = epochs.get(agent["task_id"], 0) if agent["task_id"] else 0
            row = tuple(agent[f] for f in ROW_FIELDS)
            if self.rows.get(name) == row:
                continue
            if name not in self.index:
                self.index[name] = len(self.names)
                self.names.append(name)
                added.append([self.index[name], name])
            self.rows[name] = row
            changed.append([self.index[name], *row])
        gone = [self.index[a] for a in self.rows.keys() - seen]
        for name in self.rows.keys() - seen:
            del self.rows[name]
        if self._primed and (changed or gone):
            self._send("agents", {"added": added, "rows": changed, "gone": gone})

    def _new_events(self) -> list[dict[str, Any]]:
        """The event log's entries appended since the last call."""
        new = min(self.events.appended - self._events_seen, len(self.events.events))
        self._events_seen = self.events.appended
        fresh = list(self.events.events)[-new:] if new > 0 else []
        return [
            {
                "kind": e["type"],
                "at": e["detected_at_ms"],
                "agent": e["agent_id"],
                "task": e["task_id"],
                "reason": e["reason"],
                "figures": e["figures"],
                "agents": e["agent_ids"][:50],
                "count": len(e["agent_ids"]),
            }
            for e in fresh
        ]

    async def _task_changes(self) -> list[dict[str, Any]]:
        """Reassignments and new owners, from the task registry's state indexes."""
        store = self.query.tasks_store
        now: dict[str, tuple[str, str, int]] = {}
        items = []
        for state in (ORPHANED, ASSIGNED, RUNNING):
            for task_id, _ in await store.in_state(state, limit=5000):
                before = self._tasks.get(task_id)
                if before is not None and before[0] == state:
                    now[task_id] = before
                    continue
                record = await store.get(task_id)
                if record is None or record["state"] != state:
                    continue
                owner = record.get("assignee") or record["owner"] if state == ASSIGNED else record["owner"]
                now[task_id] = (state, owner, int(record["epoch"]))
                if self._primed or before is None:
                    kind = {ORPHANED: "reassigned", ASSIGNED: "assigned", RUNNING: "taken_over"}[state]
                    items.append(
                        {
                            "kind": kind,
                            "at": int(record["since"]),
                            "task": task_id,
                            "agent": owner,
                            "epoch": int(record["epoch"]),
                        }
                    )
        self._tasks = now
        return items if self._primed else [i for i in items if now_ms() - i["at"] < TIMELINE_MS]

    async def _alert_changes(self) -> list[dict[str, Any]]:
        """Alerts raised and resolved (what the alert sink tells Alertmanager), and the notifications
        Alertmanager delivered to our webhook."""
        items = []
        raw = await self.query.redis.hgetall(self.query.names.alerts)
        alerts = {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}
        for key, alert in alerts.items():
            firing = alert.get("resolved_ms") is None
            if self._alerts.get(key) != firing:
                at = alert["starts_ms"] if firing else alert["resolved_ms"]
                items.append(
                    {
                        "kind": "alert",
                        "at": at,
                        "alert": alert["labels"].get("alertname", ""),
                        "firing": firing,
                        "agent": alert["labels"].get("agent_id", ""),
                        "task": alert["labels"].get("task_id", ""),
                    }
                )
        self._alerts = {k: a.get("resolved_ms") is None for k, a in alerts.items()}
        for note in reversed(await self.query.notifications(20)):
            if note["received_ms"] > self._notified_ms:
                self._notified_ms = note["received_ms"]
                items.append(
                    {
                        "kind": "notified",
                        "at": note["received_ms"],
                        "status": note.get("status", ""),
                        "group": note.get("groupLabels", {}),
                        "count": len(note.get("alerts", [])),
                    }
                )
        return items

    async def _timeline(self) -> None:
        counts = collections.Counter(row[0] for row in self.rows.values())
        for state in STATES:
            AGENTS.labels(state).set(counts.get(state, 0))
        orphaned = sum(1 for state, _, _ in self._tasks.values() if state == ORPHANED)
        at = now_ms() // 10_000 * 10_000
        point = [at, *(counts.get(s, 0) for s in STATES), orphaned]
        key = self.query.names.query_timeline
        pipe = self.query.redis.pipeline(transaction=False)
        pipe.zadd(key, {json.dumps(point): at})
        pipe.zremrangebyscore(key, 0, at - TIMELINE_MS)
        pipe.zrange(key, 0, -1)
        *_, stored = await pipe.execute()
        by_time = {p[0]: p for p in (json.loads(m) for m in stored)}  # one point per 10 s, replicas agreeing
        self.timeline = [by_time[t] for t in sorted(by_time)]
        self._send("timeline", {"point": point})
