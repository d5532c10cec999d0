"""Building a `Heartbeat`: the one place that knows how the wire wants its fields filled.

`timestamp` is required (the agent's clock in Unix epoch milliseconds; the ingest refuses 0 and stamps
its own receive time, which liveness is judged on), `progress` is optional and left unset when unknown.
"""

from __future__ import annotations

import time

from heartbeat_registry.pb import hb


def now_ms() -> int:
    """The wall clock in Unix epoch milliseconds, the unit of every time on the wire and in Redis."""
    return time.time_ns() // 1_000_000


def heartbeat(
    agent_id: str,
    task_id: str = "",
    status: int = hb.RUNNING,
    cpu: float = 0.0,
    *,
    progress: float | None = None,
    seq: int = 0,
    timestamp: int | None = None,
) -> hb.Heartbeat:
    beat = hb.Heartbeat(
        agent_id=agent_id,
        task_id=task_id,
        status=status,  # type: ignore[arg-type]
        timestamp=now_ms() if timestamp is None else timestamp,
        cpu_util=cpu,
        seq=seq,
    )
    if progress is not None:
        beat.progress = progress
    return beat
