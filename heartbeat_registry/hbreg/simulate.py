"""Simulated agents, each driven by the real client library (`AsyncHeartbeatClient`), so the demo, the
detection benchmark and the acceptance tests exercise the code agents run.

`Fleet` holds the agents and the faults a test or benchmark injects into them: `kill` (silent, without
the STOPPING a clean exit sends, until `revive`), `pause` (silent for a while, shorter than the timeout),
and a task or CPU of the test's choosing (`report`); idle agents take the tasks assigned to them.
`run_demo` is what `hbreg simulate` and `hbreg up --demo` run: agents working through tasks, a share of
them stalling now and then, and taking over the tasks of the stalled ones when they are assigned them.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable, Sequence

from heartbeat_registry.client import Assignment, AsyncHeartbeatClient
from heartbeat_registry.errors import HeartbeatRejected, TaskAbandoned
from heartbeat_registry.pb import hb


class Fleet:
    """Agents beating every `interval` seconds (+- `jitter` of it), each over its own connection."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        agent_ids: Sequence[str],
        interval: float,
        jitter: float = 0.1,
        *,
        seed: int | None = None,
        token_for: Callable[[str], str] | None = None,
        task_of: Callable[[str], str] = lambda agent: f"{agent}-task",
        cpu: float = 0.5,
        take_assignments: bool = True,
        on_sent: Callable[[str, hb.Heartbeat], None] | None = None,
        on_reply: Callable[[str, hb.BeatReply], None] | None = None,
        rpc_timeout: float = 5.0,
    ) -> None:
        """`on_sent`/`on_reply`: (agent, heartbeat or reply) for a caller keeping every beat (hbreg chaos)."""
        self.errors: list[HeartbeatRejected] = []
        self.taken: list[tuple[str, Assignment]] = []  # (agent, assignment) in the order they were taken
        self.rng = random.Random(seed)
        self.agents = {
            agent: AsyncHeartbeatClient(
                agent,
                endpoints,
                token=token_for(agent) if token_for else None,
                interval=interval,
                jitter=jitter,
                sample_cpu=False,
                backoff_initial=0.1,
                backoff_max=2.0,
                rpc_timeout=rpc_timeout,
                on_error=self.errors.append,
                on_assign=self._taker(agent) if take_assignments else None,
                on_sent=functools.partial(on_sent, agent) if on_sent else None,
                on_reply=functools.partial(on_reply, agent) if on_reply else None,
            )
            for agent in agent_ids
        }
        for agent, client in self.agents.items():
            task = task_of(agent)
            client.report(task_id=task, status=hb.RUNNING if task else hb.IDLE, cpu=cpu)
        self._pauses: set[asyncio.Task[None]] = set()

    def _taker(self, agent: str) -> Callable[[Assignment], None]:
        """An idle agent takes a task assigned to it: it beats RUNNING on it, which makes it the owner."""

        def take(assignment: Assignment) -> None:
            client = self.agents[agent]
            if client.status == hb.IDLE:
                self.taken.append((agent, assignment))
                client.report(task_id=assignment.task_id, status=hb.RUNNING)

        return take

    @property
    def acknowledged(self) -> int:
        """Heartbeats the ingest acknowledged, over the whole fleet."""
        return sum(c.beats_acknowledged for c in self.agents.values())

    async def start(self) -> None:
        """Every agent starts beating, at a random moment of its first interval (no thundering herd)."""

        async def one(client: AsyncHeartbeatClient) -> None:
            await asyncio.sleep(self.rng.uniform(0, client.interval))
            await client.start()

        await asyncio.gather(*(one(c) for c in self.agents.values()))

    async def stop(self, leave: bool = True) -> None:
        """Every agent stops; with `leave` it says STOPPING first, so its silence is no stall or outage."""
        for task in self._pauses:
            task.cancel()
        await asyncio.gather(*(c.stop(leave) for c in self.agents.values()))

    async def kill(self, agent_id: str) -> int:
        """`agent_id` goes silent like a dead process; returns its last acknowledged beat's receive time
        (a beat in flight at that moment may still land just after it)."""
        client = self.agents[agent_id]
        await client.stop(leave=False)
        return client.last_reply_ms

    async def revive(self, agent_id: str) -> None:
        await self.agents[agent_id].start()

    def pause(self, agent_id: str, seconds: float) -> None:
        """`agent_id` is silent for `seconds`, then beats again."""

        async def pause() -> None:
            await self.kill(agent_id)
            await asyncio.sleep(seconds)
            await self.revive(agent_id)

        task = asyncio.create_task(pause())
        self._pauses.add(task)
        task.add_done_callback(self._pauses.discard)


async def _work(client: AsyncHeartbeatClient, rng: random.Random, stall_timeout: float, stalls: bool) -> None:
    """One demo agent: tasks of 20-60 s (RUNNING with noisy CPU and progress), a short IDLE between
    them; a stalling agent falls silent for 1.5-3x the stall timeout every 10-30 s, then comes back."""
    loop = asyncio.get_running_loop()
    next_stall = loop.time() + rng.uniform(3, 10)
    number = 0
    pending = None
    while True:
        number += 1
        offered = pending or client.next_assignment()  # a stalled agent's task, handed over, goes first
        pending = None
        task_id = offered.task_id if offered else f"{client.agent_id}-task-{number}"
        duration = rng.uniform(20, 60)
        base_cpu = rng.uniform(0.3, 0.9)
        began = loop.time()
        try:
            async with client.task(task_id):
                while (elapsed := loop.time() - began) < duration:
                    client.report(cpu=min(1.0, max(0.0, base_cpu + rng.gauss(0, 0.05))), progress=elapsed / duration)
                    if stalls and loop.time() >= next_stall:
                        await client.stop(leave=False)  # the process hangs: no beats, no goodbye
                        await asyncio.sleep(stall_timeout * rng.uniform(1.5, 3.0))
                        await client.start()
                        next_stall = loop.time() + rng.uniform(10, 30)
                    if offered is None and (pending := client.next_assignment()) is not None:
                        break  # handed a stalled agent's task: wrap up this one and take it
                    await asyncio.sleep(client.interval)
        except TaskAbandoned:
            pass  # reassigned to another agent while this one was silent: take the next task
        client.report(task_id="", status=hb.IDLE, cpu=rng.uniform(0.0, 0.05))
        if pending is None:
            await asyncio.sleep(client.interval * rng.randint(1, 3))


async def run_demo(
    endpoints: str | Sequence[str],
    agents: int,
    interval: float,
    stall_fraction: float,
    stall_timeout: float,
    prefix: str = "sim",
    seed: int | None = None,
    token_for: Callable[[str], str] | None = None,
) -> None:
    """`hbreg simulate`: `agents` working agents, `stall_fraction` of them stalling now and then."""
    rng = random.Random(seed)
    stalling = round(agents * stall_fraction)
    fleet = Fleet(
        endpoints,
        [f"{prefix}-{i:05d}" for i in range(agents)],
        interval,
        jitter=0.2,
        seed=seed,
        token_for=token_for,
        take_assignments=False,  # `_work` takes them between its own tasks
    )
    await fleet.start()
    try:
        await asyncio.gather(
            *(
                _work(client, random.Random(rng.random()), stall_timeout, i < stalling)
                for i, client in enumerate(fleet.agents.values())
            )
        )
    finally:
        await fleet.stop()
