"""Publishes what the detector holds to Redis, where the query API reads it across all workers.

Every `interval` a worker writes, in one pipelined round trip:
- each closed window as one hash per partition and window (agent -> row), expiring with the retention;
- the liveness view of the agents whose state changed or whose window closed (the freshest beat itself
  is in the ingest's registry already);
- while the worker is live (its clock near the wall clock), the open windows of the agents that beat, one
  hash per partition and window, so a heartbeat shows in its window row long before the window closes
  (working off a backlog those rows would be stale the moment they are written, so it skips them); once
  a window's closed rows are all out, its open hash is deleted;
- each partition's watermark, the clock the API judges phi and silence by.
These are the detector's own in-memory tables written out as they are, not a second computation.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from heartbeat_registry.beats import now_ms
from heartbeat_registry.core.names import Names
from heartbeat_registry.core.views import AgentView, PartitionClock, WindowRow
from processors.liveness import MIN_SAMPLES, Agent, Liveness
from processors.partition import ClosedWindow, PartitionState

LIVE_WITHIN_MS = 5000
# closed rows written per publish (every 100 ms), so that closing the windows of a large fleet, which all
# end at once, does not stall the worker for one long write (until then the open row shows the same counts)
ROWS_PER_PUBLISH = 2000
REFRESH_WINDOWS = 6


def _take(state: PartitionState, budget: int) -> list[tuple[ClosedWindow, list[str]]]:
    """Up to `budget` closed rows not yet published, oldest windows first."""
    out = []
    while state.unpublished and budget > 0:
        window = state.unpublished[0]
        if window.pending is None:
            window.pending = list(window.rows)
        chunk, window.pending = window.pending[:budget], window.pending[budget:]
        if chunk:
            out.append((window, chunk))
            budget -= len(chunk)
        if not window.pending:
            state.unpublished.pop(0)
    return out


def agent_view(liveness: Liveness, agent: Agent) -> bytes:
    model = agent.stats(liveness.rules)
    return AgentView(
        agent.task_id,
        agent.status,
        round(agent.cpu, 4),
        agent.last_seen,
        agent.state,
        agent.reason,
        agent.since,
        None if model is None else round(model[0], 1),
        None if model is None else round(model[1], 1),
    ).encode()


class QueryStore:
    def __init__(self, client: aioredis.Redis, names: Names, retention_s: float) -> None:
        self._redis = client
        self._names = names
        self._retention_ms = int(retention_s * 1000)

    async def publish(self, states: dict[int, PartitionState]) -> int:
        """Write what changed since the last call; returns the number of commands sent."""
        names = self._names
        pipe = self._redis.pipeline(transaction=False)
        now = now_ms()
        for partition, state in states.items():
            liveness = state.liveness
            touched, state.touched = state.touched, set()
            changed, state.changed = state.changed, set()
            ended: set[str] = set()
            for window, agents in _take(state, ROWS_PER_PUBLISH // max(len(states), 1)):
                key = names.query_windows(partition, window.start)
                closed: dict[Any, bytes] = {
                    a: WindowRow(window.start, window.end, window.states.get(a, ""), window.rows[a]).encode()
                    for a in agents
                }
                pipe.hset(key, mapping=closed)
                pipe.pexpireat(key, window.end + self._retention_ms)
                ended.update(agents)
                if not window.pending:  # every closed row is out: the open rows of the window go
                    pipe.delete(names.query_open(partition, window.start))
            # views: on state changes, for agents not shown yet, and to refresh the phi model once per
            # `REFRESH_WINDOWS` windows per agent (spread, so no window close rewrites every agent)
            fresh = changed | (touched - state.shown)
            turn = state.closed_until // state.window_ms % REFRESH_WINDOWS
            fresh.update(a for a in ended if hash(a) % REFRESH_WINDOWS == turn)
            views: dict[Any, bytes] = {
                a: agent_view(liveness, liveness.agents[a]) for a in fresh if a in liveness.agents
            }
            # shown for good once the view carries a phi model (an agent's first beats have none yet)
            state.shown.update(a for a in views if liveness.agents[a].hist_n >= MIN_SAMPLES)
            if views:
                pipe.hset(names.query_agents(partition), mapping=views)
            if touched and now - liveness.watermark < LIVE_WITHIN_MS:
                for start, rows in state.open.items():
                    beat: dict[Any, bytes] = {a: WindowRow.encode_open(rows[a]) for a in touched if a in rows}
                    if beat:
                        key = names.query_open(partition, start)
                        pipe.hset(key, mapping=beat)
                        pipe.pexpireat(key, start + state.window_ms + self._retention_ms)
            pipe.hset(names.query_clock, str(partition), PartitionClock(liveness.watermark, now).encode())
        commands = len(pipe)
        if commands:
            await pipe.execute()
        return commands
