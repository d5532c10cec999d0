"""The registry entry of an agent: its latest heartbeat, as the ingest stores it in Redis.

Stored as one short text per agent in the shard's `latest` hash and readable in `redis-cli`:
`received_ms status cpu_milli timestamp progress_milli task_id`, where cpu and progress are in
thousandths and progress is `-` when not reported. The ingest's WRITE_SHARD script (ingest/scripts.py)
writes it.
"""

from __future__ import annotations

from typing import Any

from heartbeat_registry.pb import hb


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
