"""What the Alertmanager sink tells Alertmanager: pure decisions, tested without services.

Each problem is one alert, identified by a key (`AgentStalled:<agent>`, `AgentsMassSilence:<partition>:<began>`,
`PipelineLag`, `TaskOrphaned:<task>`), raised by one event and resolved by another (or, for orphaned
tasks, by the task registry). Sender semantics are Prometheus's: a firing alert is sent with
`endsAt = now + 4 x the resend interval` and sent again every interval, so it survives three failed
sends and Alertmanager's `resolve_timeout` never resolves it while the problem lasts; a resolved alert is
sent with `endsAt` = when it was resolved, and sent again for 15 minutes so that a restarted Alertmanager
learns it too.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from heartbeat_registry.pb import hb

RESOLVED_KEPT_MS = 15 * 60 * 1000
SEVERITY = {"silent": "critical", "hung": "warning", "overdue": "warning"}
RFC3339_END_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z: RFC 3339 has four-digit years


def rfc3339(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def sendable(event: hb.AgentEvent) -> bool:
    """Whether the times an alert takes from the event (startsAt, endsAt) have an RFC 3339 form: Alertmanager
    refuses a whole request for one alert without, so one such event would hold up every alert, at every
    resend, for as long as it is kept."""
    return all(0 <= ms < RFC3339_END_MS for ms in (event.detected_at_ms, event.emitted_at_ms))


@dataclasses.dataclass
class Alert:
    """One alert as the sink keeps it (in Redis, JSON) and sends it (`postable` form)."""

    key: str
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_ms: int
    generator_url: str = ""
    resolved_ms: int | None = None  # None while firing

    def postable(self, now_ms: int, resend_ms: int) -> dict[str, Any]:
        """Alertmanager API v2 `postableAlert`."""
        ends = now_ms + 4 * resend_ms if self.resolved_ms is None else self.resolved_ms
        out: dict[str, Any] = {
            "labels": self.labels,
            "annotations": self.annotations,
            "startsAt": rfc3339(self.starts_ms),
            "endsAt": rfc3339(ends),
        }
        if self.generator_url:
            out["generatorURL"] = self.generator_url
        return out

    def expired(self, now_ms: int) -> bool:
        """A resolved alert sent again long enough: forgotten."""
        return self.resolved_ms is not None and now_ms - self.resolved_ms > RESOLVED_KEPT_MS

    def dump(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, data: dict[str, Any]) -> Alert:
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class Change:
    """What an event does: raise `alert`, or resolve the alert `key` at `at_ms`."""

    key: str
    alert: Alert | None = None
    at_ms: int = 0


def _figures(event: hb.AgentEvent) -> str:
    f = dict(event.figures)
    parts = []
    if "silence_ms" in f:
        parts.append(f"silent for {f['silence_ms'] / 1000:.1f} s (timeout {f.get('timeout_s', 0):g} s)")
    if "phi" in f:
        parts.append(f"phi {f['phi']:.1f} (mean interval {f.get('mean_interval_ms', 0):.0f} ms)")
    if "cpu_max" in f:
        parts.append(
            f"CPU at most {f['cpu_max']:.3f} over a {f.get('window_s', 0):g} s window (hung below "
            f"{f.get('hung_cpu', 0):g})"
        )
    if "running_s" in f:
        parts.append(f"running one task for {f['running_s']:.0f} s (allowed {f.get('max_task_s', 0):.0f} s)")
    return "; ".join(parts)


def change_for(event: hb.AgentEvent, cluster: str, public_url: str) -> Change | None:
    """The alert change an `agent-events` record implies, or None."""
    base = {"cluster": cluster}
    if event.type == hb.STALL:
        key = f"AgentStalled:{event.agent_id}"
        labels = {
            "alertname": "AgentStalled",
            "agent_id": event.agent_id,
            "task_id": event.task_id,
            "reason": event.reason,
            "severity": SEVERITY.get(event.reason, "warning"),
            "partition": str(event.partition),
            **base,
        }
        figures = _figures(event)
        annotations = {
            "summary": f"agent {event.agent_id} stalled ({event.reason})"
            + (f" on task {event.task_id}" if event.task_id else ""),
            "description": f"Agent {event.agent_id} is {event.reason}"
            + (f": {figures}" if figures else "")
            + f". Last heartbeat at {rfc3339(event.last_seen_ms)}.",
        }
        return Change(
            key,
            Alert(
                key,
                labels,
                annotations,
                event.detected_at_ms or event.emitted_at_ms,
                f"{public_url}/agents/{event.agent_id}",
            ),
        )
    if event.type == hb.RECOVERY:
        return Change(f"AgentStalled:{event.agent_id}", at_ms=event.detected_at_ms or event.emitted_at_ms)
    if event.type == hb.MASS_SILENCE:
        began = event.event_id.split(":")[2] if event.event_id.count(":") >= 2 else str(event.detected_at_ms)
        key = f"AgentsMassSilence:{event.partition}:{began}"
        labels = {"alertname": "AgentsMassSilence", "partition": str(event.partition), "severity": "critical", **base}
        annotations = {
            "summary": f"{len(event.agent_ids)} agents of partition {event.partition} went silent together",
            "description": f"{event.reason}. A partition between them and us, or an outage of ours: their tasks are "
            "held (not reassigned) until each is confirmed stalled on its own.",
            "agents": ",".join(event.agent_ids),
        }
        return Change(key, Alert(key, labels, annotations, event.detected_at_ms, f"{public_url}/"))
    if event.type == hb.MASS_SILENCE_CLEARED:
        parts = event.event_id.split(":")  # mass:<partition>:<began>:cleared
        if len(parts) == 4:
            return Change(f"AgentsMassSilence:{parts[1]}:{parts[2]}", at_ms=event.detected_at_ms)
        return None
    if event.type == hb.PIPELINE_LAG:
        labels = {"alertname": "PipelineLag", "severity": "critical", **base}
        annotations = {
            "summary": "the pipeline's clock is behind: agents are not judged meanwhile",
            "description": f"{event.reason} (limit {dict(event.figures).get('limit_s', 0):g} s). The bridge, Kafka "
            "or a worker is stuck or slow.",
        }
        return Change("PipelineLag", Alert("PipelineLag", labels, annotations, event.detected_at_ms, f"{public_url}/"))
    if event.type == hb.PIPELINE_CAUGHT_UP:
        return Change("PipelineLag", at_ms=event.detected_at_ms)
    return None


def orphan_alert(task_id: str, record: dict[str, Any], cluster: str, public_url: str) -> Alert:
    """A task without an owner for longer than HBREG_ORPHAN_ALERT."""
    key = f"TaskOrphaned:{task_id}"
    since = int(record["since"])
    labels = {"alertname": "TaskOrphaned", "task_id": task_id, "severity": "warning", "cluster": cluster}
    annotations = {
        "summary": f"task {task_id} has had no owner since {rfc3339(since)}",
        "description": f"Task {task_id} was taken from {record['owner']} (now at epoch {record['epoch']}) and no "
        "agent has taken it up: is the Role Assignment service running, and are there idle agents?",
    }
    return Alert(key, labels, annotations, since, f"{public_url}/tasks/{task_id}")
