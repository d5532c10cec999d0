"""The pure parts of `hbreg tune`: the grid, the labels, and a partition's replay on made-up records."""

from __future__ import annotations

import pytest

from heartbeat_registry.errors import ConfigError
from heartbeat_registry.hbreg.tune import grid
from heartbeat_registry.hbreg.tune.replay import FALSE, TRUE, UNLABELLED, PartitionReplay, label
from heartbeat_registry.pb import hb
from processors.liveness import Rules

T0 = 1_800_000_000_000


def test_the_grid_is_every_combination_in_order() -> None:
    sets = grid.parse(["phi_threshold=6,8", "stall_timeout=5s,10s,5000ms"])
    assert sets == [
        {"phi_threshold": 6.0, "stall_timeout": 5.0},
        {"phi_threshold": 6.0, "stall_timeout": 10.0},
        {"phi_threshold": 8.0, "stall_timeout": 5.0},
        {"phi_threshold": 8.0, "stall_timeout": 10.0},
    ]
    assert grid.parse([]) == []
    with pytest.raises(ConfigError, match="at most 256"):
        grid.parse(["phi_threshold=1,2,3,4,5,6,7", "min_std=1,2,3,4,5,6", "mass_silence_min=1,2,3,4,5,6,7"])


def test_labels() -> None:
    assert label(10, 11) == FALSE  # the count goes on: the same process, late
    assert label(10, 25) == FALSE  # beats it could not deliver meanwhile are skipped numbers
    assert label(10, 1) == TRUE  # counted from 1 again: a new process
    assert label(10, 10) == TRUE
    assert label(0, 5) == UNLABELLED and label(7, 0) == UNLABELLED


def record(at: int, beats: list[tuple[str, int]]) -> hb.HeartbeatColumns:
    """Heartbeats (agent, seq) received at `at`, with the watermark at `at`."""
    return hb.HeartbeatColumns(
        agent_id=[a for a, _ in beats],
        task_id=[f"{a}-t" for a, _ in beats],
        status=[hb.RUNNING] * len(beats),
        timestamp=[at] * len(beats),
        cpu_util=[0.5] * len(beats),
        progress=[float("nan")] * len(beats),
        received_ms=[at] * len(beats),
        seq=[s for _, s in beats],
        watermark_ms=at,
    )


def test_a_replay_labels_each_stall_from_the_agents_next_heartbeat() -> None:
    """Four agents beat every 500 ms; from 20 s on: `late` pauses 3 s and goes on counting, `dead` never
    comes back, `restarted` comes back counting from 1, `uncounted` sends no seq and pauses 3 s. Stalls
    count only when detected after 10 s (the time before warms the states up)."""
    replay = PartitionReplay(
        0, [Rules(timeout_ms=2000), Rules(timeout_ms=5000)], 10_000, 0, T0 + 10_000, T0 + 40_000, T0 + 45_000
    )
    seq = {"late": 0, "dead": 0, "restarted": 0, "uncounted": 0, "steady": 0}
    silent = {
        "late": (20_000, 23_000),
        "dead": (20_000, 10**9),
        "restarted": (20_000, 23_000),
        "uncounted": (20_000, 23_000),
    }
    for at in range(0, 45_000, 500):
        beats = []
        for agent in seq:
            start, end = silent.get(agent, (10**9, 10**9))
            if start <= at < end:
                continue
            if agent == "restarted" and at == end:
                seq[agent] = 0
            seq[agent] += 1
            beats.append((agent, 0 if agent == "uncounted" else seq[agent]))
        replay.feed(record(T0 + at, beats))
    two_s, five_s = replay.finish()
    assert {s.agent_id: s.label for s in two_s} == {
        "late": FALSE,
        "dead": TRUE,
        "restarted": TRUE,
        "uncounted": UNLABELLED,
    }
    assert [s.agent_id for s in two_s if s.unresolved] == ["dead"]
    assert {s.agent_id: s.label for s in five_s} == {"dead": TRUE}  # 3 s pauses are no stalls at 5 s
    assert all(s.detected_at_ms - s.last_seen_ms >= 2000 for s in two_s)
    assert replay.heartbeats > 0 and replay.agents == set(seq)
