"""Per-agent window aggregates: what one agent did in one tumbling window.

The workers fold heartbeats into them and publish them; readers merge and summarise them. They hold
only sums and a coarse CPU histogram, so they merge: a hopping window (60 s every 10 s) is the merge of
its tumbling windows, not a second pass over the heartbeats. The histogram has one bin per 0.01 of CPU,
which makes p95 exact to 0.01.
"""

from __future__ import annotations

from typing import Any

HIST_BINS = 100  # bin i holds cpu in [i/100, (i+1)/100); 1.0 falls in the last bin


class WindowStats:
    __slots__ = (
        "beats",
        "cpu_sum",
        "cpu_min",
        "cpu_max",
        "first_seen",
        "last_seen",
        "longest_gap",
        "st",
        "stt",
        "sc",
        "stc",
        "hist",
        "statuses",
        "task_id",
        "status",
    )

    def __init__(self) -> None:
        self.beats = 0
        self.cpu_sum = 0.0
        self.cpu_min = 1.0
        self.cpu_max = 0.0
        self.first_seen = 0
        self.last_seen = 0
        self.longest_gap = 0
        # least-squares sums over (t minutes since window start, cpu)
        self.st = self.stt = self.sc = self.stc = 0.0
        self.hist: dict[int, int] = {}
        self.statuses: dict[int, int] = {}
        self.task_id = ""
        self.status = 0

    def add(self, received: int, cpu: float, status: int, task_id: str, start: int, previous_seen: int) -> None:
        """Count one heartbeat; `previous_seen` is the agent's beat before it (any window), for gaps."""
        self.beats += 1
        self.cpu_sum += cpu
        if cpu < self.cpu_min:
            self.cpu_min = cpu
        if cpu > self.cpu_max:
            self.cpu_max = cpu
        if not self.first_seen:
            self.first_seen = received
        if previous_seen and received - previous_seen > self.longest_gap:
            self.longest_gap = received - previous_seen
        if received > self.last_seen:
            self.last_seen = received
            self.task_id = task_id
            self.status = status
        t = (received - start) / 60_000.0
        self.st += t
        self.stt += t * t
        self.sc += cpu
        self.stc += t * cpu
        b = int(cpu * HIST_BINS)
        if b >= HIST_BINS:  # cpu 1.0 (a comparison, not min(): this runs for every heartbeat)
            b = HIST_BINS - 1
        hist = self.hist
        hist[b] = hist.get(b, 0) + 1
        statuses = self.statuses
        statuses[status] = statuses.get(status, 0) + 1

    def merge(self, other: WindowStats, shift_min: float) -> None:
        """Fold `other` in; its times are `shift_min` minutes after this accumulator's start."""
        if not other.beats:
            return
        n = other.beats
        self.beats += n
        self.cpu_sum += other.cpu_sum
        self.cpu_min = min(self.cpu_min, other.cpu_min)
        self.cpu_max = max(self.cpu_max, other.cpu_max)
        self.first_seen = min(self.first_seen or other.first_seen, other.first_seen)
        self.longest_gap = max(self.longest_gap, other.longest_gap)
        if other.last_seen > self.last_seen:
            self.last_seen, self.task_id, self.status = other.last_seen, other.task_id, other.status
        # shift t by s: sum(t+s) = st + n s; sum((t+s)^2) = stt + 2 s st + n s^2; sum((t+s) c) = stc + s sc
        s = shift_min
        self.stt += other.stt + 2 * s * other.st + n * s * s
        self.st += other.st + n * s
        self.stc += other.stc + s * other.sc
        self.sc += other.sc
        for b, c in other.hist.items():
            self.hist[b] = self.hist.get(b, 0) + c
        for k, c in other.statuses.items():
            self.statuses[k] = self.statuses.get(k, 0) + c

    def cpu_mean(self) -> float:
        return round(self.cpu_sum / self.beats, 4) if self.beats else 0.0

    def p95(self) -> float:
        if not self.beats:
            return 0.0
        rank = 0.95 * self.beats
        seen = 0
        for b in sorted(self.hist):
            seen += self.hist[b]
            if seen >= rank:
                return min((b + 1) / HIST_BINS, self.cpu_max)
        return self.cpu_max

    def slope_per_min(self) -> float:
        n = self.beats
        denom = n * self.stt - self.st * self.st
        if n < 2 or abs(denom) < 1e-12:
            return 0.0
        return (n * self.stc - self.st * self.sc) / denom

    def summary(self) -> list[Any]:
        """The window's row in the faust `windows` table: small, because every window close writes one
        per agent to the changelog: [beats, cpu_mean, cpu_min, cpu_max, last_seen, longest_gap, task_id, status]."""
        return [
            self.beats,
            self.cpu_mean(),
            round(self.cpu_min, 4),
            round(self.cpu_max, 4),
            self.last_seen,
            self.longest_gap,
            self.task_id,
            self.status,
        ]

    # full form, for the query store (JSON): flat, so dumping is cheap
    def dump(self) -> list[Any]:
        flat_hist = [x for item in self.hist.items() for x in item]
        flat_statuses = [x for item in self.statuses.items() for x in item]
        return [
            self.beats,
            self.cpu_sum,
            self.cpu_min,
            self.cpu_max,
            self.first_seen,
            self.last_seen,
            self.longest_gap,
            self.st,
            self.stt,
            self.sc,
            self.stc,
            self.task_id,
            self.status,
            flat_hist,
            flat_statuses,
        ]

    @classmethod
    def load(cls, data: list[Any]) -> WindowStats:
        acc = cls()
        (
            acc.beats,
            acc.cpu_sum,
            acc.cpu_min,
            acc.cpu_max,
            acc.first_seen,
            acc.last_seen,
            acc.longest_gap,
            acc.st,
            acc.stt,
            acc.sc,
            acc.stc,
            acc.task_id,
            acc.status,
            hist,
            statuses,
        ) = data
        acc.hist = dict(zip(hist[::2], hist[1::2], strict=True))
        acc.statuses = dict(zip(statuses[::2], statuses[1::2], strict=True))
        return acc
