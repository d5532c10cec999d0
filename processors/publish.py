"""Publishes what the detector holds to Redis, where the query API reads it across all workers.

Every `interval` a worker writes, in one pipelined round trip: the liveness view of each agent that
changed, the open windows of the agents that beat (so a heartbeat is visible in its window row well
before the window closes), the windows that closed (one sorted set per agent, trimmed to the retention),
and each partition's watermark, the clock the API judges phi and silence by. These are the detector's
own in-memory tables written out as they are, not a second computation.
"""

from __future__ import annotations

import json
import time

import redis.asyncio as aioredis

from heartbeat_registry.names import Names
from processors.liveness import Agent, Liveness
from processors.partition import PartitionState


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
        commands = 0
        now = int(time.time() * 1000)
        for partition, state in states.items():
            liveness = state.liveness
            touched, state.touched = state.touched, set()
            closed, state.unpublished = state.unpublished, []
            views = {a: agent_view(liveness, liveness.agents[a]) for a in touched if a in liveness.agents}
            if views:
                pipe.hset(names.query_agents(partition), mapping=views)
                commands += 1
            ended: set[str] = set()
            for window in closed:
                for agent_id, acc in window.rows.items():
                    key = names.query_windows(agent_id)
                    row = json.dumps([window.start, window.end, window.states.get(agent_id, ""), acc.dump()])
                    pipe.zremrangebyscore(key, window.start, window.start)  # a replayed close replaces
                    pipe.zadd(key, {row: window.start})
                    pipe.zremrangebyscore(key, "-inf", now - self._retention_ms)
                    pipe.pexpire(key, self._retention_ms)
                    commands += 4
                ended.update(window.rows)
            # the open windows of every agent that beat, or whose window just closed
            opened: dict[str, str] = {}
            for agent_id in touched | ended:
                rows = [
                    [start, start + state.window_ms, state.open[start][agent_id].dump()]
                    for start in sorted(state.open) if agent_id in state.open[start]
                ]
                if rows:
                    opened[agent_id] = json.dumps(rows)
            if opened:
                pipe.hset(names.query_open(partition), mapping=opened)
                commands += 1
            gone = [a for a in ended if a not in opened]
            if gone:
                pipe.hdel(names.query_open(partition), *gone)
                commands += 1
            pipe.hset(names.query_clock, str(partition), json.dumps([liveness.watermark, now]))
            commands += 1
        if commands:
            await pipe.execute()
        return commands
