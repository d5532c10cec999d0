"""Liveness of the agents of one partition, judged on the pipeline's clock (the watermark).

Pure logic, no faust: `beat()` for every heartbeat, `advance()` when the watermark moves. Deadlines
sit in a wheel of 50 ms buckets, so a beat costs a couple of set operations and a watermark step
touches only the agents whose deadline passed, whatever the fleet size.

An episode is identified by the agent's last beat before it went silent: a stall is emitted once per
episode, and replaying heartbeats already reflected in the state (after a restart) changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from heartbeat_registry.pb import hb

BUCKET_MS = 50
ALIVE, STALLED, LEFT = "alive", "stalled", "left"
_LEAVING = (hb.STOPPING, hb.COMPLETED)


class Agent:
    __slots__ = ("agent_id", "task_id", "status", "cpu", "last_seen", "state", "episode", "deadline", "bucket")

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.task_id = ""
        self.status = 0
        self.cpu = 0.0
        self.last_seen = 0
        self.state = ALIVE
        self.episode = 0  # last_seen of the stall episode in progress (0: none)
        self.deadline = 0
        self.bucket = -1

    def dump(self) -> list[Any]:
        return [self.task_id, self.status, self.cpu, self.last_seen, self.state, self.episode]

    @classmethod
    def load(cls, agent_id: str, data: list[Any]) -> Agent:
        agent = cls(agent_id)
        agent.task_id, agent.status, agent.cpu, agent.last_seen, agent.state, agent.episode = data
        return agent


class Liveness:
    def __init__(self, partition: int, timeout_ms: int) -> None:
        self.partition = partition
        self.timeout_ms = timeout_ms
        self.agents: dict[str, Agent] = {}
        self.watermark = 0
        self._wheel: dict[int, set[str]] = {}
        self._next_bucket = -1

    def restore(self, agents: Iterable[Agent], watermark: int) -> None:
        self.watermark = watermark
        for agent in agents:
            self.agents[agent.agent_id] = agent
            if agent.state == ALIVE and agent.status not in _LEAVING:
                self._schedule(agent, agent.last_seen + self.timeout_ms)

    def beat(self, agent_id: str, task_id: str, status: int, cpu: float, received: int) -> hb.AgentEvent | None:
        """Update the agent; returns a recovery event when it was stalled."""
        agent = self.agents.get(agent_id)
        if agent is None:
            agent = self.agents[agent_id] = Agent(agent_id)
        if received <= agent.last_seen:
            return None  # replayed or out of order: already reflected
        agent.last_seen = received
        agent.task_id = task_id
        agent.status = status
        agent.cpu = cpu
        event = None
        if agent.state == STALLED:
            event = self._event(agent, hb.RECOVERY, "returned", received, {"silence_ms": received - agent.episode})
            agent.episode = 0
        if status in _LEAVING:
            agent.state = LEFT
            self._unschedule(agent)
        else:
            agent.state = ALIVE
            self._schedule(agent, received + self.timeout_ms)
        return event

    def advance(self, watermark: int) -> list[hb.AgentEvent]:
        """Move the pipeline clock; returns a stall event for each agent whose deadline passed."""
        if watermark <= self.watermark:
            return []
        self.watermark = watermark
        last = watermark // BUCKET_MS
        if self._next_bucket < 0:
            self._next_bucket = min(self._wheel, default=last)
        events = []
        for bucket in range(self._next_bucket, last + 1):
            due = self._wheel.pop(bucket, None)
            if not due:
                continue
            for agent_id in due:
                agent = self.agents[agent_id]
                if agent.deadline > watermark:  # later in the current bucket
                    self._wheel.setdefault(bucket, set()).add(agent_id)
                    continue
                agent.bucket = -1
                events.append(self._stall(agent))
        self._next_bucket = last
        return events

    def _stall(self, agent: Agent) -> hb.AgentEvent:
        agent.state = STALLED
        agent.episode = agent.last_seen
        silence = self.watermark - agent.last_seen
        return self._event(
            agent, hb.STALL, "silent", self.watermark,
            {"timeout_s": self.timeout_ms / 1000, "silence_ms": silence},
        )

    def _event(self, agent: Agent, kind: int, reason: str, at: int, figures: dict[str, float]) -> hb.AgentEvent:
        episode = agent.episode or agent.last_seen
        name = "stall" if kind == hb.STALL else "recovery"
        return hb.AgentEvent(
            type=kind,
            agent_id=agent.agent_id,
            task_id=agent.task_id,
            reason=reason,
            last_seen_ms=agent.last_seen,
            detected_at_ms=at,
            event_id=f"{agent.agent_id}:{episode}:{name}",
            partition=self.partition,
            figures=figures,
        )

    def _schedule(self, agent: Agent, deadline: int) -> None:
        agent.deadline = deadline
        bucket = deadline // BUCKET_MS
        if bucket == agent.bucket:
            return
        self._unschedule(agent)
        agent.bucket = bucket
        self._wheel.setdefault(bucket, set()).add(agent.agent_id)
        if 0 <= self._next_bucket and bucket < self._next_bucket:
            self._next_bucket = bucket

    def _unschedule(self, agent: Agent) -> None:
        if agent.bucket >= 0:
            bucket = self._wheel.get(agent.bucket)
            if bucket is not None:
                bucket.discard(agent.agent_id)
            agent.bucket = -1
