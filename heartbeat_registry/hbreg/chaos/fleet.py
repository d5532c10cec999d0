"""The soak's fleet: agents on the real client library (hbreg.simulate.Fleet) that know both ingest
replicas, with faults of their own, and a record of every heartbeat sent and every reply.

Agent faults, seeded like the schedule:
- killed: a working agent goes silent for good (no STOPPING): exactly one stall, and its task runs again
  on an idle agent;
- paused: silent for well under the stall timeout, then beating again: no stall;
- hung: goes on beating RUNNING with no CPU: one `hung` stall, and its task moves on.
A fifth of the agents start idle and take the tasks handed to them.
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import logging
import math
import random
import time
from collections.abc import Sequence

from heartbeat_registry.hbreg.simulate import Fleet
from heartbeat_registry.pb import hb

KILLED_SHARE = 0.03
PAUSED_SHARE = 0.05
HUNG_SHARE = 0.02
IDLE_SHARE = 0.2
JITTER = 0.2
RPC_TIMEOUT_S = 0.5
LOOP_TICK_S = 0.1  # how often the fleet's event loop is timed


@dataclasses.dataclass
class Record:
    """One agent's beats, by seq - 1 (the client numbers them 1, 2, 3...)."""

    sent: array.array = dataclasses.field(default_factory=lambda: array.array("d"))  # monotonic send time
    rtt: array.array = dataclasses.field(default_factory=lambda: array.array("d"))  # nan: no reply
    received: array.array = dataclasses.field(default_factory=lambda: array.array("q"))  # server time, 0: none
    silent: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (from, to) monotonic, on purpose
    # the client's failed calls: when (wall ms), which failure (Recorder.failures), the wait before the next
    failed_at: array.array = dataclasses.field(default_factory=lambda: array.array("q"))
    failure: array.array = dataclasses.field(default_factory=lambda: array.array("I"))
    retry_in: array.array = dataclasses.field(default_factory=lambda: array.array("f"))


