"""Liveness rules as pure logic (no services)."""

from __future__ import annotations

import random

import pytest

from heartbeat_registry.core.views import ALIVE, LEFT, RECOVERED, STALLED, phi
from heartbeat_registry.core.windowstats import WindowStats
from heartbeat_registry.pb import hb
from processors.app import lag_event_id
from processors.liveness import Agent, Liveness, Rules


def make(timeout_ms: int = 2000, **rules) -> Liveness:
    return Liveness(0, Rules(timeout_ms=timeout_ms, **{"recovery_beats": 1, **rules}))


def kinds(events) -> list[tuple[int, str, str]]:
    return [(e.type, e.agent_id, e.reason) for e in events]


def test_silence_past_timeout_stalls_once() -> None:
    live = make()
    live.beat("a", "t", hb.RUNNING, 0.5, 1000)
    assert live.advance(2999) == []
    events = live.advance(3000)
    assert [(e.type, e.agent_id, e.reason, e.last_seen_ms, e.detected_at_ms) for e in events] == [
        (hb.STALL, "a", "silent", 1000, 3000)
    ]
    assert live.agents["a"].state == STALLED
    assert live.advance(10_000) == []


def test_recovery_needs_healthy_beats_in_a_row() -> None:
    live = make(recovery_beats=3)
    live.beat("a", "t", hb.RUNNING, 0.5, 1000)
    stall = live.advance(5000)[0]
    assert live.beat("a", "t", hb.RUNNING, 0.5, 6000) is None
    assert live.agents["a"].state == RECOVERED
    # silent again before confirmation: back to stalled, the same episode, no second stall event
    assert live.advance(9000) == []
    assert live.agents["a"].state == STALLED
    assert live.beat("a", "t", hb.RUNNING, 0.5, 9100) is None
    assert live.beat("a", "t", hb.RUNNING, 0.5, 9200) is None
    event = live.beat("a", "t", hb.RUNNING, 0.5, 9300)
    assert event.type == hb.RECOVERY and event.reason == "silent"
    assert event.event_id == "a:1000:recovery" and stall.event_id == "a:1000:stall"
    assert live.agents["a"].state == ALIVE


def test_each_beat_pushes_the_deadline() -> None:
    live = make(acceptable_pause_ms=60_000)
    for t in range(0, 10_000, 500):
        live.beat("a", "t", hb.RUNNING, 0.5, t + 1)
        assert live.advance(t + 100) == []
    assert [e.last_seen_ms for e in live.advance(11_501)] == [9501]


def test_phi_stalls_a_fast_beating_agent_before_the_hard_timeout() -> None:
    live = make(timeout_ms=30_000, acceptable_pause_ms=500, min_std_ms=100)
    rng = random.Random(1)
    t = 0
    for _ in range(50):
        t += int(rng.uniform(900, 1100))
        live.beat("a", "t", hb.RUNNING, 0.5, t)
    assert live.advance(t + 1500) == []
    events = live.advance(t + 3000)
    assert kinds(events) == [(hb.STALL, "a", "silent")]
    assert events[0].figures["phi"] >= 8.0
    assert events[0].detected_at_ms - t < 30_000


def test_jittery_agent_within_timeout_never_stalls() -> None:
    live = make(timeout_ms=2000)
    rng = random.Random(7)
    t, events = 0, []
    for _ in range(3000):
        t += int(rng.uniform(100, 300))  # 200 ms +-50%
        events += live.advance(t)
        live.beat("a", "t", hb.RUNNING, 0.5, t)
    t += 1500  # a 1.5 s pause with a 2 s timeout
    events += live.advance(t)
    live.beat("a", "t", hb.RUNNING, 0.5, t)
    assert events == []


def test_leaving_agent_is_never_stalled() -> None:
    live = make()
    live.beat("a", "t", hb.RUNNING, 0.5, 1000)
    live.beat("a", "t", hb.STOPPING, 0.0, 1500)
    live.beat("b", "t", hb.COMPLETED, 0.0, 1500)
    assert live.advance(60_000) == []
    assert live.agents["a"].state == LEFT


