"""Which alert an event raises or resolves, and what Alertmanager is sent: pure logic."""

from __future__ import annotations

from heartbeat_registry.pb import hb
from sinks.alerts import RESOLVED_KEPT_MS, change_for, rfc3339


def test_a_stall_raises_agent_stalled_with_its_figures_and_a_recovery_resolves_it() -> None:
    stall = hb.AgentEvent(
        type=hb.STALL,
        agent_id="a7",
        task_id="job-1",
        reason="silent",
        partition=3,
        last_seen_ms=1_000,
        detected_at_ms=4_000,
        figures={"silence_ms": 3000, "timeout_s": 3, "phi": 9.25, "mean_interval_ms": 1000},
    )
    change = change_for(stall, "prod-eu", "https://hbreg.example.com")
    assert change is not None and change.alert is not None and change.key == "AgentStalled:a7"
    alert = change.alert
    assert alert.labels == {
        "alertname": "AgentStalled",
        "agent_id": "a7",
        "task_id": "job-1",
        "reason": "silent",
        "severity": "critical",
        "partition": "3",
        "cluster": "prod-eu",
    }
    assert "silent for 3.0 s" in alert.annotations["description"] and "phi 9.2" in alert.annotations["description"]
    assert alert.generator_url == "https://hbreg.example.com/agents/a7"
    firing = alert.postable(now_ms=10_000, resend_ms=60_000)
    assert firing["startsAt"] == rfc3339(4_000) and firing["endsAt"] == rfc3339(10_000 + 4 * 60_000)
    recovery = change_for(hb.AgentEvent(type=hb.RECOVERY, agent_id="a7", detected_at_ms=9_000), "prod-eu", "")
    assert (
        recovery is not None and recovery.alert is None and (recovery.key, recovery.at_ms) == ("AgentStalled:a7", 9_000)
    )
    alert.resolved_ms = 9_000
    assert alert.postable(now_ms=20_000, resend_ms=60_000)["endsAt"] == rfc3339(9_000)
    assert not alert.expired(9_000 + RESOLVED_KEPT_MS) and alert.expired(9_001 + RESOLVED_KEPT_MS)


def test_mass_silence_and_pipeline_lag_pair_up_with_their_ends() -> None:
    mass = hb.AgentEvent(
        type=hb.MASS_SILENCE,
        partition=2,
        event_id="mass:2:5000",
        detected_at_ms=5_000,
        agent_ids=["m1", "m2"],
        reason="2 of 3 agents of partition 2 went silent together",
    )
    raised = change_for(mass, "c", "")
    assert raised is not None and raised.alert is not None and raised.key == "AgentsMassSilence:2:5000"
    assert raised.alert.labels["partition"] == "2" and raised.alert.annotations["agents"] == "m1,m2"
    cleared = change_for(
        hb.AgentEvent(type=hb.MASS_SILENCE_CLEARED, event_id="mass:2:5000:cleared", detected_at_ms=9_000), "c", ""
    )
    assert cleared is not None and cleared.key == raised.key and cleared.alert is None
    lag = change_for(hb.AgentEvent(type=hb.PIPELINE_LAG, reason="behind", detected_at_ms=1), "c", "")
    assert lag is not None and lag.key == "PipelineLag" and lag.alert is not None
    caught_up = change_for(hb.AgentEvent(type=hb.PIPELINE_CAUGHT_UP, detected_at_ms=2), "c", "")
    assert caught_up is not None and caught_up.key == "PipelineLag" and caught_up.alert is None
    assert change_for(hb.AgentEvent(type=hb.ASSIGNMENT_EXPIRED), "c", "") is None
