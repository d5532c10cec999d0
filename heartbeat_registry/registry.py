"""The registry entry of an agent: its latest heartbeat, as the ingest stores it in Redis.

Stored as one short text per agent in the shard's `latest` hash (one HSET per shard write carries a
whole batch) and readable in `redis-cli`:
`received_ms status cpu_util timestamp progress task_id` (progress `-` when not reported).
"""

from __future__ import annotations

import math
from typing import Any

from heartbeat_registry.pb import hb


def encode(received_ms: int, status: int, cpu: float, timestamp: int, progress: float, task_id: str) -> str:
    shown = "-" if math.isnan(progress) else f"{progress:.4g}"
    return f"{received_ms} {status} {cpu:.4g} {timestamp} {shown} {task_id}"


def decode(agent_id: str, text: str | bytes) -> dict[str, Any]:
    if isinstance(text, bytes):
        text = text.decode()
    received, status, cpu, timestamp, progress, task_id = text.split(" ", 5)
    return {
        "agent_id": agent_id,
        "task_id": task_id,
        "status": hb.Status.Name(int(status)),
        "cpu_util": float(cpu),
        "timestamp": int(timestamp),
        "progress": None if progress == "-" else float(progress),
        "last_seen_ms": int(received),
    }
