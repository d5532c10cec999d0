"""Everything a worker holds for one partition of `heartbeats`: open window accumulators, liveness,
and the Kafka records it may not acknowledge yet.

Crash semantics: a record is acknowledged only once every window it fed has been closed and written
to the table, so the committed offset never passes data of an open window. After a crash or a
rebalance the partition is rebuilt from its table snapshot and the records after the committed
offset are replayed; heartbeats of windows the snapshot already closed are dropped, so every window
is counted exactly once.
"""

from __future__ import annotations

from typing import Any

from heartbeat_registry.pb import hb
from processors.liveness import Agent, Liveness
from processors.windows import Accumulator


class ClosedWindow:
    __slots__ = ("start", "end", "rows")

    def __init__(self, start: int, end: int, rows: dict[str, Accumulator]) -> None:
        self.start = start
        self.end = end
        self.rows = rows


class PartitionState:
    def __init__(self, partition: int, window_ms: int, timeout_ms: int) -> None:
        self.partition = partition
        self.window_ms = window_ms
        self.liveness = Liveness(partition, timeout_ms)
        self.open: dict[int, dict[str, Accumulator]] = {}  # window start -> agent -> accumulator
        self.closed_until = 0  # windows ending at or before this are final
        self.late = 0
        self._held: list[tuple[Any, int]] = []  # (faust event, newest window start it fed)

    @classmethod
    def restore(cls, partition: int, window_ms: int, timeout_ms: int, snapshot: dict | None) -> PartitionState:
        state = cls(partition, window_ms, timeout_ms)
        if snapshot:
            state.closed_until = snapshot["closed_until"]
            state.liveness.restore(
                (Agent.load(a, d) for a, d in snapshot["agents"].items()), snapshot["watermark"]
            )
        return state

    def snapshot(self) -> dict[str, Any]:
        """What the table keeps for this partition: enough to resume detection after a restart."""
        return {
            "closed_until": self.closed_until,
            "watermark": self.liveness.watermark,
            "agents": {a.agent_id: a.dump() for a in self.liveness.agents.values()},
        }

    def add(self, cols: hb.HeartbeatColumns) -> tuple[list[hb.AgentEvent], int]:
        """Fold one record's heartbeats in; returns (recovery events, newest window start fed or -1)."""
        events = []
        newest = -1
        size = self.window_ms
        closed_until = self.closed_until
        liveness = self.liveness
        agents = liveness.agents
        open_windows = self.open
        for agent_id, task_id, status, cpu, received in zip(
            cols.agent_id, cols.task_id, cols.status, cols.cpu_util, cols.received_ms
        ):
            known = agents.get(agent_id)
            previous = known.last_seen if known is not None else 0
            event = liveness.beat(agent_id, task_id, status, cpu, received)
            if event is not None:
                events.append(event)
            if received < closed_until:
                self.late += 1
                continue
            start = received - received % size
            window = open_windows.get(start)
            if window is None:
                window = open_windows[start] = {}
            acc = window.get(agent_id)
            if acc is None:
                acc = window[agent_id] = Accumulator()
            acc.add(received, cpu, status, task_id, start, previous)
            if start > newest:
                newest = start
        return events, newest

    def advance(self, watermark: int) -> tuple[list[hb.AgentEvent], list[ClosedWindow]]:
        """Move the pipeline clock: stall events, and the windows that ended at or before it."""
        events = self.liveness.advance(watermark)
        closed = []
        for start in sorted(s for s in self.open if s + self.window_ms <= watermark):
            closed.append(ClosedWindow(start, start + self.window_ms, self.open.pop(start)))
            self.closed_until = max(self.closed_until, start + self.window_ms)
        if not closed and watermark - watermark % self.window_ms > self.closed_until:
            # idle partition: its clock still closes windows, so replays never reopen them
            self.closed_until = watermark - watermark % self.window_ms
        return events, closed

    def hold(self, event: Any, newest_window: int) -> None:
        self._held.append((event, newest_window))

    def releasable(self) -> list[Any]:
        """Held records whose windows are all closed: safe to acknowledge now."""
        ready = [e for e, w in self._held if w + self.window_ms <= self.closed_until]
        if ready:
            self._held = [(e, w) for e, w in self._held if w + self.window_ms > self.closed_until]
        return ready
