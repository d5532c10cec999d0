"""The fault schedule of a soak: seeded, so the same seed and duration give the same faults at the same
moments, and printed with the results.

Faults come one at a time, `gap` seconds apart, so each one's recovery is measured on its own: each round
of the schedule has one fault of every kind in a seeded order, and rounds follow each other until the
cool-down before the end.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

# the process types killed (SIGKILL, started again at once, as a supervisor does) in every round
KILLED = ("ingest", "bridge", "worker", "reassign", "alerter", "query", "assigner")
PAUSED = ("ingest", "bridge", "worker")  # SIGSTOP, SIGCONT after PAUSE_S
PAUSE_S = 3.0
PARTITION_S = 10.0
# network faults on the proxies between a replica and what it talks to: (kind, proxy of, duration s)
NETWORK = (
    ("partition", "ingest", PARTITION_S),  # between an ingest and Redis
    ("partition", "bridge", PARTITION_S),  # between a bridge and Kafka
    ("latency", "ingest", 10.0),
    ("latency", "bridge", 10.0),
    ("reset", "ingest", 5.0),
    ("bandwidth", "bridge", 10.0),
)
WARMUP_S = 20.0  # every agent beat a while before the first fault
COOLDOWN_S = 25.0  # after the last fault: the system settles before the checks
MIN_GAP_S = 14.0  # a worker's partitions move after its 10 s session timeout: within one gap
MAX_GAP_S = 20.0


@dataclasses.dataclass
class Fault:
    kind: str  # kill, pause, valkey_restart, kafka_restart, partition, latency, reset, bandwidth
    target: str  # a process (`ingest.2`), `valkey`, `kafka`, or a proxy (`ingest.1-redis`, `bridge.2-kafka`)
    at_s: float  # seconds after the soak's start
    duration_s: float  # how long the fault lasts (0: a kill, the process is started again at once)
    start_ms: int = 0  # wall clock, when it was injected
    end_ms: int = 0  # wall clock, when the component was back
    recovery_s: float | None = None  # from `end_ms` until the affected stage worked again; None: never

    @property
    def label(self) -> str:
        """How the verdict names this one fault (`missed_by_fault`, `false_stalls_by_fault`)."""
        return f"{self.kind} {self.target} at {self.at_s:.0f} s"

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "at_s": round(self.at_s, 1),
            "start": self.start_ms,
            "end": self.end_ms,
            "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 2),
        }


def _round(rng: random.Random, replicas: dict[str, int]) -> list[tuple[str, str, float]]:
    """One fault of every kind, in a seeded order: (kind, target, duration)."""

    def replica(name: str) -> str:
        count = replicas.get(name, 1)
        return f"{name}.{rng.randint(1, count)}" if count > 1 else name

    faults = [("kill", replica(name), 0.0) for name in KILLED]
    faults += [("pause", replica(rng.choice(PAUSED)), PAUSE_S)]
    faults += [("valkey_restart", "valkey", 0.0), ("kafka_restart", "kafka", 0.0)]
    peer = {"ingest": "redis", "bridge": "kafka"}
    faults += [(kind, f"{replica(name)}-{peer[name]}", seconds) for kind, name, seconds in NETWORK]
    rng.shuffle(faults)
    return faults


def plan(seed: int, duration_s: float, replicas: dict[str, int]) -> list[Fault]:
    """The faults of a soak of `duration_s` seconds: at least one round (the gap shrinks to fit it, down to
    MIN_GAP_S), then as many more as fit, MAX_GAP_S apart at most."""
    rng = random.Random(seed)
    span = duration_s - WARMUP_S - COOLDOWN_S
    first = _round(rng, replicas)
    gap = min(MAX_GAP_S, max(MIN_GAP_S, span / len(first))) if span > 0 else MIN_GAP_S
    faults: list[Fault] = []
    pending = first
    at = WARMUP_S
    while at + gap <= WARMUP_S + span + 1e-9 or not faults:
        if not pending:
            pending = _round(rng, replicas)
        kind, target, seconds = pending.pop(0)
        faults.append(Fault(kind, target, at, seconds))
        at += gap
    return faults
