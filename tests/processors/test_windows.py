"""Window aggregates as pure logic."""

from __future__ import annotations

import pytest

from heartbeat_registry.core.windowstats import WindowStats
from heartbeat_registry.pb import hb
from processors.liveness import Rules
from processors.partition import EARLY_WAIT_S, SEEK_AGAIN_S, PartitionState

RULES = Rules(timeout_ms=60_000)


def test_aggregates() -> None:
    acc = WindowStats()
    previous = 0
    cpus = [0.1, 0.2, 0.3, 0.4, 0.5]
    for i, cpu in enumerate(cpus):
        received = 1000 + i * 1000
        acc.add(received, cpu, hb.RUNNING, "t", 0, previous)
        previous = received
    assert acc.beats == 5
    assert acc.cpu_sum / acc.beats == pytest.approx(0.3)
    assert (acc.cpu_min, acc.cpu_max) == (pytest.approx(0.1), pytest.approx(0.5))
    assert acc.longest_gap == 1000
    assert acc.slope_per_min() == pytest.approx(0.1 * 60)  # +0.1 per second
    assert acc.p95() == pytest.approx(0.5)


def test_merge_equals_one_pass() -> None:
    whole, first, second = WindowStats(), WindowStats(), WindowStats()
    beats = [(i * 700, (i % 7) / 10) for i in range(30)]
    previous = 0
    for received, cpu in beats:
        whole.add(received, cpu, hb.RUNNING, "t", 0, previous)
        (first if received < 10_000 else second).add(
            received, cpu, hb.RUNNING, "t", 0 if received < 10_000 else 10_000, previous
        )
        previous = received
    first.merge(second, shift_min=10_000 / 60_000)
    assert first.beats == whole.beats
    assert first.slope_per_min() == pytest.approx(whole.slope_per_min())
    assert first.p95() == whole.p95() and first.longest_gap == whole.longest_gap
    assert WindowStats.load(first.dump()).slope_per_min() == pytest.approx(whole.slope_per_min())


def cols(beats: list[tuple[str, int]], watermark: int) -> hb.HeartbeatColumns:
    return hb.HeartbeatColumns(
        agent_id=[a for a, _ in beats],
        task_id=["t"] * len(beats),
        status=[hb.RUNNING] * len(beats),
        cpu_util=[0.5] * len(beats),
        received_ms=[r for _, r in beats],
        watermark_ms=watermark,
    )


def test_windows_close_on_watermark_and_replays_are_dropped() -> None:
    state = PartitionState(0, window_ms=10_000, rules=RULES)
    state.add(cols([("a", 1000), ("a", 2000), ("b", 9000), ("a", 12_000)], 0))
    events, closed = state.advance(9999)
    assert closed == []
    events, closed = state.advance(10_000)
    assert [(w.start, {k: v.beats for k, v in w.rows.items()}) for w in closed] == [(0, {"a": 2, "b": 1})]
    # crashed before the closed window's rows were written: the replay counts it again, exactly
    unwritten = PartitionState.restore(0, 10_000, RULES, state.snapshot_meta(), list(state.dirty_chunks().values()), {})
    unwritten.add(cols([("a", 1000), ("a", 2000), ("b", 9000), ("a", 12_000)], 10_000))
    assert unwritten.late == 0
    state.next_window_chunks(10)
    # once written, a replay of the first window's data is dropped; the open window still counts
    restored = PartitionState.restore(0, 10_000, RULES, state.snapshot_meta(), [], {"a": 12_000})
    restored.add(cols([("a", 1000), ("a", 2000), ("b", 9000), ("a", 12_000)], 10_000))
    assert restored.late == 3
    _, closed = restored.advance(20_000)
    assert [(w.start, {k: v.beats for k, v in w.rows.items()}) for w in closed] == [(10_000, {"a": 1})]


