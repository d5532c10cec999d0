"""Liveness rules as pure logic (no services)."""

from __future__ import annotations

from heartbeat_registry.pb import hb
from processors.liveness import ALIVE, LEFT, STALLED, Agent, Liveness


def test_silence_past_timeout_stalls_once() -> None:
    live = Liveness(partition=0, timeout_ms=2000)
    live.beat("a", "t", hb.RUNNING, 0.5, 1000)
    assert live.advance(2999) == []
    events = live.advance(3000)
    assert [(e.type, e.agent_id, e.reason, e.last_seen_ms, e.detected_at_ms) for e in events] == [
        (hb.STALL, "a", "silent", 1000, 3000)
    ]
    assert live.agents["a"].state == STALLED
    assert live.advance(10_000) == []


def test_recovery_once_on_return() -> None:
    live = Liveness(0, 2000)
    live.beat("a", "t", hb.RUNNING, 0.5, 1000)
    stall = live.advance(5000)[0]
    event = live.beat("a", "t", hb.RUNNING, 0.5, 6000)
    assert event.type == hb.RECOVERY and event.event_id == "a:1000:recovery" and stall.event_id == "a:1000:stall"
    assert live.beat("a", "t", hb.RUNNING, 0.5, 6100) is None
    assert live.agents["a"].state == ALIVE


def test_each_beat_pushes_the_deadline() -> None:
    live = Liveness(0, 2000)
    for t in range(0, 10_000, 500):
        live.beat("a", "t", hb.RUNNING, 0.5, t)
        assert live.advance(t + 100) == []
    assert [e.last_seen_ms for e in live.advance(11_500)] == [9500]


def test_leaving_agent_is_never_stalled() -> None:
    live = Liveness(0, 2000)
    live.beat("a", "t", hb.RUNNING, 0.5, 1000)
    live.beat("a", "t", hb.STOPPING, 0.0, 1500)
    live.beat("b", "t", hb.COMPLETED, 0.0, 1500)
    assert live.advance(60_000) == []
    assert live.agents["a"].state == LEFT


def test_replayed_beats_change_nothing() -> None:
    live = Liveness(0, 2000)
    live.beat("a", "t", hb.RUNNING, 0.5, 1000)
    live.advance(4000)
    restored = Liveness(0, 2000)
    restored.restore([Agent.load("a", live.agents["a"].dump())], live.watermark)
    assert restored.beat("a", "t", hb.RUNNING, 0.5, 1000) is None  # the replay of the last beat
    assert restored.advance(9000) == []  # same episode: no second stall


def test_restored_alive_agent_is_watched() -> None:
    live = Liveness(0, 2000)
    live.beat("a", "t", hb.RUNNING, 0.5, 1000)
    restored = Liveness(0, 2000)
    restored.restore([Agent.load("a", live.agents["a"].dump())], 1500)
    assert [e.agent_id for e in restored.advance(3000)] == ["a"]


def test_many_agents_only_due_ones_fire() -> None:
    live = Liveness(0, 1000)
    for i in range(1000):
        live.beat(f"a{i}", "t", hb.RUNNING, 0.5, i + 1)
    assert len(live.advance(1500)) == 500
    assert len(live.advance(2000)) == 500
