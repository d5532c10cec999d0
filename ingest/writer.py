"""Group commit of heartbeats into Redis.

Every RPC hands its validated heartbeats to one writer; whatever arrived while the previous Redis round
trip was in flight goes out together in the next one. Per shard that round trip is three pipelined
commands: XADD of one HeartbeatColumns entry (trimmed by MINID to the retention), one multi-field HSET
of the agents' registry entries and one HMGET of their fences. So the cost per heartbeat is a few list
appends in Python, not a Redis round trip, whether it came by Beat, BeatBatch or BeatStream.
A caller's future resolves only after Redis answered: an acknowledged heartbeat is in Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from heartbeat_registry import registry
from heartbeat_registry.names import Names, partition_of
from heartbeat_registry.pb import hb
from ingest import metrics

log = logging.getLogger(__name__)
NAN = float("nan")


class Unavailable(Exception):
    """Redis cannot take the write now; the heartbeat was not acknowledged."""


class Overloaded(Exception):
    """Too much is already waiting for Redis; refuse instead of piling up memory."""


class _Shard:
    __slots__ = ("agent_id", "task_id", "status", "timestamp", "cpu", "progress", "received", "latest")

    def __init__(self) -> None:
        self.agent_id: list[str] = []
        self.task_id: list[str] = []
        self.status: list[int] = []
        self.timestamp: list[int] = []
        self.cpu: list[float] = []
        self.progress: list[float] = []
        self.received: list[int] = []
        self.latest: dict[str, str] = {}


class StreamWriter:
    def __init__(
        self,
        client: aioredis.Redis,
        names: Names,
        retention_s: float,
        max_pending: int = 200_000,
    ) -> None:
        self._redis = client
        self._names = names
        self._retention_ms = int(retention_s * 1000)
        self._max_pending = max_pending
        self._queue: list[tuple[Sequence[hb.Heartbeat], int, asyncio.Future[dict[str, str]]]] = []
        self._pending = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stream-writer")

    async def close(self) -> None:
        """Write what is queued, then stop (graceful shutdown: nothing accepted is dropped)."""
        self._closing = True
        self._wakeup.set()
        if self._task:
            await self._task

    async def write(self, beats: Sequence[hb.Heartbeat], received_ms: int) -> dict[str, str]:
        """Store `beats`; returns agent_id -> fence ('task_id epoch') for the agents that have one."""
        if self._closing:
            raise Unavailable("ingest is shutting down")
        if self._pending + len(beats) > self._max_pending:
            raise Overloaded(f"{self._pending} heartbeats already waiting for Redis")
        future: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self._queue.append((beats, received_ms, future))
        self._pending += len(beats)
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._queue:
                if self._closing:
                    return
                continue
            batch, self._queue = self._queue, []
            count = sum(len(beats) for beats, _, _ in batch)
            try:
                fences = await self._flush(batch)
            except (RedisError, OSError) as exc:
                log.warning("redis write failed", extra={"error": repr(exc), "heartbeats": count})
                error = Unavailable(f"redis write failed: {exc}")
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(error)
            else:
                for beats, _, future in batch:
                    if not future.done():
                        mine = {b.agent_id: fences[b.agent_id] for b in beats if b.agent_id in fences}
                        future.set_result(mine)
            finally:
                self._pending -= count
            if self._queue:
                self._wakeup.set()

    async def _flush(self, batch: list[tuple[Sequence[hb.Heartbeat], int, asyncio.Future]]) -> dict[str, str]:
        shards: dict[int, _Shard] = {}
        nshards = self._names.shards
        for beats, received, _ in batch:
            for b in beats:
                agent = b.agent_id
                index = partition_of(agent, nshards)
                shard = shards.get(index)
                if shard is None:
                    shard = shards[index] = _Shard()
                progress = b.progress if b.HasField("progress") else NAN
                shard.agent_id.append(agent)
                shard.task_id.append(b.task_id)
                shard.status.append(b.status)
                shard.timestamp.append(b.timestamp)
                shard.cpu.append(b.cpu_util)
                shard.progress.append(progress)
                shard.received.append(received)
                shard.latest[agent] = registry.encode(
                    received, b.status, b.cpu_util, b.timestamp, progress, b.task_id
                )
        minid = int(time.time() * 1000) - self._retention_ms
        order: list[tuple[int, list[str]]] = []
        pipe = self._redis.pipeline(transaction=False)
        for index, shard in shards.items():
            blob = hb.HeartbeatColumns(
                agent_id=shard.agent_id,
                task_id=shard.task_id,
                status=shard.status,
                timestamp=shard.timestamp,
                cpu_util=shard.cpu,
                progress=shard.progress,
                received_ms=shard.received,
            ).SerializeToString()
            # n and r let the bridge count and place the entry in time without decoding it
            fields = {"b": blob, "n": len(shard.agent_id), "r": max(shard.received)}
            pipe.xadd(self._names.stream(index), fields, minid=minid, approximate=True)
            pipe.hset(self._names.latest(index), mapping=shard.latest)
            agents = list(shard.latest)
            pipe.hmget(self._names.fenced(index), agents)
            order.append((index, agents))
        started = time.perf_counter()
        replies = await pipe.execute()
        metrics.REDIS_ROUNDTRIP.observe(time.perf_counter() - started)
        fences: dict[str, str] = {}
        for n, (_, agents) in enumerate(order):
            for agent, fence in zip(agents, replies[3 * n + 2]):
                if fence is not None:
                    fences[agent] = fence.decode() if isinstance(fence, bytes) else fence
        return fences