def test_a_heartbeat_stored_twice_counts_once() -> None:
    """An agent sends a beat that got no reply again, whole, to the other ingest; when both stored it, the
    copy (same seq and agent timestamp, later or earlier in the stream) counts nowhere. A restarted agent
    numbers from 1 again, whatever its clock says: it counts."""
    beats = [  # (seq, agent timestamp, received)
        (1, 1000, 1000),
        (2, 2000, 2010),
        (2, 2000, 2600),  # the other ingest stored it too
        (3, 3000, 3005),
        (2, 2000, 2020),  # the first ingest's copy, stored late
        (1, 5000, 5000),  # the agent restarted
        (2, 6000, 6000),
        (1, 500, 7000),  # restarted again, on a clock still behind (not synchronised yet)
        (2, 1500, 8000),
    ]
    record = hb.HeartbeatColumns(
        agent_id=["a"] * len(beats),
        task_id=["t"] * len(beats),
        status=[hb.RUNNING] * len(beats),
        cpu_util=[0.5] * len(beats),
        seq=[s for s, _, _ in beats],
        timestamp=[t for _, t, _ in beats],
        received_ms=[r for _, _, r in beats],
    )
    state = PartitionState(0, window_ms=10_000, rules=RULES)
    state.add(record)
    assert state.repeats == 2
    assert state.liveness.agents["a"].last_seen == 8000
    # a replay after a restore rebuilds the open window the same way
    restored = PartitionState.restore(0, 10_000, RULES, state.snapshot_meta(), list(state.dirty_chunks().values()), {})
    restored.add(record)
    for folded in (state, restored):
        _, closed = folded.advance(10_000)
        assert [(w.start, {k: v.beats for k, v in w.rows.items()}) for w in closed] == [(0, {"a": 7})]


def test_a_window_takes_late_heartbeats_until_its_grace_ends() -> None:
    state = PartitionState(0, window_ms=10_000, rules=RULES, grace_ms=1000)
    state.add(cols([("a", 9000)], 9000))
    assert state.advance(10_500)[1] == []  # past the end, within the grace: still open
    state.add(cols([("a", 9900)], 10_500))  # stamped before the end, stored late
    _, closed = state.advance(11_000)
    assert [(w.start, w.rows["a"].beats) for w in closed] == [(0, 2)] and state.late == 0
    state.add(cols([("a", 9950)], 11_000))  # later than the grace: dropped, and counted as such
    assert state.late == 1
    assert state.advance(25_000)[1] == [] and state.closed_until == 20_000  # an idle clock closes too


def test_records_are_released_only_after_their_windows_close() -> None:
    state = PartitionState(0, window_ms=10_000, rules=RULES)
    _, newest = state.add(cols([("a", 1000)], 0))
    state.hold("record-0", 0, newest)
    _, newest = state.add(cols([("a", 11_000)], 0))
    state.hold("record-1", 1, newest)
    _, newest = state.add(cols([("a", 2000)], 0))  # a straggler of the first window, after a newer record
    state.hold("record-2", 2, newest)
    state.advance(10_000)
    assert state.releasable() == []  # closed, but its rows are not written yet
    assert [(w.start, c, rows) for w, c, rows in state.next_window_chunks(5)] == [
        (0, 0, {"a": [2, 0.5, 0.5, 0.5, 2000, 0, "t", hb.RUNNING]})
    ]
    # record-2's window is written too, but faust commits past every acknowledged offset it can:
    # only the oldest records go, and a snapshot taken now replays from record-1
    assert state.releasable() == ["record-0"]
    assert state.snapshot_meta()["next_offset"] == 1
    state.advance(20_000)
    state.next_window_chunks(5)
    assert state.releasable() == ["record-1", "record-2"]
    _, newest = state.add(cols([], 25_000))  # a watermark alone waits only for the windows closed so far
    state.advance(25_000)
    state.hold("record-3", 3, newest)
    assert state.releasable() == ["record-3"] and state.snapshot_meta()["next_offset"] == 4
    _, newest = state.add(cols([("a", 31_000)], 31_000))
    state.advance(31_000)
    state.hold("record-4", 4, newest)
    _, newest = state.add(cols([], 41_000))  # a tick that closes a window waits for its rows
    state.advance(41_000)
    state.hold("record-5", 5, newest)
    assert state.releasable() == []
    state.next_window_chunks(5)
    assert state.releasable() == ["record-4", "record-5"]


