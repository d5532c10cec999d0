"""The registry entry of an agent: its latest heartbeat, as the ingest stores it in Redis.

Stored as one short text per agent in the shard's `latest` hash and readable in `redis-cli`:
`received_ms status cpu_milli timestamp progress_milli task_id`, where cpu and progress are in
thousandths (integers format several times faster than floats on the ingest's hot path) and progress is
`-` when not reported.
"""

from __future__ import annotations

from typing import Any

from heartbeat_registry.pb import hb


def encode(received_ms: int, status: int, cpu: float, timestamp: int, progress: float, task_id: str) -> str:
    shown = "-" if progress != progress else int(progress * 1000 + 0.5)  # NaN: not reported
    return f"{received_ms} {status} {int(cpu * 1000 + 0.5)} {timestamp} {shown} {task_id}"


def decode(agent_id: str, text: str | bytes) -> dict[str, Any]:
    if isinstance(text, bytes):
        text = text.decode()
    received, status, cpu, timestamp, progress, task_id = text.split(" ", 5)
    return {
        "agent_id": agent_id,
        "task_id": task_id,
        "status": hb.Status.Name(int(status)),
        "cpu_util": int(cpu) / 1000,
        "timestamp": int(timestamp),
        "progress": None if progress == "-" else int(progress) / 1000,
        "last_seen_ms": int(received),
    }