def test_overdue_task() -> None:
    live = make(max_task_ms=10_000)
    for t in range(0, 12_001, 1000):
        event = live.beat("a", "job", hb.RUNNING, 0.5, t + 1)
        live.advance(t + 2)
    assert event is None and live.agents["a"].state == STALLED and live.agents["a"].reason == "overdue"
    live2 = make(max_task_ms=10_000)
    events = [live2.beat("a", "job", hb.RUNNING, 0.5, t + 1) for t in range(0, 12_001, 1000)]
    assert [(e.type, e.reason) for e in events if e] == [(hb.STALL, "overdue")]
    assert live2.beat("a", "next-job", hb.RUNNING, 0.5, 14_000).type == hb.RECOVERY


def test_hung_window() -> None:
    live = make(hung_cpu=0.05)
    acc = WindowStats()
    for t in (1000, 2000, 3000):
        live.beat("a", "job", hb.RUNNING, 0.0, t)
        acc.add(t, 0.0, hb.RUNNING, "job", 0, t - 1000)
    busy = WindowStats()
    busy.add(1000, 0.0, hb.RUNNING, "job", 0, 0)
    busy.add(2000, 0.6, hb.RUNNING, "job", 0, 1000)
    live.beat("b", "job", hb.RUNNING, 0.6, 2000)
    events = live.window_closed({"a": acc, "b": busy}, 0, 10_000)
    assert kinds(events) == [(hb.STALL, "a", "hung")]
    assert events[0].figures["cpu_max"] == 0.0
    assert live.window_closed({"a": acc}, 0, 10_000) == []  # already stalled: one event per episode
    assert live.beat("a", "job", hb.RUNNING, 0.0, 4000) is None  # still idle: no recovery
    assert live.beat("a", "job", hb.RUNNING, 0.5, 5000).type == hb.RECOVERY


def test_mass_silence_is_one_event_and_holds_the_agents() -> None:
    live = make(timeout_ms=2000, mass_fraction=0.5, mass_min=10, mass_hold_ms=60_000)
    for i in range(200):
        live.beat(f"a{i}", "t", hb.RUNNING, 0.5, 1000 + i)
    events = []
    for t in range(1300, 6000, 100):  # 160 of them go silent at once, the others keep beating
        for i in range(160, 200):
            live.beat(f"a{i}", "t", hb.RUNNING, 0.5, t)
        events += live.advance(t)
    assert [e.type for e in events] == [hb.MASS_SILENCE]
    assert len(events[0].agent_ids) == 160
    # they come back: no stalls, no recoveries, and the mass silence clears
    later = []
    for i in range(160):
        live.beat(f"a{i}", "t", hb.RUNNING, 0.5, 7000)
    later += live.advance(7100)
    assert [e.type for e in later] == [hb.MASS_SILENCE_CLEARED]
    assert all(live.agents[f"a{i}"].state == ALIVE for i in range(200))


def test_mass_silence_confirms_the_agents_that_stay_silent() -> None:
    live = make(timeout_ms=2000, mass_min=10, mass_hold_ms=60_000)
    for i in range(100):
        live.beat(f"a{i}", "t", hb.RUNNING, 0.5, 1000)
    events = live.advance(3000)
    assert [e.type for e in events] == [hb.MASS_SILENCE]
    for i in range(60):  # most come back: the outage is over; the other 40 are really gone
        live.beat(f"a{i}", "t", hb.RUNNING, 0.5, 8000)
    events = live.advance(8100)
    assert sorted(e.agent_id for e in events if e.type == hb.STALL) == sorted(f"a{i}" for i in range(60, 100))
    assert [e.type for e in events if e.type != hb.STALL] == [hb.MASS_SILENCE_CLEARED]


def test_replayed_beats_change_nothing() -> None:
    live = make()
    live.beat("a", "t", hb.RUNNING, 0.5, 1000)
    live.advance(4000)
    restored = make()
    restored.restore([Agent.load("a", live.agents["a"].dump())], live.watermark, {}, {})
    assert restored.beat("a", "t", hb.RUNNING, 0.5, 1000) is None  # the replay of the last beat
    assert restored.advance(9000) == []  # same episode: no second stall


def test_restored_alive_agent_is_watched() -> None:
    live = make()
    live.beat("a", "t", hb.RUNNING, 0.5, 1000)
    restored = make()
    restored.restore([Agent.load("a", live.agents["a"].dump())], 1500, {}, {})
    assert [e.agent_id for e in restored.advance(3000)] == ["a"]


def test_many_agents_only_due_ones_fire() -> None:
    live = make(1000, mass_min=10_000)
    for i in range(1000):
        live.beat(f"a{i}", "t", hb.RUNNING, 0.5, i + 1)
    assert len(live.advance(1500)) == 500
    assert len(live.advance(2000)) == 500