def test_records_are_folded_in_offset_order_from_the_snapshot() -> None:
    """After a rebalance records may come ahead of the one the snapshot needs: they are dropped until it
    comes, older ones are skipped."""
    before = PartitionState(0, window_ms=10_000, rules=RULES)
    for offset in range(5):
        before.hold(f"record-{offset}", offset, -1)
    before.advance(10_000)
    assert len(before.releasable()) == 5
    state = PartitionState.restore(0, 10_000, RULES, before.snapshot_meta(), [], {})
    assert state.place(9, now=0.0, committed=None) == 1  # early, during the rebalance
    assert state.place(3, now=0.1, committed=3) == -1  # folded in before the snapshot
    assert state.place(5, now=0.2, committed=3) == 0 and state.missed is None
    state.hold("record-5", 5, -1)
    assert state.place(6, now=0.3, committed=3) == 0
    # records that never come (deleted by retention): after a while it goes on without them
    assert state.place(8, now=1.0, committed=3) == 1
    assert state.place(9, now=1.0 + EARLY_WAIT_S, committed=3) == 0 and state.missed == (6, 9)


def test_a_partition_getting_records_ahead_is_sought_back_now_and_then() -> None:
    """Records ahead of the one needed: the worker seeks the partition back at once, then again only every
    SEEK_AGAIN_S while they keep coming (records fetched before a seek can still arrive after it), and
    anew once the needed record came. A restored state remembers where its snapshot left off, so the
    worker can tell faust the records before it are done."""
    state = PartitionState.restore(0, 10_000, RULES, {"next_offset": 5}, [], {})
    assert state.settled_until == 5
    assert state.place(9, now=0.0, committed=3) == 1 and state.seek_due(0.0)
    assert state.place(10, now=0.01, committed=3) == 1 and not state.seek_due(0.01)
    assert state.place(11, now=SEEK_AGAIN_S, committed=3) == 1 and state.seek_due(SEEK_AGAIN_S)
    assert state.place(5, now=0.3, committed=3) == 0 and state.missed is None
    state.hold("record-5", 5, -1)
    assert state.place(8, now=0.31, committed=3) == 1 and state.seek_due(0.31)  # a new run of early records


def test_records_committed_unseen_are_gone_without_stalling_anyone() -> None:
    """A commit made outside this worker can pass records the state never saw (the worker's own
    acknowledgements cannot: faust_adapter.py hook 6). It goes on at once, and agents whose beats may sit
    in them get a full deadline from there instead of being judged on the gap."""
    rules = Rules(timeout_ms=2000)
    state = PartitionState(0, window_ms=10_000, rules=rules)
    state.add(cols([("a", 1000), ("b", 1000)], 1000))
    state.hold("record-0", 0, 0)
    assert state.place(40, now=0.0, committed=None) == 1  # the rebalance is under way
    assert state.place(40, now=0.1, committed=40) == 0 and state.missed == (1, 40)
    state.add(cols([("a", 9000)], 9000))  # only a's beat is in the record at hand
    events, _ = state.advance(9000)
    assert events == []  # b was silent 8 s by the records' clock, but those records are unknown
    state.add(cols([("a", 10_000)], 10_000))
    events, _ = state.advance(11_000)
    assert [(e.agent_id, e.reason) for e in events] == [("b", "silent")]


def test_the_snapshot_keeps_the_last_gap_of_the_pipeline_clock() -> None:
    state = PartitionState(0, 10_000, Rules(timeout_ms=60_000, gap_ms=2000))
    state.advance(1000)
    state.advance(9000)
    assert state.liveness.gap_end == 9000
    restored = PartitionState.restore(0, 10_000, RULES, state.snapshot_meta(), [], {})
    assert restored.liveness.gap_end == 9000
