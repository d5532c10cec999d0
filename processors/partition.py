"""Everything a worker holds for one partition of `heartbeats`: open window stats, liveness, and the
Kafka records it may not acknowledge yet. This docstring is where the acknowledgement protocol lives.

## Which records may be acknowledged when (the worker's ack/commit protocol)

faust commits, every second, the offset after the newest record acknowledged in an unbroken run from the
committed one. The invariant this protocol keeps: **everything before the committed offset of a
partition is reflected in the tables** (the `windows` rows of every window it fed, and the `snapshots`
meta whose `next_offset` is at least that offset). So a crash at any moment replays exactly what the
tables lack, and nothing is counted twice or lost.

1. A record is held (`hold`) once folded in, and released (`releasable`) only in offset order.
2. A record that fed an open window is released once that window is closed (the pipeline clock passed
   its end by the grace) and all its rows are written to `windows`. Closing a window writes one row per
   agent; for a large fleet those rows go out a few chunks per record processed
   (`WINDOW_CHUNKS_PER_RECORD`), not all at once (one burst of megabytes into the changelog held up the
   consumer for a second or more); when records stop coming meanwhile, the worker sends the partition a
   watermark tick of its own (processors/app.py) so the writes, and the releases, complete.
3. A record that fed no open window (a watermark tick, a late or undecodable record) is released once the
   windows closed so far are written, so a quiet partition's ticks are committed too.
4. Before any release, the snapshot chunks of agents changed since their last write (written with
   every event too, and otherwise at most once a second, processors/app.py) and the snapshot meta
   (`next_offset` = the oldest record still held, the pipeline clock, the windows written) are written:
   the table write precedes the commit it covers.

## Recovery

When a worker starts or gains a partition (after a crash, or from another worker), the partition is
rebuilt from its snapshot (agents' states, written within a second of a change) and the last written window rows
(their newest beats), and the records after the committed offset are replayed; heartbeats of windows
already written are dropped, so every window is counted exactly once, and liveness ignores beats it has
already seen, so no event repeats. A partition the worker keeps through a rebalance keeps its state.

Records must be folded in strictly in offset order: the state knows the next record it needs
(`next_offset`), and `place()` tells older records (replays after faust sought back to the committed
offset: already folded in) and records ahead of it from the one it needs. Folding a record from ahead
first would move the pipeline clock past every agent whose beats sit in the records in between, and
stall them all.

faust commits only an unbroken run of acknowledged offsets from the committed one, and replays are
dropped here, not acknowledged again. So records the tables hold but the committed offset does not
cover would stop that partition's commits for good: a state restored from a snapshot written after
the last commit (the snapshot meta is written before the acknowledgements, faust commits once a
second), and a state kept through a rebalance, whose acknowledgements since the last commit faust
forgot when it revoked the partition. The worker tells faust those records are done (`settled_until`,
reported as a gap once faust knows the committed offset).

Records come ahead of the one needed after a rebalance: faust drops records delivered while the group
rebalances, and records fetched before its seek to the committed offset can arrive after it; faust's
consumer then drops the records fetched again as older than the newest it delivered, so they would
never come. While records come ahead, the worker seeks the partition to `next_offset` itself
(`seek_due`: at once, then every `SEEK_AGAIN_S`). Only if the records still do not come within
`EARLY_WAIT_S` (deleted by retention while the partition had no worker, or committed outside this worker)
does it go on without them, giving every agent a full deadline from there.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

from heartbeat_registry.core.windowstats import WindowStats
from heartbeat_registry.pb import hb
from processors.liveness import Agent, Liveness, Rules

SNAPSHOT_CHUNKS = 16  # a partition's liveness snapshot is kept in this many table values
ROWS_PER_CHUNK = 1000  # window rows per `windows` table value
# How long records may come ahead of the one a partition needs before it goes on without the missing
# ones: after a rebalance the worker's seeks back brought them within 1.5 s in every restart measured.
EARLY_WAIT_S = 3.0
# while records come ahead, the partition is sought back to the one needed at once and then this often:
# records fetched before a seek can still arrive after it and hide the ones fetched again
SEEK_AGAIN_S = 0.2


def chunk_of(agent_id: str) -> int:
    return zlib.crc32(agent_id.encode()) % SNAPSHOT_CHUNKS


class ClosedWindow:
    __slots__ = ("start", "end", "rows", "states", "pending", "chunks")

    def __init__(self, start: int, end: int, rows: dict[str, WindowStats], states: dict[str, str]) -> None:
        self.start = start
        self.end = end
        self.rows = rows
        self.states = states  # agent -> liveness state at the window's close
        self.pending: list[str] | None = None  # agents whose row is not published yet
        agents = list(rows)
        # (chunk number, agents) still to write to the `windows` table
        self.chunks = [
            (n // ROWS_PER_CHUNK, agents[n : n + ROWS_PER_CHUNK]) for n in range(0, len(agents), ROWS_PER_CHUNK)
        ]


def beats_of(cols: hb.HeartbeatColumns) -> Iterator[tuple[str, str, int, float, int, int, int]]:
    """(agent, task, status, cpu, received, seq, agent timestamp) of each heartbeat of a record; seq and
    timestamp 0 where a record lacks those columns."""
    n = len(cols.agent_id)
    seqs: Iterable[int] = cols.seq if len(cols.seq) == n else itertools.repeat(0, n)
    sent: Iterable[int] = cols.timestamp if len(cols.timestamp) == n else itertools.repeat(0, n)
    return zip(cols.agent_id, cols.task_id, cols.status, cols.cpu_util, cols.received_ms, seqs, sent, strict=False)


def judge(liveness: Liveness, cols: hb.HeartbeatColumns, closed: list[ClosedWindow]) -> list[hb.AgentEvent]:
    """What `PartitionState.fold` decides about one record, for another set of rules: the same beats,
    then the same clock, then the windows that fold closed (windows do not depend on the rules), in
    fold's order. `hbreg tune` judges every extra parameter set this way, so the windows are counted once
    for all of them; a test keeps it equal to `fold`."""
    events = []
    agents = liveness.agents
    for agent_id, task_id, status, cpu, received, seq, sent in beats_of(cols):
        known = agents.get(agent_id)
        if known is not None and known.repeated(seq, sent):
            continue
        event = liveness.beat(agent_id, task_id, status, cpu, received, seq, sent)
        if event is not None:
            events.append(event)
    events.extend(liveness.advance(cols.watermark_ms))
    for window in closed:
        events.extend(liveness.window_closed(window.rows, window.start, window.end))
    liveness.changed.clear()
    return events


class PartitionState:
    def __init__(self, partition: int, window_ms: int, rules: Rules, grace_ms: int = 0) -> None:
        self.partition = partition
        self.window_ms = window_ms
        # A window closes this long after the pipeline clock passed its end: a heartbeat is stamped when
        # the ingest receives it, and one the ingest was slow to store (a loop or GC pause longer than the
        # bridge's watermark slack) may reach the bridge after the watermark passed its receive time.
        self.grace_ms = grace_ms
        self.liveness = Liveness(partition, rules)
        self.open: dict[int, dict[str, WindowStats]] = {}  # window start -> agent -> accumulator
        self.closed_until = 0  # windows ending at or before this are final
        self.late = 0  # heartbeats dropped because their window was closed (replays, or later than the grace)
        self.repeats = 0  # heartbeats stored twice (sent again to another ingest), counted once
        self.dirty: set[str] = set()  # agents changed since the last snapshot write
        self.touched: set[str] = set()  # agents that beat since the last publish to the query store
        self.changed: set[str] = set()  # agents whose liveness state changed since the last publish
        self.shown: set[str] = set()  # agents whose liveness view the query store has
        self.unpublished: list[ClosedWindow] = []
        self.unwritten: list[ClosedWindow] = []  # closed, rows not all in the `windows` table yet
        self.next_offset = 0  # the Kafka offset of the next record to fold in
        self.missed: tuple[int, int] | None = None  # offsets [from, to) gone on without, not yet reported
        self._early_since: float | None = None  # when records began to come ahead of next_offset
        self._sought_at: float | None = None  # when the partition was last sought back to next_offset
        # records before this are in the tables, not yet reported to faust as done (Recovery)
        self.settled_until: int | None = None
        self._held: list[tuple[Any, int, int]] = []  # (faust event, its offset, window start it waits for)

    # --- persistence --------------------------------------------------------------------------

    @classmethod
    def restore(
        cls,
        partition: int,
        window_ms: int,
        rules: Rules,
        meta: dict | None,
        chunks: list[dict | None],
        seen: dict[str, int],
        grace_ms: int = 0,
    ) -> PartitionState:
        """`seen`: agent -> newest last beat in the written window rows."""
        state = cls(partition, window_ms, rules, grace_ms)
        meta = meta or {}
        state.closed_until = meta.get("closed_until", 0)
        state.next_offset = meta.get("next_offset", 0)
        state.settle()  # the snapshot's records are in the tables; the commit may be behind them
        # agents are in the chunks from their first beat on, before any window closed
        agents = (Agent.load(a, d) for chunk in chunks if chunk for a, d in chunk.items())
        state.liveness.restore(agents, meta.get("watermark", 0), meta.get("mass", {}), seen, meta.get("gap_end", 0))
        state.liveness.changed.clear()
        return state

    @property
    def written_until(self) -> int:
        """Windows ending at or before this are closed and written: their records may be acknowledged."""
        return self.unwritten[0].start if self.unwritten else self.closed_until

    def in_tables_until(self) -> int:
        """Records before this offset are reflected in the tables (rule 4)."""
        return self._held[0][1] if self._held else self.next_offset

    def settle(self) -> None:
        """Restored, or kept through a rebalance: faust's committed offset may be behind what the tables
        hold, and it does not know those records are done (Recovery)."""
        self.settled_until = self.in_tables_until()

    def snapshot_meta(self) -> dict[str, Any]:
        return {
            "next_offset": self.in_tables_until(),
            "closed_until": self.written_until,
            "watermark": self.liveness.watermark,
            "mass": {str(k): sorted(v) for k, v in self.liveness.mass.items()},
            "gap_end": self.liveness.gap_end,
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

    def fold(self, cols: hb.HeartbeatColumns) -> tuple[list[hb.AgentEvent], int]:
        """One record, as the worker folds it: its heartbeats, then its watermark. Returns (events, newest
        window start fed or -1). `hbreg tune` replays records through this, so it judges as the workers do."""
        events, newest = self.add(cols)
        more, _ = self.advance(cols.watermark_ms)
        events.extend(more)
        return events, newest

    def forget_outputs(self) -> None:
        """Drop what only the worker writes out (window rows, snapshot and publish marks): a replay keeps
        the judgement and nothing else."""
        self.unpublished.clear()
        self.unwritten.clear()
        self.dirty.clear()
        self.touched.clear()
        self.changed.clear()

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
        for agent_id, task_id, status, cpu, received, seq, sent in beats_of(cols):
            known = agents.get(agent_id)
            if known is not None and known.repeated(seq, sent):
                self.repeats += 1
                continue
            previous = known.last_seen if known is not None else 0
            event = liveness.beat(agent_id, task_id, status, cpu, received, seq, sent)
            if event is not None:
                events.append(event)
            touched.add(agent_id)
            if received < closed_until:
                self.late += 1
                continue
            start = received - received % size
            window = open_windows.get(start)
            if window is None:
                window = open_windows[start] = {}
            acc = window.get(agent_id)
            if acc is None:
                acc = window[agent_id] = WindowStats()
            acc.add(received, cpu, status, task_id, start, previous)
            if start > newest:
                newest = start
        self._take_changes()
        return events, newest

    def advance(self, watermark: int) -> tuple[list[hb.AgentEvent], list[ClosedWindow]]:
        """Move the pipeline clock: stall events, and the windows that ended at or before it."""
        liveness = self.liveness
        events = liveness.advance(watermark)
        closed = []
        closing = watermark - self.grace_ms  # windows ending at or before this close now
        for start in sorted(s for s in self.open if s + self.window_ms <= closing):
            end = start + self.window_ms
            rows = self.open.pop(start)
            events.extend(liveness.window_closed(rows, start, end))
            states = {a: liveness.state_of(liveness.agents[a], end) for a in rows}
            closed.append(ClosedWindow(start, end, rows, states))
            self.closed_until = max(self.closed_until, end)
        if not closed and closing - closing % self.window_ms > self.closed_until:
            # idle partition: its clock still closes windows, so replays never reopen them
            self.closed_until = closing - closing % self.window_ms
        self._take_changes()
        self.unpublished.extend(closed)
        self.unwritten.extend(closed)
        return events, closed

    def next_window_chunks(self, limit: int) -> list[tuple[ClosedWindow, int, dict[str, list[Any]]]]:
        """Up to `limit` (window, chunk, rows) to write to the `windows` table now, oldest first."""
        out: list[tuple[ClosedWindow, int, dict[str, list[Any]]]] = []
        while self.unwritten and len(out) < limit:
            window = self.unwritten[0]
            if window.chunks:
                chunk, agents = window.chunks.pop(0)
                out.append((window, chunk, {a: window.rows[a].summary() for a in agents}))
            if not window.chunks:
                self.unwritten.pop(0)
        return out

    def _take_changes(self) -> None:
        """Agents whose state changed: for the snapshot and the query store."""
        changed = self.liveness.changed
        if changed:
            self.dirty |= changed
            self.changed |= changed
            changed.clear()

    def place(self, offset: int, now: float, committed: int | None) -> int:
        """-1: already folded in; 0: fold it in now; 1: early, drop it.

        `now`: a monotonic clock; `committed`: the partition's committed offset as the consumer last
        sought to or committed it (None during a rebalance). Should it have passed records this state
        never saw (only the worker's own acknowledgements count, faust_adapter.py hook 6, so that takes
        a commit made outside this worker), they will not come again, and it goes on without them."""
        if offset < self.next_offset:
            return -1
        if offset > self.next_offset:
            lost = committed is not None and self.next_offset < committed <= offset
            if not lost:
                if self._early_since is None:
                    self._early_since = now
                if now - self._early_since < EARLY_WAIT_S:
                    return 1
            self.missed = (self.next_offset, offset)
            # beats in the missed records are unknown: no agent is judged silent on account of them
            self.liveness.blind = True
        self._early_since = self._sought_at = None
        return 0

    def seek_due(self, now: float) -> bool:
        """Whether to seek the partition back to `next_offset` now, a record having come early."""
        if self._sought_at is not None and now - self._sought_at < SEEK_AGAIN_S:
            return False
        self._sought_at = now
        return True

    def hold(self, event: Any, offset: int, newest_window: int) -> None:
        """Keep `event` (offset `offset`, folded in) unacknowledged until the windows it fed are written
        (rule 2); one that fed no open window (`newest_window` < 0) waits only for the windows closed so
        far (rule 3)."""
        self.next_offset = offset + 1
        waits_for = newest_window if newest_window >= 0 else self.closed_until - self.window_ms
        self._held.append((event, offset, waits_for))

    def releasable(self) -> list[Any]:
        """The oldest held records whose windows are all closed and written: safe to acknowledge now.
        Only a prefix, in offset order: faust commits past every acknowledged offset it can."""
        until = self.written_until
        ready = 0
        for _, _, window in self._held:
            if window + self.window_ms > until:
                break
            ready += 1
        out = [e for e, _, _ in self._held[:ready]]
        del self._held[:ready]
        return out
