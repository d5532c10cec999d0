"""Whether a stall event should reassign its task: pure decisions, tested without services.

- Only the reasons in HBREG_REASSIGN_ON reassign; a stall without a task has nothing to reassign.
- A stall whose agent recovered before the reassignment was carried out (it waited for the rate limit,
  or the sink was behind) is not reassigned. Recovered is what the worker that emitted the stall says
  (its published view of the agent, core.views.AgentView), not any newer heartbeat: silent and hung
  stalls need the view back `alive` (HBREG_RECOVERY_BEATS healthy beats, the worker's own rule, which
  also sends the RECOVERY event) and working on the task (RUNNING on it; hung: with CPU back at or above
  HBREG_HUNG_CPU); overdue needs a newer beat no longer RUNNING that task, i.e. it finished.
  A single newer heartbeat is no proof: a killed agent's last beat, stored late behind the pipeline
  clock, or one beat of an agent that dies again, leaves the worker in the same stall episode, which
  sends no second stall event, so skipping on it lost the task for good (found by the chaos soak).
- A mass silence holds its agents without stall events at all (processors/liveness.py), so nothing is
  reassigned until the worker confirms them one by one.
"""

from __future__ import annotations

from heartbeat_registry.core.views import ALIVE, AgentView
from heartbeat_registry.pb import hb

POLICY, NO_TASK, RECOVERED = "policy", "no_task", "recovered"


def skip_reason(event: hb.AgentEvent, reassign_on: tuple[str, ...]) -> str | None:
    """Why this stall reassigns nothing by rule, or None."""
    if not event.task_id:
        return NO_TASK
    if event.reason not in reassign_on:
        return POLICY
    return None


def recovered(event: hb.AgentEvent, view: AgentView | None, hung_cpu: float) -> bool:
    """Whether the worker's view of the agent shows it past the stall (see the module docstring)."""
    if view is None or view.last_seen <= max(event.last_seen_ms, 0):
        return False
    on_task = view.task_id == event.task_id and view.status == hb.RUNNING
    if event.reason == "overdue":
        return not on_task
    if view.state != ALIVE:
        return False
    if event.reason == "hung":
        return on_task and view.cpu >= hung_cpu
    return on_task
