"""Whether a stall event should reassign its task: pure decisions, tested without services.

- Only the reasons in HBREG_REASSIGN_ON reassign; a stall without a task has nothing to reassign.
- A stall whose agent recovered before the reassignment was carried out (it waited for the rate limit,
  or the sink was behind) is not reassigned: the agent's latest heartbeat in the registry is newer than
  the stall and shows it working on the task again (silent: beating RUNNING on it; hung: RUNNING on it
  with CPU back at or above HBREG_HUNG_CPU; overdue: no longer RUNNING that task, i.e. it finished).
- A mass silence holds its agents without stall events at all (processors/liveness.py), so nothing is
  reassigned until the worker confirms them one by one.
"""

from __future__ import annotations

from heartbeat_registry.core.views import RegistryEntry
from heartbeat_registry.pb import hb

POLICY, NO_TASK, RECOVERED = "policy", "no_task", "recovered"


def skip_reason(event: hb.AgentEvent, reassign_on: tuple[str, ...]) -> str | None:
    """Why this stall reassigns nothing by rule, or None."""
    if not event.task_id:
        return NO_TASK
    if event.reason not in reassign_on:
        return POLICY
    return None


def recovered(event: hb.AgentEvent, latest: RegistryEntry | None, hung_cpu: float) -> bool:
    """Whether the agent's latest heartbeat shows it past the stall (see the module docstring)."""
    if latest is None or latest.last_seen_ms <= max(event.last_seen_ms, 0):
        return False
    on_task = latest.task_id == event.task_id and latest.status == hb.RUNNING
    if event.reason == "hung":
        return on_task and latest.cpu_util >= hung_cpu
    if event.reason == "overdue":
        return not on_task
    return on_task
