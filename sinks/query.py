"""The query API (HTTP, JSON) over what the processors publish, across all workers' partitions.

- `GET /api/agents?state=S`: current state of every agent (`alive`, `suspect`, `stalled`, `recovered`, `left`)
- `GET /api/agents/{agent_id}`: its state and recent windows
- `GET /api/windows?agent=A&from=MS&to=MS&size=10s`: window rows; a size that is a multiple of the
  tumbling window (e.g. `60s`) gives hopping windows, merged from the tumbling ones
- `GET /api/events?type=stall&since=MS&agent=A&limit=N`: recent `agent-events`
- `GET /healthz`, `GET /metrics`

Liveness comes from the detector's published view, the freshest beat from the ingest's registry, and
phi is computed against the partition's own clock (watermark), as the detector does. Bad parameters get
400 naming the parameter; an unknown agent gets 404.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from heartbeat_registry import ops, registry
from heartbeat_registry.names import Names, partition_of
from heartbeat_registry.pb import hb
from heartbeat_registry.settings import PARSERS, Settings
from heartbeat_registry.shapes import EVENT_TYPES, STATES, agent_json, event_json, window_json
from processors.liveness import phi
from processors.windows import Accumulator

log = logging.getLogger(__name__)
REQUESTS = Counter("hbreg_query_requests_total", "Query API requests", ["endpoint", "status"])
EVENT_MEMORY = 100_000
EVENT_HISTORY_S = 24 * 3600
RECENT_WINDOWS = 30
MAX_WINDOWS = 10_000


class BadRequest(Exception):
    pass


def _int_param(request: web.Request, name: str, default: int | None = None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name}: expected epoch milliseconds (a whole number), got {raw!r}") from None
    if value < 0:
        raise BadRequest(f"{name}: must not be negative, got {value}")
    return value


class EventLog:
    """The recent `agent-events`, read from Kafka (the last day, then live) and kept in memory."""

    def __init__(self, settings: Settings, names: Names) -> None:
        self._settings = settings
        self._topic = names.events_topic
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENT_MEMORY)
        self.running = False

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(bootstrap_servers=self._settings.kafka_bootstrap, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            while self._topic not in await consumer.topics():
                await asyncio.sleep(1.0)
            from aiokafka import TopicPartition

            tps = [TopicPartition(self._topic, p) for p in sorted(consumer.partitions_for_topic(self._topic) or ())]
            if not tps:
                consumer.subscribe([self._topic])
            else:
                consumer.assign(tps)
                since = int((time.time() - EVENT_HISTORY_S) * 1000)
                offsets = await consumer.offsets_for_times({tp: since for tp in tps})
                for tp in tps:
                    found = offsets.get(tp)
                    if found is None:
                        await consumer.seek_to_end(tp)
                    else:
                        consumer.seek(tp, found.offset)
            self.running = True
            while True:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for record in records:
                        self.events.append(event_json(hb.AgentEvent.FromString(record.value)))
        finally:
            self.running = False
            await consumer.stop()


class Query:
    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self.settings = settings
        self.names = Names.of(settings)
        self.redis = client
        self.window_ms = int(settings.window_size * 1000)
        self.timeout_ms = int(settings.stall_timeout * 1000)

    async def _clocks(self) -> dict[int, int]:
        raw = await self.redis.hgetall(self.names.query_clock)
        return {int(k): json.loads(v)[0] for k, v in raw.items()}

    def _agent(self, agent_id: str, view: list | None, latest: dict | None, clocks: dict[int, int]) -> dict:
        now = int(time.time() * 1000)
        wm = clocks.get(partition_of(agent_id, self.settings.topic_partitions), now)
        task, status, cpu, last_seen, state, reason, since, mean, std = view or ("", 0, 0.0, 0, "alive", "", 0, None, None)
        progress = None
        if latest is not None and latest["last_seen_ms"] >= last_seen:
            task, cpu, last_seen, progress = latest["task_id"], latest["cpu_util"], latest["last_seen_ms"], latest["progress"]
            status = hb.Status.Value(latest["status"])
        silence = max(0, wm - last_seen)
        value = round(phi(silence, mean, std), 3) if mean is not None and state != "left" else 0.0
        if state == "alive" and (silence >= self.timeout_ms / 2 or value >= self.settings.phi_suspect):
            state = "suspect"
        return agent_json(agent_id, task_id=task, status=status, state=state, reason=reason,
                          last_seen_ms=last_seen, cpu_util=cpu, phi=value, state_since_ms=since, progress=progress)

    async def agents(self, state: str | None = None) -> list[dict]:
        pipe = self.redis.pipeline(transaction=False)
        for partition in range(self.settings.topic_partitions):
            pipe.hgetall(self.names.query_agents(partition))
        for shard in range(self.names.shards):
            pipe.hgetall(self.names.latest(shard))
        replies = await pipe.execute()
        views: dict[str, list] = {}
        for reply in replies[: self.settings.topic_partitions]:
            views.update({k.decode(): json.loads(v) for k, v in reply.items()})
        latest: dict[str, dict] = {}
        for reply in replies[self.settings.topic_partitions :]:
            latest.update({k.decode(): registry.decode(k.decode(), v) for k, v in reply.items()})
        clocks = await self._clocks()
        out = [self._agent(a, views.get(a), latest.get(a), clocks) for a in sorted(views.keys() | latest.keys())]
        return [a for a in out if state is None or a["state"] == state]

    async def agent(self, agent_id: str) -> dict | None:
        view = await self.redis.hget(self.names.query_agents(partition_of(agent_id, self.settings.topic_partitions)), agent_id)
        raw = await self.redis.hget(self.names.latest(partition_of(agent_id, self.names.shards)), agent_id)
        if view is None and raw is None:
            return None
        latest = registry.decode(agent_id, raw) if raw is not None else None
        return self._agent(agent_id, json.loads(view) if view else None, latest, await self._clocks())

    async def _tumbling(self, agent_id: str, start: int, end: int) -> list[tuple[int, int, str, Accumulator, bool]]:
        partition = partition_of(agent_id, self.settings.topic_partitions)
        first = start - start % self.window_ms
        starts = range(first, end + 1, self.window_ms)
        pipe = self.redis.pipeline(transaction=False)
        for window_start in starts:
            pipe.hget(self.names.query_windows(partition, window_start), agent_id)
            pipe.hget(self.names.query_open(partition, window_start), agent_id)
        replies = await pipe.execute()
        rows = []
        for window_start, closed, opened in zip(starts, replies[::2], replies[1::2]):
            if closed is not None:
                s, e, state, dump = json.loads(closed)
                rows.append((s, e, state, Accumulator.load(dump), True))
            elif opened is not None:
                end_ms = window_start + self.window_ms
                rows.append((window_start, end_ms, "", Accumulator.load(json.loads(opened)), False))
        return rows

    async def windows(self, agent_id: str, start: int, end: int, size_ms: int) -> list[dict]:
        if size_ms == self.window_ms:
            return [window_json(agent_id, s, e, acc, state, final)
                    for s, e, state, acc, final in await self._tumbling(agent_id, start, end)]
        # hopping: every tumbling end within [start, end] closes a window of `size_ms` merged from them
        tumbling = await self._tumbling(agent_id, start - size_ms, end)
        out = []
        for _, hop_end, state, _, final in tumbling:
            if hop_end < start:
                continue
            merged = Accumulator()
            hop_start = hop_end - size_ms
            for s, e, _, acc, _ in tumbling:
                if hop_start <= s and e <= hop_end:
                    merged.merge(acc, (s - hop_start) / 60_000)
            out.append(window_json(agent_id, hop_start, hop_end, merged, state, final))
        return [r for r in out if start <= r["window_end_ms"] and r["window_start_ms"] <= end]


def _size(request: web.Request, window_ms: int) -> int:
    raw = request.query.get("size")
    if raw is None:
        return window_ms
    parse, expects = PARSERS["seconds"]
    try:
        size_ms = int(round(parse(raw) * 1000))
    except ValueError:
        raise BadRequest(f"size: expected a duration such as 10s or 60s, got {raw!r}") from None
    if size_ms % window_ms:
        raise BadRequest(f"size: must be a multiple of the {window_ms // 1000}s tumbling window, got {raw!r}")
    return size_ms


def build_app(query: Query, events: EventLog) -> web.Application:
    def respond(endpoint: str, status: int, body: dict) -> web.Response:
        REQUESTS.labels(endpoint, str(status)).inc()
        return web.json_response(body, status=status)

    async def guarded(endpoint: str, handler) -> web.Response:
        try:
            return respond(endpoint, 200, await handler())
        except BadRequest as exc:
            return respond(endpoint, 400, {"error": str(exc)})
        except LookupError as exc:
            return respond(endpoint, 404, {"error": str(exc)})

    async def list_agents(request: web.Request) -> web.Response:
        async def handler() -> dict:
            state = request.query.get("state")
            if state is not None and state not in STATES:
                raise BadRequest(f"state: must be one of {', '.join(STATES)}, got {state!r}")
            return {"agents": await query.agents(state)}

        return await guarded("agents", handler)

    async def one_agent(request: web.Request) -> web.Response:
        async def handler() -> dict:
            agent_id = request.match_info["agent_id"]
            found = await query.agent(agent_id)
            if found is None:
                raise LookupError(f"agent {agent_id!r} is not known")
            now = int(time.time() * 1000)
            rows = await query.windows(agent_id, now - RECENT_WINDOWS * query.window_ms, now, query.window_ms)
            return {**found, "windows": rows}

        return await guarded("agent", handler)

    async def list_windows(request: web.Request) -> web.Response:
        async def handler() -> dict:
            agent_id = request.query.get("agent")
            if not agent_id:
                raise BadRequest("agent: required (the agent id whose windows to list)")
            now = int(time.time() * 1000)
            start = _int_param(request, "from", now - 3600_000)
            end = _int_param(request, "to", now)
            if start > end:
                raise BadRequest(f"from: must not be after to ({start} > {end})")
            retention_ms = int(query.settings.window_retention * 1000)
            start = max(start, now - retention_ms - query.window_ms)  # nothing older is kept
            if (end - start) // query.window_ms > MAX_WINDOWS:
                raise BadRequest(f"from: at most {MAX_WINDOWS} windows per request; narrow from/to")
            size_ms = _size(request, query.window_ms)
            if await query.agent(agent_id) is None:
                raise LookupError(f"agent {agent_id!r} is not known")
            return {"windows": await query.windows(agent_id, start, end, size_ms)}

        return await guarded("windows", handler)

    async def list_events(request: web.Request) -> web.Response:
        async def handler() -> dict:
            kind = request.query.get("type")
            if kind is not None and kind not in EVENT_TYPES.values():
                raise BadRequest(f"type: must be one of {', '.join(EVENT_TYPES.values())}, got {kind!r}")
            since = _int_param(request, "since", 0)
            limit = _int_param(request, "limit", 1000)
            agent_id = request.query.get("agent")
            found = [
                e for e in events.events
                if (kind is None or e["type"] == kind) and e["detected_at_ms"] >= since
                and (agent_id is None or e["agent_id"] == agent_id or agent_id in e["agent_ids"])
            ]
            return {"events": found[-limit:] if limit else []}

        return await guarded("events", handler)

    async def healthz(_: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(query.redis.ping(), 1.0)
            ok = events.running
        except Exception:
            ok = False
        return web.json_response({"ok": ok, "events_reader": events.running}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/api/agents", list_agents)
    app.router.add_get("/api/agents/{agent_id}", one_agent)
    app.router.add_get("/api/windows", list_windows)
    app.router.add_get("/api/events", list_events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


class QueryServer:
    """The query API's parts, started and stopped in order (tests run it in-process)."""

    def __init__(self, settings: Settings) -> None:
        settings.require("redis_url", "kafka_bootstrap")
        self.settings = settings
        self.redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=5.0)
        self.query = Query(settings, self.redis)
        self.events = EventLog(settings, self.query.names)
        self._runner: web.AppRunner | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._reader = asyncio.create_task(self.events.run(), name="events-reader")
        self._runner = web.AppRunner(build_app(self.query, self.events), access_log=None)
        await self._runner.setup()
        host, _, port = self.settings.http_addr.rpartition(":")
        await web.TCPSite(self._runner, host, int(port)).start()

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
        if self._reader:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.redis.aclose()


async def serve(settings: Settings) -> None:
    stop = ops.stop_signal()
    server = QueryServer(settings)
    await server.start()
    log.info("query API listening", extra={"http_addr": settings.http_addr})
    await stop.wait()
    await server.stop()
    log.info("query API stopped")
