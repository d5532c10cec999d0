"""Window aggregates as pure logic."""

from __future__ import annotations

import pytest

from heartbeat_registry.pb import hb
from processors.liveness import Rules
from processors.partition import PartitionState

RULES = Rules(timeout_ms=60_000)
from processors.windows import Accumulator


def test_aggregates() -> None:
    acc = Accumulator()
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
    whole, first, second = Accumulator(), Accumulator(), Accumulator()
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
    assert Accumulator.load(first.dump()).slope_per_min() == pytest.approx(whole.slope_per_min())


def cols(beats: list[tuple[str, int]], watermark: int) -> hb.HeartbeatColumns:
    return hb.HeartbeatColumns(
        agent_id=[a for a, _ in beats], task_id=["t"] * len(beats), status=[hb.RUNNING] * len(beats),
        cpu_util=[0.5] * len(beats), received_ms=[r for _, r in beats], watermark_ms=watermark,
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
    state.hold("record-1", newest)
    _, newest = state.add(cols([("a", 11_000)], 0))
    state.hold("record-2", newest)
    state.advance(10_000)
    assert state.releasable() == []  # closed, but its rows are not written yet
    assert [(w.start, c, rows) for w, c, rows in state.next_window_chunks(5)] == [(0, 0, {"a": [1, 0.5, 0.5, 0.5, 1000, 0, "t", hb.RUNNING]})]
    assert state.releasable() == ["record-1"]
    state.advance(20_000)
    state.next_window_chunks(5)
    assert state.releasable() == ["record-2"]
