"""The JSON shapes the CLI prints (and the HTTP API serves), defined once."""

from __future__ import annotations

from typing import Any

from heartbeat_registry.pb import hb

EVENT_TYPES = {
    hb.STALL: "stall",
    hb.RECOVERY: "recovery",
    hb.PIPELINE_LAG: "pipeline_lag",
    hb.PIPELINE_CAUGHT_UP: "pipeline_caught_up",
    hb.MASS_SILENCE: "mass_silence",
    hb.MASS_SILENCE_CLEARED: "mass_silence_cleared",
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


STATES = ("alive", "suspect", "stalled", "recovered", "left")


def agent_json(
    agent_id: str,
    *,
    task_id: str,
    status: int,
    state: str,
    reason: str,
    last_seen_ms: int,
    cpu_util: float,
    phi: float,
    state_since_ms: int,
    progress: float | None = None,
) -> dict[str, Any]:
    """One agent in `GET /api/agents` and `hbreg agents --json`."""
    return {
        "agent_id": agent_id,
        "task_id": task_id,
        "status": hb.Status.Name(status) if status in hb.Status.values() else str(status),
        "state": state,
        "reason": reason,
        "last_seen_ms": last_seen_ms,
        "cpu_util": cpu_util,
        "phi": phi,
        "state_since_ms": state_since_ms,
        "progress": progress,
    }


def window_json(agent_id: str, start: int, end: int, acc: Any, state: str, final: bool) -> dict[str, Any]:
    """One window row in `GET /api/windows` and `hbreg windows --json`; `acc` is a window accumulator."""
    beats = acc.beats
    return {
        "agent_id": agent_id,
        "window_start_ms": start,
        "window_end_ms": end,
        "beats": beats,
        "longest_gap_ms": acc.longest_gap,
        "cpu_mean": round(acc.cpu_sum / beats, 4) if beats else 0.0,
        "cpu_min": round(acc.cpu_min, 4) if beats else 0.0,
        "cpu_max": round(acc.cpu_max, 4),
        "cpu_p95": round(acc.p95(), 4),
        "cpu_slope_per_min": round(acc.slope_per_min(), 4),
        "status_counts": {hb.Status.Name(k): v for k, v in sorted(acc.statuses.items()) if k in hb.Status.values()},
        "task_id": acc.task_id,
        "state": state,
        "final": final,
    }
