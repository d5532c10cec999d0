"""Simulated agents for `hbreg simulate` and `hbreg up --demo`.

Each agent holds one BeatStream, works through tasks (RUNNING with noisy CPU, then COMPLETED, a short
IDLE, the next task) and beats every `interval` seconds with +-20% jitter. A `stall_fraction` of them
go silent from time to time for 1.5-3x the stall timeout and then come back, so a newcomer sees stall
and recovery events without doing anything.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable

import grpc

from heartbeat_registry.pb import hb, hb_grpc


class SimulatedAgent:
    def __init__(self, agent_id: str, interval: float, stalls: bool, stall_timeout: float, rng: random.Random) -> None:
        self.agent_id = agent_id
        self.interval = interval
        self.stalls = stalls
        self.stall_timeout = stall_timeout
        self.rng = rng
        self.seq = 0
        self.task_no = 0
        self.abandoned: set[str] = set()

    def _beat(self, task_id: str, status: int, cpu: float, progress: float | None = None) -> hb.Heartbeat:
        self.seq += 1
        beat = hb.Heartbeat(
            agent_id=self.agent_id,
            task_id=task_id,
            status=status,
            timestamp=time.time_ns() // 1_000_000,
            cpu_util=max(0.0, min(1.0, cpu)),
            seq=self.seq,
        )
        if progress is not None:
            beat.progress = progress
        return beat

    async def _sleep(self) -> None:
        await asyncio.sleep(self.interval * self.rng.uniform(0.8, 1.2))

    async def beats(self) -> AsyncIterator[hb.Heartbeat]:
        next_stall = time.monotonic() + self.rng.uniform(3, 10)
        while True:
            self.task_no += 1
            task_id = f"{self.agent_id}-task-{self.task_no}"
            duration = self.rng.uniform(20, 60)
            began = time.monotonic()
            base_cpu = self.rng.uniform(0.3, 0.9)
            while (elapsed := time.monotonic() - began) < duration and task_id not in self.abandoned:
                if self.stalls and time.monotonic() >= next_stall:
                    await asyncio.sleep(self.stall_timeout * self.rng.uniform(1.5, 3.0))
                    next_stall = time.monotonic() + self.rng.uniform(10, 30)
                yield self._beat(task_id, hb.RUNNING, base_cpu + self.rng.gauss(0, 0.05), elapsed / duration)
                await self._sleep()
            yield self._beat(task_id, hb.COMPLETED, 0.05, 1.0)
            for _ in range(self.rng.randint(1, 3)):
                await self._sleep()
                yield self._beat("", hb.IDLE, self.rng.uniform(0.0, 0.05))

    async def run(self, channel: grpc.aio.Channel, metadata: tuple = ()) -> None:
        stub = hb_grpc.HeartbeatServiceStub(channel)
        backoff = 0.5
        while True:
            try:
                call = stub.BeatStream(self.beats(), metadata=metadata)
                async for reply in call:
                    backoff = 0.5
                    for directive in reply.directives:
                        if directive.kind == hb.Directive.ABANDON:
                            self.abandoned.add(directive.task_id)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.PERMISSION_DENIED):
                    raise
            await asyncio.sleep(backoff * self.rng.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 10.0)


async def run_fleet(
    grpc_addr: str,
    agents: int,
    interval: float,
    stall_fraction: float,
    stall_timeout: float,
    prefix: str = "sim",
    seed: int | None = None,
    token_for: Callable[[str], str] | None = None,
) -> None:
    """`token_for(agent_id)` gives each simulated agent its own bearer token (when auth is on)."""
    rng = random.Random(seed)
    stalling = round(agents * stall_fraction)
    async with grpc.aio.insecure_channel(grpc_addr) as channel:
        fleet = [
            SimulatedAgent(f"{prefix}-{i:05d}", interval, i < stalling, stall_timeout, random.Random(rng.random()))
            for i in range(agents)
        ]
        await asyncio.gather(
            *(a.run(channel, (("authorization", f"Bearer {token_for(a.agent_id)}"),) if token_for else ()) for a in fleet)
        )
