"""Heartbeats packed column-wise (`HeartbeatColumns` in the .proto): how they travel from the ingest
through Redis Streams and the bridge to Kafka. One list per field, so a batch costs a few list appends
per heartbeat and one protobuf encode, and decoding is one C call per column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from heartbeat_registry.pb import hb

# the per-heartbeat fields, in .proto order (watermark_ms is per record, not per heartbeat)
COLUMNS = tuple(f.name for f in hb.HeartbeatColumns.DESCRIPTOR.fields if f.is_repeated)


class Columns:
    """Heartbeats of one shard or partition, column-wise, as plain lists (appending to a list is far
    cheaper than to a protobuf repeated field). The fields are the .proto's, checked at import."""

    __slots__ = ("agent_id", "task_id", "status", "timestamp", "cpu_util", "progress", "received_ms", "seq")

    def __init__(self) -> None:
        self.agent_id: list[str] = []
        self.task_id: list[str] = []
        self.status: list[int] = []
        self.timestamp: list[int] = []
        self.cpu_util: list[float] = []
        self.progress: list[float] = []  # NaN: not reported
        self.received_ms: list[int] = []
        self.seq: list[int] = []

    def __len__(self) -> int:
        return len(self.agent_id)

    def extend(self, other: Columns) -> None:
        for name in COLUMNS:
            getattr(self, name).extend(getattr(other, name))

    def message(self) -> hb.HeartbeatColumns:
        fields: dict[str, Any] = {name: getattr(self, name) for name in COLUMNS}
        return hb.HeartbeatColumns(**fields)


def select(cols: hb.HeartbeatColumns, rows: Sequence[int]) -> hb.HeartbeatColumns:
    """The heartbeats at `rows` of `cols` (the bridge regroups entries by Kafka partition with it)."""
    fields: dict[str, Any] = {name: [getattr(cols, name)[i] for i in rows] for name in COLUMNS}
    return hb.HeartbeatColumns(**fields)


assert Columns.__slots__ == COLUMNS, f"Columns must mirror HeartbeatColumns: {COLUMNS}"
