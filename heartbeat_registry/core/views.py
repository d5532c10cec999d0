"""What readers read from Redis, defined once: the ingest's registry entry of each agent and what the
workers publish for the query API and the sinks (each agent's liveness view, window rows, each
partition's clock), plus the rules a reader applies to them (phi and `suspect`), so that the worker and
every reader compute them the same way.

The workers write these with `encode()`, readers parse them with `decode()`; nobody else knows the
layout. Values are compact JSON arrays (orjson), because a worker rewrites thousands of them a second.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import orjson

from heartbeat_registry.core.windowstats import WindowStats
from heartbeat_registry.pb import hb

ALIVE, SUSPECT, STALLED, RECOVERED, LEFT = "alive", "suspect", "stalled", "recovered", "left"
STATES = (ALIVE, SUSPECT, STALLED, RECOVERED, LEFT)


def phi(silence_ms: float, mean_ms: float, std_ms: float) -> float:
    """Akka's phi: -log10 of the probability that a beat still comes after `silence_ms`, for beat
    intervals modelled as a normal distribution (Akka's logistic approximation of its tail)."""
    y = (silence_ms - mean_ms) / std_ms
    e = math.exp(-y * (1.5976 + 0.070566 * y * y)) if y > -20 else math.inf
    if silence_ms > mean_ms:
        return -math.log10(e / (1.0 + e)) if e > 0 else 300.0
    return max(0.0, -math.log10(1.0 - 1.0 / (1.0 + e)))


def phi_at(state: str, last_seen: int, model: tuple[float, float] | None, at: int) -> float:
    """An agent's phi at pipeline time `at`; 0 without a model (too few beats yet) or once it left."""
    if model is None or state == LEFT:
        return 0.0
    return round(phi(max(0, at - last_seen), *model), 3)


def reported_state(state: str, silence_ms: int, phi_now: float, timeout_ms: int, phi_suspect: float) -> str:
    """The state shown to people: `suspect` is an alive agent whose phi or silence (half the hard
    timeout) is past the warning level; the detector itself knows only alive and stalled."""
    if state == ALIVE and (silence_ms >= timeout_ms / 2 or phi_now >= phi_suspect):
        return SUSPECT
    return state


class RegistryEntry(NamedTuple):
    """An agent's latest heartbeat as the ingest stores it in the shard's `latest` hash.

    Stored as one short text, readable in `redis-cli`: `received_ms status cpu_milli timestamp
    progress_milli task_id` (cpu and progress in thousandths, progress `-` when not reported). The
    ingest's WRITE_SHARD script (ingest/scripts.py) is the only writer.
    """

    agent_id: str
    task_id: str
    status: int
    cpu_util: float
    timestamp: int
    progress: float | None
    last_seen_ms: int

    @classmethod
    def decode(cls, agent_id: str, raw: str | bytes) -> RegistryEntry:
        text = raw.decode() if isinstance(raw, bytes) else raw
        received, status, cpu, timestamp, progress, task_id = text.split(" ", 5)
        return cls(
            agent_id,
            task_id,
            int(status),
            int(cpu) / 1000,
            int(timestamp),
            None if progress == "-" else int(progress) / 1000,
            int(received),
        )


class AgentView(NamedTuple):
    """A worker's liveness view of one agent: hash `query_agents(partition)`, field agent_id."""

    task_id: str
    status: int
    cpu: float
    last_seen: int  # server receive time of its last beat the worker folded in
    state: str  # alive, stalled, recovered or left (suspect is derived: `state_at`)
    reason: str  # why it is stalled
    since: int  # pipeline time the state began
    mean_ms: float | None  # the phi model (None while the history is too short)
    std_ms: float | None

    def encode(self) -> bytes:
        return orjson.dumps(tuple(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> AgentView:
        return cls(*orjson.loads(raw))

    @property
    def model(self) -> tuple[float, float] | None:
        return None if self.mean_ms is None or self.std_ms is None else (self.mean_ms, self.std_ms)

    def phi_at(self, at: int) -> float:
        return phi_at(self.state, self.last_seen, self.model, at)

    def state_at(self, at: int, timeout_ms: int, phi_suspect: float) -> str:
        return reported_state(self.state, max(0, at - self.last_seen), self.phi_at(at), timeout_ms, phi_suspect)


class WindowRow(NamedTuple):
    """One agent's tumbling window: hash `query_windows(partition, start)` once closed (`final`), and
    `query_open(partition, start)` (stats only, state empty) while it is open."""

    start: int
    end: int
    state: str  # the agent's liveness state when the window closed; empty while open
    stats: WindowStats

    def encode(self) -> bytes:
        return orjson.dumps([self.start, self.end, self.state, self.stats.dump()])

    @classmethod
    def decode(cls, raw: bytes | str) -> WindowRow:
        start, end, state, dump = orjson.loads(raw)
        return cls(start, end, state, WindowStats.load(dump))

    @staticmethod
    def encode_open(stats: WindowStats) -> bytes:
        return orjson.dumps(stats.dump())

    @classmethod
    def decode_open(cls, raw: bytes | str, start: int, end: int) -> WindowRow:
        return cls(start, end, "", WindowStats.load(orjson.loads(raw)))


class PartitionClock(NamedTuple):
    """A partition's pipeline clock: hash `query_clock`, field partition number."""

    watermark: int  # pipeline time (the bridge's watermark) the worker had reached
    published_ms: int  # the worker's wall clock when it published

    def encode(self) -> bytes:
        return orjson.dumps(tuple(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> PartitionClock:
        return cls(*orjson.loads(raw))


def status_name(status: int) -> str:
    return hb.Status.Name(status) if status in hb.Status.values() else str(status)
