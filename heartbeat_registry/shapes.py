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
