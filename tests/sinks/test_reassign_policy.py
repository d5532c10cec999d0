"""Which stalls reassign their task: pure logic."""

from __future__ import annotations

from heartbeat_registry.core.views import ALIVE, RECOVERED, STALLED, AgentView
from heartbeat_registry.pb import hb
from sinks.reassign_policy import NO_TASK, POLICY, recovered, skip_reason


def stall(reason: str = "silent", task: str = "job", last_seen: int = 1000) -> hb.AgentEvent:
    return hb.AgentEvent(type=hb.STALL, agent_id="a", task_id=task, reason=reason, last_seen_ms=last_seen)


def view(at: int, task: str = "job", status: int = hb.RUNNING, cpu: float = 0.5, state: str = ALIVE) -> AgentView:
    """The worker's view of the agent: last beat folded in at `at`, in `state`."""
    return AgentView(task, status, cpu, at, state, "", at, 1000.0, 50.0)


def test_reasons_and_tasks() -> None:
    everything = ("silent", "hung", "overdue")
    assert skip_reason(stall(), everything) is None
    assert skip_reason(stall(task=""), everything) == NO_TASK
    assert skip_reason(stall("hung"), ("silent",)) == POLICY
    assert skip_reason(stall("overdue"), ()) == POLICY


def test_recovered_agents_keep_their_task() -> None:
    assert not recovered(stall(), None, 0.02)
    assert not recovered(stall(), view(1000), 0.02)  # nothing newer than the stall
    assert recovered(stall(), view(1500), 0.02)  # back, on the task
    assert not recovered(stall(), view(1500, task="other"), 0.02)  # back, but on another task
    assert not recovered(stall(), view(1500, status=hb.IDLE), 0.02)
    assert not recovered(stall("hung"), view(1500, cpu=0.0), 0.02)  # still hung
    assert recovered(stall("hung"), view(1500, cpu=0.3), 0.02)
    assert not recovered(stall("overdue"), view(1500), 0.02)  # still at it
    assert recovered(stall("overdue"), view(1500, status=hb.COMPLETED, state=STALLED), 0.02)  # it finished


def test_a_newer_beat_is_no_recovery_until_the_worker_counts_the_agent_back() -> None:
    """A killed agent's last beat stored late (behind the pipeline clock), or one beat of an agent that
    died again: the worker stays in the stall's episode and sends no second stall event, so the task
    must move now (the chaos soak lost a task to this)."""
    assert not recovered(stall(), view(1500, state=STALLED), 0.02)
    assert not recovered(stall(), view(1500, state=RECOVERED), 0.02)  # on its way back, not yet
    assert not recovered(stall("hung"), view(1500, cpu=0.3, state=RECOVERED), 0.02)
