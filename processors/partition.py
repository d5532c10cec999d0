"""Everything a worker holds for one partition of `heartbeats`: open window accumulators, liveness,
and the Kafka records it may not acknowledge yet.

Crash semantics: a record is acknowledged only once every window it fed has been closed and written
to the table, so the committed offset never passes data of an open window. After a crash or a
rebalance the partition is rebuilt from its table snapshot and the records after the committed
offset are replayed; heartbeats of windows the snapshot already closed are dropped, so every window
is counted exactly once, and liveness ignores beats it has already seen, so no event repeats.
"""

from __future__ import annotations

import zlib
from typing import Any

from heartbeat_registry.pb import hb
from processors.liveness import Agent, Liveness, Rules
from processors.windows import Accumulator

SNAPSHOT_CHUNKS = 16  # a partition's liveness snapshot is kept in this many table values


def chunk_of(agent_id: str) -> int:
    return zlib.crc32(agent_id.encode()) % SNAPSHOT_CHUNKS


class ClosedWindow:
    __slots__ = ("start", "end", "rows", "states")

    def __init__(self, start: int, end: int, rows: dict[str, Accumulator], states: dict[str, str]) -> None:
        self.start = start
        self.end = end
        self.rows = rows
        self.states = states  # agent -> liveness state at the window's close


class PartitionState:
    def __init__(self, partition: int, window_ms: int, rules: Rules) -> None:
        self.partition = partition
        self.window_ms = window_ms
        self.liveness = Liveness(partition, rules)
        self.open: dict[int, dict[str, Accumulator]] = {}  # window start -> agent -> accumulator
        self.closed_until = 0  # windows ending at or before this are final
        self.late = 0
        self.dirty: set[str] = set()  # agents changed since the last snapshot write
        self.touched: set[str] = set()  # agents that beat since the last publish to the query store
        self.changed: set[str] = set()  # agents whose liveness state changed since the last publish
        self.unpublished: list[ClosedWindow] = []
        self.offset = -1  # newest Kafka offset folded in since this state was built
        self._held: list[tuple[Any, int]] = []  # (faust event, newest window start it fed)

    # --- persistence --------------------------------------------------------------------------

    @classmethod
    def restore(
        cls, partition: int, window_ms: int, rules: Rules, meta: dict | None, chunks: list[dict | None]
    ) -> PartitionState:
        state = cls(partition, window_ms, rules)
        if meta:
            state.closed_until = meta["closed_until"]
            agents = (Agent.load(a, d) for chunk in chunks if chunk for a, d in chunk.items())
            state.liveness.restore(agents, meta["watermark"], meta.get("mass", {}))
        return state

    def snapshot_meta(self) -> dict[str, Any]:
        return {
            "closed_until": self.closed_until,
            "watermark": self.liveness.watermark,
            "mass": {str(k): sorted(v) for k, v in self.liveness.mass.items()},
        }

    def dirty_chunks(self) -> dict[int, dict[str, list[Any]]]:
        """The snapshot chunks holding changed agents, whole (a chunk is one table value)."""
        chunks = {chunk_of(a) for a in self.dirty}
        self.dirty.clear()
        if not chunks:
            return {}
        out: dict[int, dict[str, list[Any]]] = {c: {} for c in chunks}
        for agent in self.liveness.agents.values():
            chunk = out.get(chunk_of(agent.agent_id))
            if chunk is not None:
                chunk[agent.agent_id] = agent.dump()
        return out

    # --- processing ---------------------------------------------------------------------------

    def add(self, cols: hb.HeartbeatColumns) -> tuple[list[hb.AgentEvent], int]:
        """Fold one record's heartbeats in; returns (events, newest window start fed or -1)."""
        events = []
        newest = -1
        size = self.window_ms
        closed_until = self.closed_until
        liveness = self.liveness
        agents = liveness.agents
        open_windows = self.open
        touched = self.touched
        dirty = self.dirty
        for agent_id, task_id, status, cpu, received in zip(
            cols.agent_id, cols.task_id, cols.status, cols.cpu_util, cols.received_ms
        ):
            known = agents.get(agent_id)
            previous = known.last_seen if known is not None else 0
            event = liveness.beat(agent_id, task_id, status, cpu, received)
            if event is not None:
                events.append(event)
            touched.add(agent_id)
            dirty.add(agent_id)
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
        self.note(events)
        return events, newest

    def advance(self, watermark: int) -> tuple[list[hb.AgentEvent], list[ClosedWindow]]:
        """Move the pipeline clock: stall events, and the windows that ended at or before it."""
        liveness = self.liveness
        events = liveness.advance(watermark)
        closed = []
        for start in sorted(s for s in self.open if s + self.window_ms <= watermark):
            end = start + self.window_ms
            rows = self.open.pop(start)
            events.extend(liveness.window_closed(rows, start, end))
            states = {a: liveness.state_of(liveness.agents[a], end) for a in rows}
            closed.append(ClosedWindow(start, end, rows, states))
            self.closed_until = max(self.closed_until, end)
        if not closed and watermark - watermark % self.window_ms > self.closed_until:
            # idle partition: its clock still closes windows, so replays never reopen them
            self.closed_until = watermark - watermark % self.window_ms
        self.note(events)
        self.unpublished.extend(closed)
        return events, closed

    def note(self, events: list[hb.AgentEvent]) -> None:
        """Remember the agents these events changed, for the snapshot and the query store."""
        for event in events:
            changed = [event.agent_id] if event.agent_id else list(event.agent_ids)
            self.dirty.update(changed)
            self.changed.update(changed)

    def hold(self, event: Any, newest_window: int) -> None:
        self._held.append((event, newest_window))

    def releasable(self) -> list[Any]:
        """Held records whose windows are all closed: safe to acknowledge now."""
        ready = [e for e, w in self._held if w + self.window_ms <= self.closed_until]
        if ready:
            self._held = [(e, w) for e, w in self._held if w + self.window_ms > self.closed_until]
        return ready
