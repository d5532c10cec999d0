"""A simulated fleet with controlled timing, for the detection benchmark and tests.

Every agent has its own schedule (interval with jitter); each tick sends the agents that are due in one
BeatBatch, so hundreds of agents cost one call per tick and their beat times stay precise. Agents can be
paused (a pause shorter than the timeout), killed (silent until revived), hung (CPU 0) or kept on one task.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time

from heartbeat_registry.pb import hb, hb_grpc

TICK_S = 0.01


@dataclasses.dataclass
class SimAgent:
    agent_id: str
    interval: float
    jitter: float
    task_id: str
    cpu: float = 0.5
    status: int = hb.RUNNING
    next_at: float = 0.0
    silent_until: float = 0.0  # monotonic; inf: killed
    last_received: int = 0  # server receive time of its last accepted beat
    beats: int = 0


class Fleet:
    def __init__(self, stub: hb_grpc.HeartbeatServiceStub, agents: list[str], interval: float, jitter: float = 0.5,
                 seed: int = 1) -> None:
        self.stub = stub
        self.rng = random.Random(seed)
        now = time.monotonic()
        self.agents = {
            a: SimAgent(a, interval, jitter, f"{a}-task", next_at=now + self.rng.uniform(0, interval)) for a in agents
        }
        self.sent = 0
        self.stop = asyncio.Event()
        self.errors: list[str] = []
        self.received: list[tuple[str, int]] = []  # (agent, receive time) of every accepted beat

    def kill(self, agent_id: str) -> int:
        """Silence `agent_id` until revived; returns the receive time of its last beat."""
        self.agents[agent_id].silent_until = float("inf")
        return self.agents[agent_id].last_received

    def pause(self, agent_id: str, seconds: float) -> None:
        self.agents[agent_id].silent_until = time.monotonic() + seconds

    def revive(self, agent_id: str) -> None:
        agent = self.agents[agent_id]
        agent.silent_until = 0.0
        agent.next_at = time.monotonic()

    async def leave(self) -> None:
        """Every agent says STOPPING: the silence after the run is no stall and no outage."""
        beats = [hb.Heartbeat(agent_id=a, task_id="", status=hb.STOPPING, timestamp=int(time.time() * 1000),
                              cpu_util=0.0) for a in self.agents]
        for first in range(0, len(beats), 1000):
            await self.stub.BeatBatch(hb.BeatBatchRequest(heartbeats=beats[first:first + 1000]), timeout=10)

    async def run(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            due = [a for a in self.agents.values() if a.next_at <= now and a.silent_until <= now]
            if due:
                beats = []
                for agent in due:
                    spread = agent.interval * agent.jitter
                    agent.next_at = now + agent.interval + self.rng.uniform(-spread, spread)
                    beats.append(hb.Heartbeat(agent_id=agent.agent_id, task_id=agent.task_id, status=agent.status,
                                              timestamp=int(time.time() * 1000), cpu_util=agent.cpu))
                try:
                    reply = await self.stub.BeatBatch(hb.BeatBatchRequest(heartbeats=beats), timeout=5)
                except Exception as exc:  # recorded: the tests assert there were none
                    self.errors.append(repr(exc))
                else:
                    for agent in due:
                        agent.last_received = reply.received_ms
                        agent.beats += 1
                        self.received.append((agent.agent_id, reply.received_ms))
                    self.sent += len(beats)
            await asyncio.sleep(TICK_S)
