"""Reading what the workers publish (core.views) and the ingest's registry from Redis, across all
partitions: the agents' current state and their window rows, tumbling or merged into hopping windows."""

from __future__ import annotations

import json
import logging
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core.names import Names, partition_of
from heartbeat_registry.core.settings import Settings
from heartbeat_registry.core.shapes import agent_json, task_json, window_json
from heartbeat_registry.core.tasks import ASSIGNED, ORPHANED, RUNNING, TaskStore
from heartbeat_registry.core.views import AgentView, PartitionClock, RegistryEntry, WindowRow
from heartbeat_registry.core.windowstats import WindowStats
from heartbeat_registry.pb import hb

log = logging.getLogger(__name__)
NOTIFICATIONS_KEPT = 1000


class Query:
    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self.settings = settings
        self.names = Names.of(settings)
        self.redis = client
        self.window_ms = int(settings.window_size * 1000)
        self.timeout_ms = int(settings.stall_timeout * 1000)
        self.tasks_store = TaskStore(client, self.names)

    async def clocks(self) -> dict[int, int]:
        """partition -> its pipeline clock (watermark) as the workers last published it."""
        raw = await self.redis.hgetall(self.names.query_clock)
        return {int(k): PartitionClock.decode(v).watermark for k, v in raw.items()}

    def _agent(
        self, agent_id: str, view: AgentView | None, latest: RegistryEntry | None, clocks: dict[int, int]
    ) -> dict[str, Any]:
        # judged on its partition's clock, as the detector does; the wall clock before any publish
        clock = clocks.get(partition_of(agent_id, self.settings.topic_partitions), now_ms())
        return agent_json(agent_id, view, latest, clock, self.timeout_ms, self.settings.phi_suspect)

    async def agents(self, state: str | None = None) -> list[dict[str, Any]]:
        partitions = self.settings.topic_partitions
        pipe = self.redis.pipeline(transaction=False)
        for partition in range(partitions):
            pipe.hgetall(self.names.query_agents(partition))
        for shard in range(self.names.shards):
            pipe.hgetall(self.names.latest(shard))
        replies = await pipe.execute()
        views = {k.decode(): AgentView.decode(v) for reply in replies[:partitions] for k, v in reply.items()}
        latest = {
            k.decode(): RegistryEntry.decode(k.decode(), v) for reply in replies[partitions:] for k, v in reply.items()
        }
        clocks = await self.clocks()
        out = [self._agent(a, views.get(a), latest.get(a), clocks) for a in sorted(views.keys() | latest.keys())]
        return [a for a in out if state is None or a["state"] == state]

    async def agent(self, agent_id: str) -> dict[str, Any] | None:
        view = await self.redis.hget(self.names.query_agents_of(agent_id, self.settings.topic_partitions), agent_id)
        raw = await self.redis.hget(self.names.latest(partition_of(agent_id, self.names.shards)), agent_id)
        if view is None and raw is None:
            return None
        return self._agent(
            agent_id,
            AgentView.decode(view) if view is not None else None,
            RegistryEntry.decode(agent_id, raw) if raw is not None else None,
            await self.clocks(),
        )

    async def _tumbling(self, agent_id: str, start: int, end: int) -> list[tuple[WindowRow, bool]]:
        """(row, final) of the tumbling windows from the one holding `start` to the one holding `end`."""
        partition = partition_of(agent_id, self.settings.topic_partitions)
        first = start - start % self.window_ms
        starts = range(first, end + 1, self.window_ms)
        pipe = self.redis.pipeline(transaction=False)
        for window_start in starts:
            pipe.hget(self.names.query_windows(partition, window_start), agent_id)
            pipe.hget(self.names.query_open(partition, window_start), agent_id)
        replies = await pipe.execute()
        rows = []
        for window_start, closed, opened in zip(starts, replies[::2], replies[1::2], strict=True):
            if closed is not None:
                rows.append((WindowRow.decode(closed), True))
            elif opened is not None:
                rows.append((WindowRow.decode_open(opened, window_start, window_start + self.window_ms), False))
        return rows

    async def windows(self, agent_id: str, start: int, end: int, size_ms: int) -> list[dict[str, Any]]:
        if size_ms == self.window_ms:
            return [window_json(agent_id, row, final) for row, final in await self._tumbling(agent_id, start, end)]
        # hopping: every tumbling end within [start, end] closes a window of `size_ms` merged from them
        tumbling = await self._tumbling(agent_id, start - size_ms, end)
        out = []
        for last, final in tumbling:
            if last.end < start:
                continue
            merged = WindowStats()
            hop_start = last.end - size_ms
            for row, _ in tumbling:
                if hop_start <= row.start and row.end <= last.end:
                    merged.merge(row.stats, (row.start - hop_start) / 60_000)
            out.append(window_json(agent_id, WindowRow(hop_start, last.end, last.state, merged), final))
        return [r for r in out if start <= r["window_end_ms"] and r["window_start_ms"] <= end]

    async def _reported(self) -> dict[str, RegistryEntry]:
        """task -> the registry entry of an agent beating RUNNING on it (tasks known only from heartbeats)."""
        pipe = self.redis.pipeline(transaction=False)
        for shard in range(self.names.shards):
            pipe.hgetall(self.names.latest(shard))
        found = {}
        for reply in await pipe.execute():
            for key, raw in reply.items():
                entry = RegistryEntry.decode(key.decode(), raw)
                if entry.task_id and entry.status == hb.RUNNING:
                    found[entry.task_id] = entry
        return found

    @staticmethod
    def _implicit(entry: RegistryEntry) -> dict[str, Any]:
        """A task only seen in heartbeats: owned by its reporter at epoch 0."""
        record = {"owner": entry.agent_id, "epoch": 0, "state": RUNNING, "since": entry.last_seen_ms}
        seen = {
            "epoch": 0,
            "agent": entry.agent_id,
            "what": RUNNING,
            "at_ms": entry.last_seen_ms,
            "why": "seen in heartbeats",
        }
        return task_json(entry.task_id, record, [seen])

    async def task(self, task_id: str) -> dict[str, Any] | None:
        record = await self.tasks_store.get(task_id)
        if record is not None:
            return task_json(task_id, record, await self.tasks_store.history(task_id))
        entry = (await self._reported()).get(task_id)
        return None if entry is None else self._implicit(entry)

    async def tasks(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        """Tasks in `state` (default: orphaned and assigned), oldest first."""
        out = []
        for wanted in [state] if state else [ORPHANED, ASSIGNED]:
            for task_id, _ in await self.tasks_store.in_state(wanted, limit):
                record = await self.tasks_store.get(task_id)
                if record is not None and record["state"] == wanted:
                    out.append(task_json(task_id, record, []))
            if wanted == RUNNING:
                recorded = {t["task_id"] for t in out}
                out.extend(self._implicit(e) for t, e in (await self._reported()).items() if t not in recorded)
        return out[:limit]

    async def record_notification(self, body: dict[str, Any]) -> None:
        body = {**body, "received_ms": now_ms()}
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(self.names.alert_notifications, json.dumps(body))
        pipe.ltrim(self.names.alert_notifications, 0, NOTIFICATIONS_KEPT - 1)
        await pipe.execute()

    async def notifications(self, limit: int) -> list[dict[str, Any]]:
        """The notifications Alertmanager sent us, newest first."""
        if limit <= 0:  # LRANGE 0 -1 would be all of them
            return []
        return [json.loads(n) for n in await self.redis.lrange(self.names.alert_notifications, 0, limit - 1)]

    async def firing_alerts(self) -> list[dict[str, Any]]:
        """The active alerts as Alertmanager reports them (the first member that answers), each with the
        member it came from; empty when no Alertmanager is configured or none answers."""
        urls = [u.strip().rstrip("/") for u in (self.settings.alertmanager_url or "").split(",") if u.strip()]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
            for url in urls:
                try:
                    async with session.get(f"{url}/api/v2/alerts", params={"active": "true"}) as response:
                        alerts = await response.json()
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    log.info("alertmanager member not answering", extra={"member": url, "error": repr(exc)})
                    continue
                return [{**a, "alertmanager": url} for a in alerts]
        return []

    async def cpu_trends(self, agents: list[str], count: int) -> dict[str, list[float | None]]:
        """agent -> its CPU mean in each of the last `count` windows (None where it did not beat)."""
        now = now_ms()
        last = now - now % self.window_ms
        starts = [last - i * self.window_ms for i in range(count - 1, -1, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for agent in agents:
            partition = partition_of(agent, self.settings.topic_partitions)
            for start in starts:
                pipe.hget(self.names.query_windows(partition, start), agent)
                pipe.hget(self.names.query_open(partition, start), agent)
        replies = iter(await pipe.execute())
        out: dict[str, list[float | None]] = {}
        for agent in agents:
            means: list[float | None] = []
            for start in starts:
                closed, opened = next(replies), next(replies)
                if closed is not None:
                    means.append(WindowRow.decode(closed).stats.cpu_mean())
                elif opened is not None:
                    means.append(WindowRow.decode_open(opened, start, start + self.window_ms).stats.cpu_mean())
                else:
                    means.append(None)
            out[agent] = means
        return out
