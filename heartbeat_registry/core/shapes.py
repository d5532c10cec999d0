"""The JSON shapes the CLI prints and the HTTP API serves, defined once (README: "Query API" and
"Command line" document them)."""

from __future__ import annotations

from typing import Any

from heartbeat_registry.core.views import AgentView, RegistryEntry, WindowRow, status_name
from heartbeat_registry.pb import hb

EVENT_TYPES = {
    hb.STALL: "stall",
    hb.RECOVERY: "recovery",
    hb.PIPELINE_LAG: "pipeline_lag",
    hb.PIPELINE_CAUGHT_UP: "pipeline_caught_up",
    hb.MASS_SILENCE: "mass_silence",
    hb.MASS_SILENCE_CLEARED: "mass_silence_cleared",
    hb.ASSIGNMENT_EXPIRED: "assignment_expired",
}


def event_json(event: hb.AgentEvent) -> dict[str, Any]:
    """An `agent-events` record as `hbreg events --json` prints it (one object per line)."""
    return {
        "type": EVENT_TYPES.get(event.type, "unknown"),
        "agent_id": event.agent_id,
        "task_id": event.task_id,
        "reason": event.reason,
        "last_seen_ms": event.last_seen_ms,
        "detected_at_ms": event.detected_at_ms,
        "emitted_at_ms": event.emitted_at_ms,
        "event_id": event.event_id,
        "partition": event.partition,
        "figures": dict(event.figures),
        "agent_ids": list(event.agent_ids),
    }


def reply_json(reply: hb.BeatReply) -> dict[str, Any]:
    """A BeatReply as `hbreg send` prints it."""
    return {
        "seq": reply.seq,
        "received_ms": reply.received_ms,
        "directives": [
            {
                "kind": hb.Directive.Kind.Name(d.kind).lower(),
                "agent_id": d.agent_id,
                "task_id": d.task_id,
                "epoch": d.epoch,
                "reason": d.reason,
            }
            for d in reply.directives
        ],
    }


def agent_json(
    agent_id: str,
    view: AgentView | None,
    latest: RegistryEntry | None,
    clock: int,
    timeout_ms: int,
    phi_suspect: float,
) -> dict[str, Any]:
    """One agent in `GET /api/agents` and `hbreg agents --json`: the worker's view judged at its
    partition's clock, with the freshest beat from the ingest's registry when that is newer."""
    if view is None:
        view = AgentView("", 0, 0.0, 0, "alive", "", 0, None, None)
    task, status, cpu, last_seen, progress = view.task_id, view.status, view.cpu, view.last_seen, None
    if latest is not None and latest.last_seen_ms >= last_seen:
        task, status, cpu, last_seen = latest.task_id, latest.status, latest.cpu_util, latest.last_seen_ms
        progress = latest.progress
    judged = view._replace(last_seen=last_seen)
    return {
        "agent_id": agent_id,
        "task_id": task,
        "status": status_name(status),
        "state": judged.state_at(clock, timeout_ms, phi_suspect),
        "reason": view.reason,
        "last_seen_ms": last_seen,
        "cpu_util": cpu,
        "phi": judged.phi_at(clock),
        "state_since_ms": view.since,
        "progress": progress,
    }


def window_json(agent_id: str, row: WindowRow, final: bool) -> dict[str, Any]:
    """One window row in `GET /api/windows` and `hbreg windows --json`."""
    stats = row.stats
    return {
        "agent_id": agent_id,
        "window_start_ms": row.start,
        "window_end_ms": row.end,
        "beats": stats.beats,
        "longest_gap_ms": stats.longest_gap,
        "cpu_mean": stats.cpu_mean(),
        "cpu_min": round(stats.cpu_min, 4) if stats.beats else 0.0,
        "cpu_max": round(stats.cpu_max, 4),
        "cpu_p95": round(stats.p95(), 4),
        "cpu_slope_per_min": round(stats.slope_per_min(), 4),
        "status_counts": {hb.Status.Name(k): v for k, v in sorted(stats.statuses.items()) if k in hb.Status.values()},
        "task_id": stats.task_id,
        "state": row.state,
        "final": final,
    }


def task_json(task_id: str, record: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """One task in `GET /api/tasks/{id}` (with its history) and `GET /api/tasks` (without): `owner` is the
    agent it runs on (running), the one it was taken from (orphaned), or the one it was handed to (assigned)."""
    state = record["state"]
    return {
        "task_id": task_id,
        "owner": (record.get("assignee") or record["owner"]) if state == "assigned" else record["owner"],
        "epoch": int(record["epoch"]),
        "state": state,
        "since_ms": int(record["since"]),
        "assign_deadline_ms": int(record["deadline"]) if record.get("deadline") else None,
        "history": [
            {
                "epoch": int(c["epoch"]),
                "agent_id": c["agent"],
                "what": c["what"],
                "at_ms": int(c["at_ms"]),
                "why": c["why"],
            }
            for c in history
        ],
    }
