"""Group commit of heartbeats into Redis.

A BeatBatch packs its admitted heartbeats column-wise by shard (a `Batch`) and hands it to the one writer;
a single heartbeat (a unary Beat, a stream's message) goes straight into its shard's queue (`write_one`);
whatever arrived while the previous Redis round trip was in flight goes out together in the next one,
one WRITE_SHARD script call per shard, all pipelined. So the cost per heartbeat is a few list appends in
Python, not a Redis round trip, whether it came by Beat, BeatBatch or BeatStream. A caller's future
resolves only after Redis answered: an acknowledged heartbeat is in Redis.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import time
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core import redis_client
from heartbeat_registry.core.columns import Columns
from heartbeat_registry.core.names import Names, partition_of
from ingest import metrics, scripts

log = logging.getLogger(__name__)
# agent -> (its fences, the tasks offered to it), raw as core/tasks.py stores them; only agents that have any
TaskNews = dict[str, tuple[str, str]]
NO_NEWS: TaskNews = {}
NAN = float("nan")
LINGER_S = 0.002  # how long a shard's next write waits for more after one that carried next to nothing
LINGER_BELOW = 4  # heartbeats


class Unavailable(Exception):
    """Redis cannot take the write now; the heartbeat was not acknowledged."""


class Overloaded(Exception):
    """Too much is already waiting for Redis; refuse instead of piling up memory."""


def _script_args(cols: Columns, minid: int) -> list[Any]:
    """The arguments of scripts.WRITE_SHARD: joins and packs run in C, nothing per heartbeat here."""
    return [
        minid,
        cols.message().SerializeToString(),
        len(cols),
        max(cols.received_ms),
        "\n".join(cols.agent_id),
        "\n".join(cols.task_id),
        "\n".join(map(str, cols.received_ms)),
        "\n".join(map(str, cols.timestamp)),
        bytes(cols.status),
        array.array("f", cols.cpu_util).tobytes(),
        array.array("f", cols.progress).tobytes(),
    ]


class Batch:
    """What one RPC stores: its heartbeats by shard, all stamped with one receive time."""

    __slots__ = ("shards", "count", "received", "_nshards")

    def __init__(self, nshards: int, received: int) -> None:
        self.shards: dict[int, Columns] = {}
        self.count = 0
        self.received = received
        self._nshards = nshards

    def add(
        self, agent: str, task: str, status: int, timestamp: int, cpu: float, progress: float | None, seq: int
    ) -> None:
        """One admitted heartbeat, as validate.fields_of read it (progress None when not reported;
        NaN in the stored columns), and its seq."""
        if progress is None:
            progress = NAN
        index = partition_of(agent, self._nshards)
        cols = self.shards.get(index)
        if cols is None:
            cols = self.shards[index] = Columns()
        cols.agent_id.append(agent)
        cols.task_id.append(task)
        cols.status.append(status)
        cols.timestamp.append(timestamp)
        cols.cpu_util.append(cpu)
        cols.progress.append(progress)
        cols.received_ms.append(self.received)
        cols.seq.append(seq)
        self.count += 1


class _Write:
    """One RPC's batch on its way: resolves when every shard it touches has been written."""

    __slots__ = ("future", "remaining", "count", "fences")

    def __init__(self, future: asyncio.Future[TaskNews], shards: int, count: int) -> None:
        self.future = future
        self.remaining = shards
        self.count = count
        self.fences: TaskNews = NO_NEWS

    def shard_done(self, cols: Columns, fences: TaskNews) -> bool:
        """Record one written shard; True when it was the last."""
        if fences:
            mine = {a: fences[a] for a in cols.agent_id if a in fences}
            if mine:
                self.fences = {**self.fences, **mine}
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.fences)
            return True
        return False