class Recorder:
    def __init__(self) -> None:
        self.agents: dict[str, Record] = {}
        self.unmatched = 0  # replies to a seq never sent (must stay 0)
        self.wall_offset = time.time() - time.monotonic()  # wall = monotonic + this
        self.failures: list[tuple[str, str]] = []  # (endpoint, problem), each once
        self._failure_index: dict[tuple[str, str], int] = {}
        self.loop_at = array.array("q")  # wall ms of each tick of `time_loop`
        self.loop_lag = array.array("f")  # how much later than asked it woke up (s)

    async def time_loop(self) -> None:
        """Every agent of the fleet beats from this process's event loop: a 100 ms sleep that wakes up late
        is every beat due meanwhile sent late, which no part of the system caused."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(LOOP_TICK_S)
            now = time.monotonic()
            self.loop_at.append(int((now + self.wall_offset) * 1000))
            self.loop_lag.append(now - before - LOOP_TICK_S)

    def client_warning(self, record: logging.LogRecord) -> bool:
        """A filter on the clients' logger: a failed call is kept with its agent instead of printed (a
        soak makes tens of thousands a minute, and writing them out cost the run itself); errors pass."""
        agent = getattr(record, "agent_id", None)
        if agent is not None and record.levelno < logging.ERROR:
            key = (str(getattr(record, "endpoint", "")), str(getattr(record, "problem", "")))
            index = self._failure_index.get(key)
            if index is None:
                index = self._failure_index[key] = len(self.failures)
                self.failures.append(key)
            kept = self.agents.setdefault(agent, Record())
            kept.failed_at.append(int(record.created * 1000))
            kept.failure.append(index)
            kept.retry_in.append(float(getattr(record, "retry_in_s", math.nan)))
        return record.levelno >= logging.ERROR

    def sent(self, agent: str, beat: hb.Heartbeat) -> None:
        record = self.agents.setdefault(agent, Record())
        while len(record.sent) < beat.seq:  # a seq the client skipped would show as a beat never answered
            record.sent.append(time.monotonic())
            record.rtt.append(math.nan)
            record.received.append(0)

    def reply(self, agent: str, reply: hb.BeatReply) -> None:
        record = self.agents.get(agent)
        index = reply.seq - 1
        if record is None or not 0 <= index < len(record.sent):
            self.unmatched += 1
            return
        record.rtt[index] = time.monotonic() - record.sent[index]
        record.received[index] = reply.received_ms


@dataclasses.dataclass
class AgentFaults:
    killed: dict[str, float]  # agent -> seconds after the start
    paused: dict[str, list[float]]  # agent -> when (each pause lasts `pause_s`)
    hung: dict[str, float]
    pause_s: float


def agent_faults(
    agents: Sequence[str], working: Sequence[str], seed: int, first_s: float, last_s: float, timeout_s: float
) -> AgentFaults:
    """Which agents get which fault, and when (between `first_s` and `last_s` after the start)."""
    rng = random.Random(seed + 1)
    pool = list(working)
    rng.shuffle(pool)
    n_killed, n_hung = round(len(agents) * KILLED_SHARE), round(len(agents) * HUNG_SHARE)
    killed = {a: rng.uniform(first_s, last_s) for a in pool[:n_killed]}
    hung = {a: rng.uniform(first_s, last_s) for a in pool[n_killed : n_killed + n_hung]}
    others = [a for a in agents if a not in killed and a not in hung]
    paused = {
        a: sorted(rng.uniform(first_s, last_s) for _ in range(2))
        for a in rng.sample(others, round(len(agents) * PAUSED_SHARE))
    }
    # Paused for 0.3x the timeout: with the last interval before it (up to 1.2 s) and the reconnection,
    # silent well under the phi deadline of an agent beating every second +-20% (mean + 3 s + 5.2 sigma,
    # about 4.6 s at the default settings), which may rightly stall it before the hard timeout.
    return AgentFaults(killed, paused, hung, pause_s=0.3 * timeout_s)


class SoakFleet:
    def __init__(self, endpoints: Sequence[str], count: int, interval: float, seed: int) -> None:
        self.ids = [f"chaos-{i:05d}" for i in range(count)]
        idle = set(self.ids[: round(count * IDLE_SHARE)])
        self.tasks = {a: f"task-{a}" for a in self.ids if a not in idle}
        self.interval = interval
        self.recorder = Recorder()
        self.fleet = Fleet(
            list(endpoints),
            self.ids,
            interval,
            jitter=JITTER,
            seed=seed,
            task_of=lambda a: self.tasks.get(a, ""),
            on_sent=self.recorder.sent,
            on_reply=self.recorder.reply,
            # an agent that wants its beats acknowledged within a second gives up on a silent ingest
            # sooner than the default 5 s, and sends the beat again to the other one
            rpc_timeout=RPC_TIMEOUT_S,
        )
        for n, client in enumerate(self.fleet.agents.values()):
            # each agent lists the ingests in its own order, so the fleet starts spread over both (as
            # behind a load balancer) and a fault of one moves half of it, not all
            client.endpoints = (
                client.endpoints[n % len(client.endpoints) :] + client.endpoints[: n % len(client.endpoints)]
            )

    async def start(self) -> None:
        await self.fleet.start()

    async def run_faults(self, faults: AgentFaults, started: float) -> None:
        """Play the agent faults, `started` being the monotonic start of the soak."""

        async def at(offset: float) -> None:
            await asyncio.sleep(max(0.0, started + offset - time.monotonic()))

        async def kill(agent: str, offset: float) -> None:
            await at(offset)
            self._silent(agent, math.inf)
            await self.fleet.kill(agent)

        async def pause(agent: str, offset: float) -> None:
            await at(offset)
            self._silent(agent, time.monotonic() + faults.pause_s + 1.0)
            await self.fleet.kill(agent)
            await asyncio.sleep(faults.pause_s)
            await self.fleet.revive(agent)

        async def hang(agent: str, offset: float) -> None:
            await at(offset)
            client = self.fleet.agents[agent]
            task = client.task_id
            client.report(cpu=0.0)
            while client.task_id == task:  # until its task is taken away (ABANDON): then it works again
                await asyncio.sleep(0.5)
            client.report(cpu=0.5)

        jobs = [kill(a, t) for a, t in faults.killed.items()]
        jobs += [pause(a, t) for a, times in faults.paused.items() for t in times]
        jobs += [hang(a, t) for a, t in faults.hung.items()]
        await asyncio.gather(*jobs)

    def _silent(self, agent: str, until: float) -> None:
        # a beat in flight when the agent stops is not the system's fault either
        record = self.recorder.agents.setdefault(agent, Record())
        record.silent.append((time.monotonic() - 1.0, until))

    async def stop(self) -> None:
        await self.fleet.stop()
