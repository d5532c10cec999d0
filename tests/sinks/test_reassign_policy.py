"""Which stalls reassign their task: pure logic."""

from __future__ import annotations

from heartbeat_registry.core.views import RegistryEntry
from heartbeat_registry.pb import hb
from sinks.reassign_policy import NO_TASK, POLICY, recovered, skip_reason


def stall(reason: str = "silent", task: str = "job", last_seen: int = 1000) -> hb.AgentEvent:
    return hb.AgentEvent(type=hb.STALL, agent_id="a", task_id=task, reason=reason, last_seen_ms=last_seen)


def entry(at: int, task: str = "job", status: int = hb.RUNNING, cpu: float = 0.5) -> RegistryEntry:
    return RegistryEntry("a", task, status, cpu, at, None, at)


def test_reasons_and_tasks() -> None:
    everything = ("silent", "hung", "overdue")
    assert skip_reason(stall(), everything) is None
    assert skip_reason(stall(task=""), everything) == NO_TASK
    assert skip_reason(stall("hung"), ("silent",)) == POLICY
    assert skip_reason(stall("overdue"), ()) == POLICY


def test_recovered_agents_keep_their_task() -> None:
    assert not recovered(stall(), None, 0.02)
    assert not recovered(stall(), entry(1000), 0.02)  # nothing newer than the stall
    assert recovered(stall(), entry(1500), 0.02)  # back, on the task
    assert not recovered(stall(), entry(1500, task="other"), 0.02)  # back, but on another task
    assert not recovered(stall(), entry(1500, status=hb.IDLE), 0.02)
    assert not recovered(stall("hung"), entry(1500, cpu=0.0), 0.02)  # still hung
    assert recovered(stall("hung"), entry(1500, cpu=0.3), 0.02)
    assert not recovered(stall("overdue"), entry(1500), 0.02)  # still at it
    assert recovered(stall("overdue"), entry(1500, status=hb.COMPLETED), 0.02)  # it finished