class StreamWriter:
    """One writer task per shard, each with at most one Redis call in flight: an agent's heartbeats
    (always on one shard) are written in order, while the shards' calls overlap with each other and with
    the Python work of the next calls."""

    def __init__(
        self,
        client: aioredis.Redis,
        names: Names,
        retention_s: float,
        max_pending: int = 200_000,
        hold_s: float = 0.5,
    ) -> None:
        self._redis = client
        self._names = names
        self._retention_ms = int(retention_s * 1000)
        self._max_pending = max_pending
        self._script = client.register_script(scripts.WRITE_SHARD)
        # per shard, in arrival order: (columns, the RPC's _Write) for a batch, and (columns, their callers'
        # futures) for single heartbeats (a unary Beat, a stream's message: the common case), which go
        # straight into the queue's last entry of singles: no Batch, columns or _Write per call
        self._queues: list[list[tuple[Columns, _Write | list[asyncio.Future[TaskNews]]]]] = [
            [] for _ in range(names.shards)
        ]
        self._wakeups = [asyncio.Event() for _ in range(names.shards)]
        self._pending = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._hold_s = hold_s
        # set while Redis answers; cleared from a failed write until it answers a PING again (`available`)
        self._up = asyncio.Event()
        self._up.set()

    @property
    def available(self) -> bool:
        return self._up.is_set()

    @available.setter
    def available(self, up: bool) -> None:
        if up:
            self._up.set()
        else:
            self._up.clear()

    def batch(self, received: int) -> Batch:
        return Batch(self._names.shards, received)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(shard), name=f"stream-writer-{shard}") for shard in range(self._names.shards)
        ]

    async def close(self) -> None:
        """Write what is queued, then stop (graceful shutdown: nothing accepted is dropped)."""
        self._closing = True
        for wakeup in self._wakeups:
            wakeup.set()
        await asyncio.gather(*self._tasks)

    async def ready(self, count: int) -> None:
        """Raise what storing `count` more heartbeats would raise (Unavailable, Overloaded), once Redis
        answers or has been out for `hold_s` more."""
        if not self._up.is_set():
            await self._hold()
        self.check(count)

    async def _hold(self) -> None:
        """Redis is out (a write failed, or the watch's PING): wait up to `hold_s` for it to answer again
        before refusing. Valkey restarts in well under a second while its data set is small, and each
        refusal sends its agent to open a new call: refused at once, every agent opened one every few
        hundred ms, and the crowd of calls kept the ingests' cores busy for a second after Valkey was back
        (found by the chaos soak). A call that waits costs nothing meanwhile, and its heartbeat is stored
        as soon as Redis answers."""
        if self._closing:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), self._hold_s)

    def check(self, count: int) -> None:
        """Raise what storing `count` more heartbeats now would raise (Unavailable, Overloaded)."""
        if self._closing:
            raise Unavailable("ingest is shutting down")
        if not self.available:
            raise Unavailable("redis is unreachable")
        if self._pending + count > self._max_pending:
            raise Overloaded(f"{self._pending} heartbeats already waiting for Redis")

    async def write_one(
        self,
        agent: str,
        task: str,
        status: int,
        timestamp: int,
        cpu: float,
        progress: float | None,
        seq: int,
        received: int,
    ) -> TaskNews:
        """Store one heartbeat (the fields as `Batch.add` takes them); returns the fences and offers of the
        agents of its round trip, its own among them if it has any."""
        if not self._up.is_set():  # ready(1), inlined: this is the per-heartbeat path
            await self._hold()
        self.check(1)
        shard = partition_of(agent, self._names.shards)
        queue = self._queues[shard]
        if queue and type(queue[-1][1]) is list:
            cols, futures = queue[-1]
        else:
            cols, futures = Columns(), []
            queue.append((cols, futures))
        cols.agent_id.append(agent)
        cols.task_id.append(task)
        cols.status.append(status)
        cols.timestamp.append(timestamp)
        cols.cpu_util.append(cpu)
        cols.progress.append(NAN if progress is None else progress)
        cols.received_ms.append(received)
        cols.seq.append(seq)
        future: asyncio.Future[TaskNews] = asyncio.get_running_loop().create_future()
        futures.append(future)  # type: ignore[union-attr]
        self._pending += 1
        self._wakeups[shard].set()
        try:
            return await future
        finally:
            self._pending -= 1

    async def write(self, batch: Batch) -> TaskNews:
        """Store `batch`; returns, for its agents that have any, their fences and the tasks offered to them."""
        await self.ready(batch.count)
        future: asyncio.Future[TaskNews] = asyncio.get_running_loop().create_future()
        write = _Write(future, len(batch.shards), batch.count)
        self._pending += batch.count
        for index, cols in batch.shards.items():
            self._queues[index].append((cols, write))
            self._wakeups[index].set()
        try:
            return await future
        finally:
            self._pending -= batch.count

    async def _run(self, shard: int) -> None:
        wakeup = self._wakeups[shard]
        names = self._names
        keys = [names.stream(shard), names.latest(shard), names.fenced(shard), names.assigned(shard)]
        last = LINGER_BELOW  # heartbeats the previous round trip carried
        while True:
            # Look before waiting: a wake-up that arrived during the previous write (close()'s included)
            # may have been consumed already, so the event alone must never decide.
            queued = self._queues[shard]
            if not queued:
                if self._closing:
                    return
                await wakeup.wait()
                wakeup.clear()
                continue
            if last < LINGER_BELOW and self._pending > sum(len(cols) for cols, _ in queued) and not self._closing:
                # The last round trip carried next to nothing while other calls are in flight: at the
                # rates of unary Beats and of agents' streams each would carry one heartbeat, and each
                # costs ~100 us of redis-py in this process. Wait a moment for more to join this one.
                await asyncio.sleep(LINGER_S)
                queued = self._queues[shard]
            self._queues[shard] = []
            merged = queued[0][0]
            for cols, _ in queued[1:]:
                merged.extend(cols)
            last = len(merged)
            try:
                started = time.perf_counter()
                reply = await self._script(keys=keys, args=_script_args(merged, self._minid()))
                metrics.REDIS_ROUNDTRIP.observe(time.perf_counter() - started)
            except Exception as exc:  # whatever the client raises, this shard's writer goes on
                # RedisError and OSError above all; but a client bug (redis-py's cluster client raises
                # RedisClusterException, or AttributeError on a connection closed under it) must fail
                # these writes with UNAVAILABLE too, not end the task and leave their callers waiting
                self.available = False
                log.warning(
                    "redis write failed", extra={"error": repr(exc), "shard": shard, "heartbeats": len(merged.agent_id)}
                )
                error = Unavailable(f"redis write failed: {exc}")
                for _, waiting in queued:
                    for future in waiting if isinstance(waiting, list) else (waiting.future,):
                        if not future.done():  # its caller may have gone (a cancelled call)
                            future.set_exception(error)
                if isinstance(exc, redis.exceptions.ConnectionError):
                    # Redis restarted or the connection was reset: the pool's other connections are
                    # from before it, and each would fail one more write (and refuse the ingest's calls
                    # until the next PING once more) when a burst reached it
                    await redis_client.close_idle(self._redis)
            else:
                fences = (
                    {_text(reply[i]): (_text(reply[i + 1]), _text(reply[i + 2])) for i in range(0, len(reply), 3)}
                    if reply
                    else NO_NEWS
                )
                for cols, waiting in queued:
                    if isinstance(waiting, list):
                        for future in waiting:
                            if not future.done():
                                future.set_result(fences)
                    else:
                        waiting.shard_done(cols, fences)

    def _minid(self) -> int:
        return now_ms() - self._retention_ms


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
