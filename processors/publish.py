"""Publishes what the detector holds to Redis, where the query API reads it across all workers.

Every `interval` a worker writes, in one pipelined round trip:
- each closed window as one hash per partition and window (agent -> row), expiring with the retention;
- the liveness view of the agents whose state changed or whose window closed (the freshest beat itself
  is in the ingest's registry already);
- while the worker is live (its clock near the wall clock), the open windows of the agents that beat, so
  a heartbeat shows in its window row long before the window closes; while it works off a backlog those
  rows would be stale the moment they are written, so it skips them;
- each partition's watermark, the clock the API judges phi and silence by.
These are the detector's own in-memory tables written out as they are, not a second computation.
"""

from __future__ import annotations

import json
import time

import redis.asyncio as aioredis

from heartbeat_registry.names import Names
from processors.liveness import Agent, Liveness
from processors.partition import PartitionState

LIVE_WITHIN_MS = 5000


def agent_view(liveness: Liveness, agent: Agent) -> str:
    stats = agent.stats(liveness.rules)
    return json.dumps([
        agent.task_id, agent.status, round(agent.cpu, 4), agent.last_seen, agent.state, agent.reason,
        agent.since, None if stats is None else round(stats[0], 1), None if stats is None else round(stats[1], 1),
    ])


class QueryStore:
    def __init__(self, client: aioredis.Redis, names: Names, retention_s: float) -> None:
        self._redis = client
        self._names = names
        self._retention_ms = int(retention_s * 1000)

    async def publish(self, states: dict[int, PartitionState]) -> int:
        """Write what changed since the last call; returns the number of commands sent."""
        names = self._names
        pipe = self._redis.pipeline(transaction=False)
        now = int(time.time() * 1000)
        for partition, state in states.items():
            liveness = state.liveness
            touched, state.touched = state.touched, set()
            changed, state.changed = state.changed, set()
            closed, state.unpublished = state.unpublished, []
            ended: set[str] = set()
            for window in closed:
                if window.rows:
                    key = names.query_windows(partition, window.start)
                    pipe.hset(key, mapping={
                        a: json.dumps([window.start, window.end, window.states.get(a, ""), acc.dump()])
                        for a, acc in window.rows.items()
                    })
                    pipe.pexpireat(key, window.end + self._retention_ms)
                    ended.update(window.rows)
            views = {a: agent_view(liveness, liveness.agents[a]) for a in changed | ended if a in liveness.agents}
            if views:
                pipe.hset(names.query_agents(partition), mapping=views)
            if now - liveness.watermark < LIVE_WITHIN_MS:
                opened = {}
                for agent_id in touched | ended:
                    rows = [
                        [start, start + state.window_ms, state.open[start][agent_id].dump()]
                        for start in sorted(state.open) if agent_id in state.open[start]
                    ]
                    if rows:
                        opened[agent_id] = json.dumps(rows)
                if opened:
                    pipe.hset(names.query_open(partition), mapping=opened)
                gone = [a for a in ended if a not in opened]
                if gone:
                    pipe.hdel(names.query_open(partition), *gone)
            elif closed:  # working off a backlog: open rows are not kept, closed ones supersede them
                pipe.delete(names.query_open(partition))
            pipe.hset(names.query_clock, str(partition), json.dumps([liveness.watermark, now]))
        commands = len(pipe)
        if commands:
            await pipe.execute()
        return commands