def test_phi_grows_with_silence() -> None:
    assert phi(100, 1000, 100) < 0.01
    assert phi(1000, 1000, 100) == pytest.approx(0.30103, abs=0.01)
    assert 7 < phi(1530, 1000, 100) < phi(1600, 1000, 100)


def _beating(live: Liveness, agents: range, start: int, until: int) -> None:
    """`agents` beat every 500 ms from `start` to `until`, the clock stepping 100 ms as in a healthy pipeline."""
    for t in range(start, until + 1, 100):
        if t % 500 == 0:
            for i in agents:
                live.beat(f"a{i}", "t", hb.RUNNING, 0.5, t)
        assert live.advance(t) == []


def test_a_gap_in_the_pipeline_clock_gives_every_agent_heard_one_deadline() -> None:
    """Redis down for 6 s: nothing stored, the clock stood still, then jumped. Agents back at once, agents
    still in their clients' retry backoff, and one that died meanwhile."""
    outcomes = {}
    for gap_ms in (0, 2000):  # 0: the rule off, the positive control
        live = make(timeout_ms=30_000, recovery_beats=3, mass_min=1000, gap_ms=gap_ms)
        _beating(live, range(10), 500, 10_000)
        deadline = live._offset(live.agents["a9"])
        assert deadline < 6000  # so a 6 s gap passes every agent's deadline
        for i in range(5):  # back at once, in the first record after the gap
            live.beat(f"a{i}", "t", hb.RUNNING, 0.5, 15_900)
        events = live.advance(16_000)
        for i in range(5, 9):  # back after their backoff; a9 never
            live.beat(f"a{i}", "t", hb.RUNNING, 0.5, 17_500)
        for t in range(16_100, 16_000 + deadline + 200, 100):
            events += live.advance(t)
        outcomes[gap_ms] = [(e.agent_id, e.detected_at_ms) for e in events if e.type == hb.STALL]
    assert sorted(a for a, _ in outcomes[0]) == [f"a{i}" for i in range(5, 10)]  # false stalls without the rule
    # with it: only the dead agent, one deadline after the gap
    [(agent, detected)] = outcomes[2000]
    assert agent == "a9" and 16_000 + deadline <= detected <= 16_000 + deadline + 100


def test_a_dead_agent_is_deferred_by_one_gap_only() -> None:
    """Every step of the clock a gap (a slow link): a dead agent is stalled one deadline after the first."""
    live = make(timeout_ms=30_000, mass_min=1000, gap_ms=2000)
    _beating(live, range(10), 500, 10_000)
    deadline = live._offset(live.agents["a9"])
    events = []
    for t in range(13_000, 40_000, 3000):
        for i in range(9):
            live.beat(f"a{i}", "t", hb.RUNNING, 0.5, t - 100)
        events += live.advance(t)
    [stall] = events
    assert stall.agent_id == "a9"
    # deferred at the first gap (to 13 s + deadline), not at the next: stalled at the first step after it
    assert 13_000 + deadline <= stall.detected_at_ms < 13_000 + deadline + 3000


def test_a_restored_partition_keeps_the_deadlines_of_its_last_gap() -> None:
    live = make(timeout_ms=30_000, mass_min=1000, gap_ms=2000)
    _beating(live, range(1), 500, 10_000)
    assert live.advance(16_000) == []
    deadline = live._offset(live.agents["a0"])
    for gap_end, stalled_at in ((0, 16_100), (live.gap_end, 16_000 + deadline)):  # 0: the positive control
        restored = make(timeout_ms=30_000, mass_min=1000, gap_ms=2000)
        restored.restore([Agent.load("a0", live.agents["a0"].dump())], 16_000, {}, {}, gap_end)
        assert restored.advance(stalled_at - 100) == []
        assert [e.agent_id for e in restored.advance(stalled_at)] == ["a0"]


def test_two_workers_lagging_in_the_same_millisecond_raise_distinct_events() -> None:
    """Each worker raises its own pipeline_lag; the chaos soak once saw two of them in one millisecond,
    which shared the id `lag:<ms>` and so read as one event sent twice."""
    assert lag_event_id([0, 2, 4, 6], 1000) != lag_event_id([1, 3, 5, 7], 1000)
    assert lag_event_id({6, 0, 2, 4}, 1000) == "lag:0-2-4-6:1000"
    assert lag_event_id([1, 3], 1000, cleared=True) == "lag:1-3:1000:cleared"
